"""The package's version, in a room of its own on the ground floor: the file writers record it without
importing the whole package."""

__version__ = "0.1.0"
