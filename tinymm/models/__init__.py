"""Models of the lessons, built from tinymm.nn."""

from .autoencoder import KLAutoencoder
from .clip import CLIP, zero_shot_classifier
from .text import TextTransformer
from .unet import UNet
from .video import AudioVisualTransformer, FrameBag, VideoTransformer
from .vit import ViT
from .vlm import VLM

__all__ = [
    "AudioVisualTransformer",
    "CLIP",
    "FrameBag",
    "KLAutoencoder",
    "TextTransformer",
    "UNet",
    "VLM",
    "VideoTransformer",
    "ViT",
    "zero_shot_classifier",
]
