"""Find similar products and matching shades (issue 37): an index of photo embeddings with
each photo's file, predicted attributes and shade, searched by embedding or by CIEDE2000.

This package needs no model: the caller computes the embeddings and attributes.
"""

from beautytag.search.errors import SearchError
from beautytag.search.filters import parse_where
from beautytag.search.index import EXACT_MAX, Hit, Index
from beautytag.search.shade import parse_shade

__all__ = ["EXACT_MAX", "Hit", "Index", "SearchError", "parse_shade", "parse_where"]
