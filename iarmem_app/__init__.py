"""Streamlit-side helpers of the iarmem app: settings, URL state, cached loading, results and jobs, widgets.

The library (`iarmem_core`) never imports streamlit; everything that does lives here or in app.py/pages/.
"""
