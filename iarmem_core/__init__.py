"""iarmem_core: localize, extract and mitigate memorization in image autoregressive models.

The library behind the iarmem Streamlit app and CLI. It imports no streamlit.
"""

__version__ = "0.1.0"
