"""The package version, recorded in every checkpoint and result."""

__version__ = "0.1.0"
