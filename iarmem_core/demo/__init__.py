"""The demo-world factory: the bundled data (`bundle`), the trained demo models and their cards (`train`).

It uses the same analysis code as the app and the CLI; nothing in the app or the analysis imports it.
"""
