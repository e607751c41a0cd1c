"""The package's exception classes."""

from __future__ import annotations


class DeepAlignError(ValueError):
    """Bad input or a failed operation, with a message naming the file, slice and problem.

    Subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working. The
    CLI exits with status 2 for it.
    """


class EnvironmentFailure(DeepAlignError):
    """The environment, not the input, failed: a full disk, a read-only or protected folder,
    permissions, an I/O error. The CLI exits with status 1 for it."""


class InputChanged(DeepAlignError):
    """The input changed while a run read it: what the run wrote mixes the old and the new
    input, so it is neither put in place nor kept as a resume point."""
