"""Models of the lessons, built from tinymm.nn."""

from .text import TextTransformer

__all__ = ["TextTransformer"]
