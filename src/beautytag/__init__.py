"""beautytag: recognise cosmetics product attributes from photos."""

__version__ = "0.1.0"
