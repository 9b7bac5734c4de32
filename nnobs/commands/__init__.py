"""Subcommands of the ``nnobs`` command line, one module each (see :mod:`nnobs.cli`)."""
