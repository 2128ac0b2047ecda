"""The one error type for bad dataset input."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset file or key is missing or invalid; the message names the file
    (full path) or key and says what is wrong, so a user can fix it."""
