"""Synthetic, seeded data sets (shapes, sounds, videos), the tokenizer, and batching."""

from .batching import batches
from .shapes import (
    COLOURS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesData,
    make_shapes,
    parse_caption,
    splits,
)
from .sounds import CLASS_NAMES as SOUND_CLASSES
from .sounds import make_sounds
from .tokenizer import BPETokenizer
from .videos import VideoData, make_videos

__all__ = [
    "BPETokenizer",
    "COLOURS",
    "HELDOUT_PAIRS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SOUND_CLASSES",
    "ShapesData",
    "VideoData",
    "batches",
    "make_shapes",
    "make_sounds",
    "make_videos",
    "parse_caption",
    "splits",
]
