"""Errors main.py reports as one line rather than a traceback, shared by the modules raising them."""


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed (the message says what to install)."""
