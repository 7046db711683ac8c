"""Configurations (ml_collections); ``default.py`` is the embedded default job."""
