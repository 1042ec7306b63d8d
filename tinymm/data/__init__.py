"""Synthetic, seeded data sets (shapes, two-object Q&A, sounds, videos), the tokenizer, and
batching."""

from .batching import batches
from .qa import QUESTION_TYPES, make_qa, qa_splits
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
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "SOUND_CLASSES",
    "ShapesData",
    "VideoData",
    "batches",
    "make_qa",
    "make_shapes",
    "make_sounds",
    "make_videos",
    "parse_caption",
    "qa_splits",
    "splits",
]
