"""Synthetic video clips for lesson 07: a shape moving across the background, with a soundtrack.

A clip is T frames of the shapes world (tinymm.data.shapes), channels-last, (N, T, H, W, C):
one object (shape, colour, size as in make_shapes) moves in a straight line at constant speed
over a still background. Each frame is drawn by the shapes renderer (`shapes._draw_alpha`,
anti-aliased at 4x), composited as `(1 - alpha) * background + alpha * colour`, with fresh
light noise per frame.

Motion. The object moves in one of the compass directions of `COMPASS`, by `speed` pixels a
frame (1 .. 2.5), from a start point drawn so that the whole path stays inside the picture. By
default only the six directions that climb or descend are drawn (north-east, north, north-west,
south-west, south, south-east), and the task label is `rising`: 1 if the object climbs, 0 if it
descends.

Why "rising or falling" and not "which of 8 directions": a model that ignores frame order (a
bag of frames) still sees *where* the object has been, i.e. the line it moves along; only the
order says which way along it. So the line's axis is free information for any such model, and
only the sense along it needs time. `reverse` plays a clip backwards: frame k becomes frame
T-1-k, the clip is a valid clip of the opposite direction (north <-> south, north-east <->
south-west, ...) and its label flips, while its bag of frames is the same. With every clip's
reversal in the data, a model that ignores frame order gives both the same answer and is right
on exactly one of the two: exactly at chance, 1/2.

Soundtrack. Each clip has a mono soundtrack of `duration = T / fps` seconds at `sr` samples a
second (default 8 frames at 8 fps, 1 s at 4 kHz): a sine whose pitch follows the object's
height on screen, higher on screen, higher pitch:

    h(t) = 1 - y(t)                   height of the object's centre, fraction of the picture
    f(t) = F_LOW * 2^(OCTAVES h(t))   Hz (200 Hz at the bottom edge, 1600 Hz at the top)
    s(t) = a sin(2 pi sum_{u <= t} f(u) / sr + phi) + sigma n(t)

with y(t) the centre's row moving linearly in time (frame k shows t_k = (k + 1/2) / fps),
sample n at time (n + 1/2) / sr, a random loudness a, phase phi and white noise n(t) at
SNR_DB. Sample times are symmetric, so `reverse` of a clip reverses its soundtrack exactly:
the reversed soundtrack is the soundtrack of the reversed clip.

Nothing is downloaded and no global random state is touched; the same seed gives bitwise the
same arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from . import shapes

# Compass directions, k-th at 45 k degrees counter-clockwise from east, (dx, dy) with y up.
COMPASS: tuple[str, ...] = (
    "east",
    "north-east",
    "north",
    "north-west",
    "west",
    "south-west",
    "south",
    "south-east",
)
VERTICAL: tuple[int, ...] = (1, 2, 3, 5, 6, 7)  # the directions that climb or descend
LABELS: tuple[str, ...] = ("falling", "rising")

SPEED = (1.0, 2.5)  # pixels a frame, along the direction of motion
F_LOW, OCTAVES = 200.0, 3.0  # soundtrack pitch: F_LOW at the bottom edge, 2^OCTAVES x at the top
LOUDNESS = (0.3, 0.9)  # soundtrack amplitude a
SNR_DB = (10.0, 30.0)  # sine power over noise power


@dataclass
class VideoData:
    """Clips with their motion, labels and soundtracks.

    clips:       (N, T, H, W, 3) float32 in [0, 1], channels-last (or a ReversedClips indexed
                 as one: with_reversals(copy_clips=False)).
    direction:   (N,) int64 index into COMPASS.
    shape, colour, size: (N,) int64 indices into shapes.SHAPES, COLOURS, SIZES.
    centres:     (N, T, 2) float64, the object's centre in each frame, (x, y) as fractions of
                 the side, y down (image rows).
    soundtracks: (N, samples) float32, mono, at `sr` samples a second.
    sr, fps:     sample rate of the soundtracks, frames a second of the clips.
    """

    clips: np.ndarray
    direction: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    centres: np.ndarray
    soundtracks: np.ndarray
    sr: int
    fps: float

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def rising(self) -> np.ndarray:
        """(N,) int64 task label: 1 if the object climbs (moves up the screen), 0 if not."""
        return (np.sin(np.deg2rad(45.0 * self.direction)) > 0.5).astype(np.int64)

    @property
    def heights(self) -> np.ndarray:
        """(N, T) height of the object's centre in each frame, 0 at the bottom, 1 at the top."""
        return 1.0 - self.centres[..., 1]


SOUND_CHUNK = 256  # soundtracks made at a time (8 MB float64 temporaries at 4000 samples)
_ARRAYS = [f for f in fields(VideoData) if f.name not in ("sr", "fps")]  # per clip


def _unit(direction: np.ndarray) -> np.ndarray:
    """(N,) compass indices -> (N, 2) unit steps (dx, dy), y down (image rows)."""
    angle = np.deg2rad(45.0 * direction)
    return np.stack([np.cos(angle), -np.sin(angle)], axis=-1)


def pitch(height: np.ndarray | float) -> np.ndarray:
    """Soundtrack pitch in Hz for a height in [0, 1]: f = F_LOW * 2^(OCTAVES h)."""
    return F_LOW * 2.0 ** (OCTAVES * np.asarray(height, dtype=np.float64))


def _soundtracks(rng: np.random.Generator, centres: np.ndarray, fps: float, sr: int) -> np.ndarray:
    """(N, T, 2) centres moving linearly -> (N, samples) soundtracks whose pitch follows height."""
    n, frames, _ = centres.shape
    samples = round(frames / fps * sr)
    t = (np.arange(samples) + 0.5) / sr  # (S,) seconds, symmetric about the clip's middle
    frame_time = t * fps - 0.5  # in frames: frame k is shown at k
    y0 = centres[:, 0, 1:2]  # (N, 1)
    dy = (centres[:, -1, 1:2] - y0) / max(frames - 1, 1)  # rows per frame
    loudness = rng.uniform(*LOUDNESS, size=(n, 1))
    offset = rng.uniform(0, 2 * np.pi, size=(n, 1))
    snr = rng.uniform(*SNR_DB, size=(n, 1))
    noise_std = loudness / np.sqrt(2) * 10.0 ** (-snr / 20)  # sine power a^2 / 2
    out = np.empty((n, samples), dtype=np.float32)
    for start in range(0, n, SOUND_CHUNK):  # float64 (N, S) temporaries: a chunk at a time
        r = slice(start, start + SOUND_CHUNK)
        height = 1.0 - (y0[r] + dy[r] * frame_time)  # (chunk, S), linear in time
        phase = 2 * np.pi * np.cumsum(pitch(height), axis=1) / sr
        tone = loudness[r] * np.sin(phase + offset[r])
        out[r] = tone + noise_std[r] * rng.standard_normal(tone.shape)  # the noise: in order
    return out


def make_videos(
    n: int,
    seed: int | np.random.SeedSequence = 0,
    frames: int = 8,
    image_size: int = 32,
    fps: float = 8.0,
    sr: int = 4000,
    directions: Sequence[int] = VERTICAL,
) -> VideoData:
    """Draw n clips of one shape moving in a straight line, each with its soundtrack.

    Shape, colour and size are uniform (as make_shapes, with its size, rotation and colour
    jitter), the direction uniform over `directions` (indices into COMPASS), the speed uniform
    in SPEED pixels a frame, the start point uniform among those that keep the whole path,
    and the object, inside the picture. Same seed, same arguments -> bitwise the same data.

    Returns VideoData with clips (n, frames, image_size, image_size, 3) float32 in [0, 1].
    """
    if n < 0:
        raise ValueError(f"make_videos: n must be >= 0, got {n}")
    if frames < 2:
        raise ValueError(f"make_videos: frames must be >= 2 (motion needs two), got {frames}")
    if image_size < shapes.MIN_IMAGE_SIZE:
        raise ValueError(
            f"make_videos: image_size must be >= {shapes.MIN_IMAGE_SIZE}, got {image_size}"
        )
    if fps <= 0 or sr <= 0:
        raise ValueError(f"make_videos: fps and sr must be positive, got fps={fps}, sr={sr}")
    directions = np.asarray(directions, dtype=np.int64)
    if directions.ndim != 1 or len(directions) == 0 or not np.isin(directions, range(8)).all():
        raise ValueError(
            f"make_videos: directions must be a non-empty list of indices into COMPASS (0..7), "
            f"got {directions.tolist()}"
        )
    travel = SPEED[1] * (frames - 1) / image_size  # longest path, fraction of the side
    if travel + 2 * max(shapes.SIZE_RADIUS) * (1 + shapes.SCALE_JITTER) > 1:
        raise ValueError(
            f"make_videos: {frames} frames at up to {SPEED[1]} px a frame do not fit in "
            f"{image_size} px; use fewer frames or a larger image_size"
        )
    rng = np.random.default_rng(seed)
    shape = rng.integers(len(shapes.SHAPES), size=n)
    colour = rng.integers(len(shapes.COLOURS), size=n)
    size = rng.integers(len(shapes.SIZES), size=n)
    radius = np.array(shapes.SIZE_RADIUS)[size] * rng.uniform(
        1 - shapes.SCALE_JITTER, 1 + shapes.SCALE_JITTER, size=n
    )
    rotation = rng.uniform(-shapes.ROTATION_JITTER, shapes.ROTATION_JITTER, size=n)
    direction = directions[rng.integers(len(directions), size=n)]
    speed = rng.uniform(*SPEED, size=n) / image_size  # fraction of the side a frame

    # the path start + k * step, k = 0 .. T-1, stays within [radius, 1 - radius] on both axes
    step = _unit(direction) * speed[:, None]  # (n, 2)
    path = step[:, None, :] * np.arange(frames)[None, :, None]  # (n, T, 2), from the start
    low = radius[:, None] - path.min(axis=1)  # (n, 2)
    high = 1 - radius[:, None] - path.max(axis=1)
    start = low + (high - low) * rng.uniform(size=(n, 2))
    centres = start[:, None, :] + path  # (n, T, 2)

    rgb = shapes.COLOUR_RGB[colour] + rng.uniform(
        -shapes.COLOUR_JITTER, shapes.COLOUR_JITTER, size=(n, 3)
    )
    rgb = np.clip(rgb, 0, 1).astype(np.float32)
    background = np.repeat(shapes._background(rng, n, image_size), 3, axis=-1)  # (n, H, W, 3)
    clips = np.empty((n, frames, image_size, image_size, 3), dtype=np.float32)
    for i in range(n):
        for k in range(frames):
            alpha = shapes._draw_alpha(shape[i], centres[i, k], radius[i], rotation[i], image_size)[
                ..., None
            ]
            clips[i, k] = background[i] + alpha * (rgb[i] - background[i])
    for start in range(0, n, shapes.CHUNK):  # the noise in chunks: the same numbers, less memory
        chunk = clips[start : start + shapes.CHUNK]
        chunk += shapes.NOISE_STD * rng.standard_normal(chunk.shape, dtype=np.float32)
    np.clip(clips, 0, 1, out=clips)

    return VideoData(
        clips=clips,
        direction=direction,
        shape=shape,
        colour=colour,
        size=size,
        centres=centres,
        soundtracks=_soundtracks(rng, centres, fps, sr),
        sr=sr,
        fps=fps,
    )


def opposite(direction: np.ndarray | int) -> np.ndarray:
    """The compass direction pointing the other way: k -> (k + 4) mod 8."""
    return (np.asarray(direction) + 4) % 8


def reverse(data: VideoData) -> VideoData:
    """The same clips played backwards: frames, centres and soundtracks reversed in time, the
    direction opposite. A clip's reversal is a clip the generator could have drawn."""
    back = _played_backwards(data)
    return VideoData(
        **{f.name: np.ascontiguousarray(getattr(back, f.name)) for f in _ARRAYS},
        sr=data.sr,
        fps=data.fps,
    )


def _played_backwards(data: VideoData) -> VideoData:
    """`reverse` as views where it can (time reversed, no copy)."""
    return VideoData(
        clips=data.clips[:, ::-1],
        direction=opposite(data.direction),
        shape=data.shape,
        colour=data.colour,
        size=data.size,
        centres=data.centres[:, ::-1],
        soundtracks=data.soundtracks[:, ::-1],
        sr=data.sr,
        fps=data.fps,
    )


def with_reversals(data: VideoData, copy_clips: bool = True) -> VideoData:
    """Every clip as drawn, then every clip played backwards: 2N clips, clip i + N the reversal
    of clip i. In such a set each bag of frames comes once rising and once falling.
    copy_clips=False: the clips are a `ReversedClips` over data.clips (indexed like the (2N, ...)
    array, never built: half the memory), the other fields arrays as usual."""
    back = _played_backwards(data)  # views: concatenate copies each clip once
    arrays = {
        f.name: np.concatenate([getattr(data, f.name), getattr(back, f.name)])
        for f in _ARRAYS
        if copy_clips or f.name != "clips"
    }
    if not copy_clips:
        arrays["clips"] = ReversedClips(data.clips)
    return VideoData(**arrays, sr=data.sr, fps=data.fps)


class ReversedClips:
    """Clips (N, T, H, W, C) and then the same clips played backwards, indexed as the (2N, T, H,
    W, C) array with_reversals would build, without building it: an int, a slice or an index
    array gathers the clips it names (a copy, as NumPy's advanced indexing) and reverses in time
    those from the second half. `drawn` holds the N clips (change them there, e.g. in place)."""

    def __init__(self, drawn: np.ndarray):
        self.drawn = drawn

    def __len__(self) -> int:
        return 2 * len(self.drawn)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.drawn.shape[1:])

    def __getitem__(self, index: Any) -> np.ndarray:
        i = np.arange(len(self))[index]  # the rows of the (2N, ...) array it names
        n = len(self.drawn)
        clips = self.drawn[i % n]
        if np.ndim(i) == 0:  # one clip
            return np.ascontiguousarray(clips[::-1]) if i >= n else clips.copy()
        back = i >= n
        clips[back] = clips[back][:, ::-1]  # time reversed
        return clips

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = self[:]
        return full if dtype is None else full.astype(dtype)
