"""Adapters that let sitebench validate networks other people trained and published, unmodified.

Each adapter is a Python entry point (``entrypoint:sitebench.models.published.<module>:make_model``):
it calls the package's own public inference code with its shipped weights, and builds the
model card from the package's metadata, licence, citation and the hash of every file it loads.
"""
