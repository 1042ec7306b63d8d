"""Models of the lessons, built from tinymm.nn."""

from .clip import CLIP, zero_shot_classifier
from .text import TextTransformer
from .vit import ViT
from .vlm import VLM

__all__ = ["CLIP", "TextTransformer", "ViT", "VLM", "zero_shot_classifier"]
