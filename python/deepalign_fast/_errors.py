"""The package's exception base class."""

from __future__ import annotations


class DeepAlignError(ValueError):
    """Bad input or a failed operation, with a message naming the file, slice and problem.

    Subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.
    """
