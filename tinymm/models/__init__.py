"""Models of the lessons, built from tinymm.nn."""

from .text import TextTransformer
from .vit import ViT

__all__ = ["TextTransformer", "ViT"]
