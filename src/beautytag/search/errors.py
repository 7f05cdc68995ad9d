"""The one error type of the search package."""

from __future__ import annotations


class SearchError(ValueError):
    """Bad input to the search (no index, another model's index, an unknown filter...): a
    one-line message that says what is valid."""
