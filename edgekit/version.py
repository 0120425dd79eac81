"""The version, apart from the package's __init__ so that any stage can read it without importing the API."""

__version__ = "0.1.0"
