"""Models of the lessons, built from tinymm.nn."""

from .clip import CLIP, zero_shot_classifier
from .text import TextTransformer
from .video import AudioVisualTransformer, FrameBag, VideoTransformer
from .vit import ViT
from .vlm import VLM

__all__ = [
    "AudioVisualTransformer",
    "CLIP",
    "FrameBag",
    "TextTransformer",
    "VLM",
    "VideoTransformer",
    "ViT",
    "zero_shot_classifier",
]
