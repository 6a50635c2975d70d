"""Embedding in an app: a bundle's artifact exported with the code that runs it (export-app)."""
