"""nnobs: observability of transformers."""

__version__ = "0.1.0"
