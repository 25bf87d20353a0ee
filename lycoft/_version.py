"""The package version, on the ground floor so that file writers below `lycoft/__init__` can record it."""

__version__ = "0.1.0"
