"""A captioned synthetic image world: coloured shapes on a grey background.

Every image holds one (or two) objects, and each object is described by four attributes:

    shape     one of SHAPES     circle, square, triangle, star, cross, heart
    colour    one of COLOURS    red, orange, yellow, green, cyan, blue, magenta, white
    size      one of SIZES      small, large
    position  one of POSITIONS  the 3x3 grid: "top left", "top", ..., "center", ..., "bottom right"

and a caption is built from them, word for word:

    "a large red circle in the top left"
    "a small blue star in the top right and a large red circle in the bottom left"

so the same call gives an image classifier its labels (lesson 02, ViT), image-text pairs for
contrastive training and zero-shot prompts (lesson 03, CLIP), targets for captioning and
questions (lesson 04, VLM), text conditions for text-to-image (lesson 05, diffusion) and
frames to move around (lesson 07, video).

How a picture is made (`make_shapes`):

1. Attributes are drawn uniformly at random from a seeded `np.random.Generator` (PCG64),
   then a little jitter: position +-3% of the image, size +-8%, rotation +-15 degrees.
2. Each shape is a polygon in unit coordinates (`OUTLINES`, centred on its area centroid,
   farthest vertex at radius 1). Pillow fills it at 4x resolution and a 4x4 box filter
   brings it down, which gives an anti-aliased coverage mask `alpha` in [0, 1].
3. The background is a dark neutral grey with a gentle linear gradient; the object is
   composited over it, `image = (1 - alpha) * background + alpha * colour`, and light
   Gaussian noise is added to the whole picture.
4. With two objects, the objects sit in different cells and never touch: where the small
   jitter would make them touch, their centres are redrawn anywhere inside their own cells.

Nothing is downloaded, no global random state is touched, and the same seed gives bitwise
the same arrays. For the train / val / test split see `splits`; for the compositional
split (some (shape, colour) pairs never seen in training, used for zero-shot tests in
lessons 03 and 05) see `HELDOUT_PAIRS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "magenta", "white")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

# Named colours as RGB in [0, 1], one row per entry of COLOURS: (len(COLOURS), 3).
# Any two are at least 0.35 apart, and all are far from the grey background.
COLOUR_RGB: np.ndarray = np.array(
    [
        [0.90, 0.10, 0.10],  # red
        [1.00, 0.55, 0.05],  # orange
        [0.95, 0.90, 0.10],  # yellow
        [0.10, 0.80, 0.20],  # green
        [0.10, 0.85, 0.90],  # cyan
        [0.20, 0.35, 1.00],  # blue
        [0.90, 0.15, 0.85],  # magenta
        [0.97, 0.97, 0.97],  # white
    ],
    dtype=np.float32,
)

# (shape, colour) pairs held out of training by `splits(..., heldout_pairs=HELDOUT_PAIRS)`:
# one pair per shape, each with a different colour, so every shape still appears in
# training in 7 colours and every colour with at least 5 shapes.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "green"),
    ("square", "red"),
    ("triangle", "blue"),
    ("star", "yellow"),
    ("cross", "magenta"),
    ("heart", "cyan"),
)

SIZE_RADIUS = (0.12, 0.18)  # radius of the farthest vertex, as a fraction of the image side
CELL_CENTRES = (0.25, 0.5, 0.75)  # where the 3x3 grid places an object, fraction of the side
POSITION_JITTER = 0.03  # +- fraction of the image side
CELL_MARGIN = 0.04  # a centre moved within its cell stays this far inside (fraction of side)
SCALE_JITTER = 0.08  # +- relative size
ROTATION_JITTER = 15.0  # +- degrees
COLOUR_JITTER = 0.04  # +- per channel
BACKGROUND_GREY = (0.12, 0.30)  # range of the background's mean grey level
BACKGROUND_GRADIENT = 0.08  # largest change of grey across the image
NOISE_STD = 0.015
SUPERSAMPLE = 4  # draw at 4x, then box-filter down: anti-aliasing
CHUNK = 1024  # images composed at a time (bounds the temporaries; the pixels do not depend on it)
MIN_IMAGE_SIZE = 16
MAX_OBJECTS = 2
MIN_GAP = 0.05  # two objects' bounding circles stay this far apart (fraction of the side)


def _star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart(k: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, y], axis=1)


def _regular(k: int, start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg) + np.arange(k) * 2 * np.pi / k
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _cross(half_width: float = 0.36) -> np.ndarray:
    w = half_width
    return np.array(
        [[w, 1], [w, w], [1, w], [1, -w], [w, -w], [w, -1], [-w, -1], [-w, -w], [-1, -w], [-1, w]]
        + [[-w, w], [-w, 1]]
    )


def _normalise(outline: np.ndarray) -> np.ndarray:
    """Move a polygon's area centroid to the origin and its farthest vertex to radius 1.

    Centroid of a simple polygon (shoelace): with c_i = x_i y_{i+1} - x_{i+1} y_i,
    A = sum(c_i) / 2 and centroid = sum((p_i + p_{i+1}) c_i) / (6 A).
    outline: (K, 2) vertices, x right and y up. Returns (K, 2) float64.
    """
    p, q = outline, np.roll(outline, -1, axis=0)
    cross = p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1]
    centroid = ((p + q) * cross[:, None]).sum(axis=0) / (3 * cross.sum())
    centred = outline - centroid
    return centred / np.linalg.norm(centred, axis=1).max()


# Unit outlines, (K, 2) each, x right and y up, area centroid at 0, farthest vertex at 1.
# The square is drawn axis-aligned (+-15 degrees of jitter never makes it a diamond).
OUTLINES: dict[str, np.ndarray] = {
    "circle": _normalise(_regular(48, 0.0)),
    "square": _normalise(_regular(4, 45.0)),
    "triangle": _normalise(_regular(3, 90.0)),
    "star": _normalise(_star()),
    "cross": _normalise(_cross()),
    "heart": _normalise(_heart()),
}


class Attributes(NamedTuple):
    """The four attributes of one object, by name: e.g. ("circle", "red", "large", "top left")."""

    shape: str
    colour: str
    size: str
    position: str


def make_caption(objects: Sequence[Attributes]) -> str:
    """Caption for the objects of one image: "a {size} {colour} {shape} in the {position}",
    joined with " and "."""
    return " and ".join(f"a {o.size} {o.colour} {o.shape} in the {o.position}" for o in objects)


def parse_caption(caption: str) -> tuple[Attributes, ...]:
    """Inverse of `make_caption`: "a large red circle in the top left" ->
    (Attributes("circle", "red", "large", "top left"),). Raises ValueError if malformed."""
    objects = []
    for phrase in caption.strip().split(" and "):
        words = phrase.split()
        if len(words) < 6 or words[0] != "a" or words[4:6] != ["in", "the"]:
            raise ValueError(
                f"cannot parse {phrase!r} in caption {caption!r}: "
                "expected 'a <size> <colour> <shape> in the <position>'"
            )
        size, colour, shape, position = words[1], words[2], words[3], " ".join(words[6:])
        for value, names, what in [
            (size, SIZES, "size"),
            (colour, COLOURS, "colour"),
            (shape, SHAPES, "shape"),
            (position, POSITIONS, "position"),
        ]:
            if value not in names:
                raise ValueError(f"unknown {what} {value!r} in caption {caption!r}; known: {names}")
        objects.append(Attributes(shape, colour, size, position))
    return tuple(objects)


@dataclass
class ShapesData:
    """Images with their attribute labels and captions.

    images:   (N, H, W, 3) float32 in [0, 1], channels-last.
    shape, colour, size, position: int64 indices into SHAPES, COLOURS, SIZES, POSITIONS;
              (N,) when there is one object per image, (N, objects) otherwise, the objects
              of an image in reading order of their cells (top left first).
    captions: N strings, `make_caption` of each image's objects.
    """

    images: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    position: np.ndarray
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def objects(self) -> int:
        """Objects per image."""
        return 1 if self.shape.ndim == 1 else self.shape.shape[1]

    def subset(self, index: np.ndarray | Sequence[int] | slice) -> ShapesData:
        """The images selected by `index` (integer indices, a boolean mask or a slice)."""
        if isinstance(index, slice):
            picked = range(len(self))[index]
        else:
            index = np.asarray(index)
            picked = np.flatnonzero(index) if index.dtype == bool else index
        picked = np.asarray(picked, dtype=np.int64)
        return ShapesData(
            images=self.images[picked],
            shape=self.shape[picked],
            colour=self.colour[picked],
            size=self.size[picked],
            position=self.position[picked],
            captions=[self.captions[i] for i in picked],
        )

    def attributes(self, i: int) -> tuple[Attributes, ...]:
        """The objects of image i by name: `parse_caption(data.captions[i])` gives them back."""
        labels = [np.atleast_1d(a[i]) for a in (self.shape, self.colour, self.size, self.position)]
        return tuple(
            Attributes(SHAPES[s], COLOURS[c], SIZES[z], POSITIONS[p])
            for s, c, z, p in zip(*labels, strict=True)
        )


def _pair_indices(pairs: Sequence[tuple[str, str]] | None) -> np.ndarray:
    """(shape, colour) names -> (P, 2) int indices; None means every pair."""
    if pairs is None:
        return np.array([(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))])
    out = []
    for pair in pairs:
        shape, colour = pair
        if shape not in SHAPES or colour not in COLOURS:
            raise ValueError(
                f"unknown (shape, colour) pair {pair!r}; shapes: {SHAPES}, colours: {COLOURS}"
            )
        out.append((SHAPES.index(shape), COLOURS.index(colour)))
    if not out:
        raise ValueError("pairs is empty: no (shape, colour) pair is left to draw")
    return np.array(sorted(set(out)))


def _distinct_cells(rng: np.random.Generator, n: int, objects: int) -> np.ndarray:
    """(n, objects) cells, uniform and all different within an image: the k-th object takes
    a uniform cell among those still free."""
    position = np.empty((n, objects), dtype=np.int64)
    free = np.tile(np.arange(len(POSITIONS)), (n, 1))  # (n, 9), the free cells first
    rows = np.arange(n)
    for k in range(objects):
        pick = rng.integers(len(POSITIONS) - k, size=n)
        position[:, k] = free[rows, pick]
        free[rows, pick] = free[:, len(POSITIONS) - 1 - k]
    return position


def _place(
    rng: np.random.Generator, position: np.ndarray, size: np.ndarray, anywhere_in_cell: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Centres (..., 2) as (x, y) fractions of the side, and radii (...,) of objects.

    Normally an object sits at its cell's point of CELL_CENTRES, +-POSITION_JITTER.
    With anywhere_in_cell, its centre is uniform over the cell (CELL_MARGIN in from the
    cell's edges and a radius in from the image's edges); used to move two objects apart.
    """
    scale = rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER, size=size.shape)
    radius = np.array(SIZE_RADIUS)[size] * scale
    cell = np.stack([position % 3, position // 3], axis=-1)  # (..., 2) column, row
    if anywhere_in_cell:
        low = np.maximum(cell / 3 + CELL_MARGIN, radius[..., None])
        high = np.minimum((cell + 1) / 3 - CELL_MARGIN, 1 - radius[..., None])
        return low + (high - low) * rng.uniform(size=cell.shape), radius
    jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=cell.shape)
    return np.array(CELL_CENTRES)[cell] + jitter, radius


def _overlapping(centre: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """(n,) bool: some two objects of the image come closer than MIN_GAP (bounding circles)."""
    bad = np.zeros(len(centre), dtype=bool)
    for a in range(centre.shape[1]):
        for b in range(a + 1, centre.shape[1]):
            distance = np.linalg.norm(centre[:, a] - centre[:, b], axis=-1)
            bad |= distance < radius[:, a] + radius[:, b] + MIN_GAP
    return bad


def _draw_alpha(
    shape: int, centre: np.ndarray, radius: float, rotation: float, image_size: int
) -> np.ndarray:
    """Anti-aliased coverage of one object: (H, W) float32 in [0, 1].

    The outline is rotated, scaled and moved (y flips: image rows grow downwards), filled by
    Pillow at SUPERSAMPLE x the resolution and box-filtered back down.
    centre: (x, y) as fractions of the side; radius as a fraction of the side.
    """
    theta = np.deg2rad(rotation)
    rotate = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    points = OUTLINES[SHAPES[shape]] @ rotate.T * radius * np.array([1.0, -1.0]) + centre
    big = image_size * SUPERSAMPLE
    # Pillow puts pixel k's centre at coordinate k, so continuous u maps to u * big - 0.5
    points = points * big - 0.5
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def _background_draws(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Each image's background: grey level, gradient direction and strength, (n,) each."""
    grey = rng.uniform(*BACKGROUND_GREY, size=n)
    direction = rng.uniform(0, 2 * np.pi, size=n)
    strength = rng.uniform(0, BACKGROUND_GRADIENT, size=n)
    return grey, direction, strength


def _background(rng: np.random.Generator, n: int, image_size: int) -> np.ndarray:
    """Dark neutral grey with a gentle linear gradient in a random direction: (n, H, W, 1)."""
    return _background_pixels(*_background_draws(rng, n), image_size)


def _background_pixels(
    grey: np.ndarray, direction: np.ndarray, strength: np.ndarray, image_size: int
) -> np.ndarray:
    """The backgrounds of `_background_draws`: (n, H, W, 1)."""
    u = (np.arange(image_size) + 0.5) / image_size - 0.5  # (W,) in (-0.5, 0.5)
    ramp = (
        np.cos(direction)[:, None, None] * u[None, None, :]
        + np.sin(direction)[:, None, None] * u[None, :, None]
    )  # (n, H, W)
    return (grey[:, None, None] + strength[:, None, None] * ramp)[..., None].astype(np.float32)


def make_shapes(
    n: int,
    seed: int | np.random.SeedSequence = 0,
    image_size: int = 32,
    objects: int = 1,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> ShapesData:
    """Draw n captioned images of coloured shapes.

    Each object's (shape, colour) is uniform over `pairs` (default: every pair), its size and
    cell uniform and independent; with objects=2 the two objects sit in different cells and
    never touch (where they would, their centres are redrawn anywhere inside their cells
    until they are apart). Same seed, same arguments -> bitwise the same data.

    Returns ShapesData with images (n, image_size, image_size, 3) float32 in [0, 1].
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if not 1 <= objects <= MAX_OBJECTS:
        raise ValueError(f"objects must be between 1 and {MAX_OBJECTS}, got {objects}")
    rng = np.random.default_rng(seed)
    allowed = _pair_indices(pairs)  # (P, 2)

    pair = allowed[rng.integers(len(allowed), size=(n, objects))]  # (n, K, 2)
    shape, colour = pair[..., 0], pair[..., 1]
    size = rng.integers(len(SIZES), size=(n, objects))
    position = _distinct_cells(rng, n, objects)
    centre, radius = _place(rng, position, size, anywhere_in_cell=False)
    rotation = rng.uniform(-ROTATION_JITTER, ROTATION_JITTER, size=(n, objects))
    # Two objects that would touch are moved apart within their own cells (the labels stay
    # as drawn): two large objects in neighbouring cells end up near the far sides.
    redo = np.flatnonzero(_overlapping(centre, radius))
    while len(redo) > 0:
        centre[redo], radius[redo] = _place(rng, position[redo], size[redo], anywhere_in_cell=True)
        redo = redo[_overlapping(centre[redo], radius[redo])]

    # objects of an image in reading order of their cells, so the caption is canonical
    order = np.argsort(position, axis=1)
    shape, colour, size, position, centre, radius, rotation = (
        np.take_along_axis(a, order if a.ndim == 2 else order[..., None], axis=1)
        for a in (shape, colour, size, position, centre, radius, rotation)
    )

    rgb = COLOUR_RGB[colour] + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=(n, objects, 3))
    rgb = np.clip(rgb, 0, 1).astype(np.float32)  # (n, K, 3)
    background = _background_draws(rng, n)

    # The pixels, CHUNK images at a time: the temporaries stay small (all at once, 18k two-object
    # images took 900 MB). The noise is drawn chunk after chunk from the same stream: the same
    # numbers as one draw for all n, so the images are bitwise those of one pass.
    images = np.empty((n, image_size, image_size, 3), dtype=np.float32)
    for start in range(0, n, CHUNK):
        rows = slice(start, min(start + CHUNK, n))
        chunk = images[rows]  # a view: written in place
        chunk[...] = _background_pixels(*(a[rows] for a in background), image_size)  # grey, x3
        for k in range(objects):  # (1 - alpha) * image + alpha * rgb, one object over the other
            alpha = np.stack(
                [
                    _draw_alpha(shape[i, k], centre[i, k], radius[i, k], rotation[i, k], image_size)
                    for i in range(rows.start, rows.stop)
                ]
            )[..., None]  # (chunk, H, W, 1)
            chunk += alpha * (rgb[rows, k, None, None, :] - chunk)
        chunk += NOISE_STD * rng.standard_normal(chunk.shape, dtype=np.float32)
        np.clip(chunk, 0, 1, out=chunk)

    labels = [a[:, 0] if objects == 1 else a for a in (shape, colour, size, position)]
    data = ShapesData(images, *(a.astype(np.int64) for a in labels), captions=[])
    data.captions = [make_caption(data.attributes(i)) for i in range(n)]
    return data


def splits(
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 32,
    objects: int = 1,
    heldout_pairs: Sequence[tuple[str, str]] | None = None,
) -> dict[str, ShapesData]:
    """Train / val / test sets drawn with disjoint seeds.

    The three seeds are children of `np.random.SeedSequence(seed)` (`spawn(3)`), so the
    sets are independent streams and the same seed gives the same three sets.

    heldout_pairs=None: all three sets come from the same distribution (every pair).
    heldout_pairs given (e.g. HELDOUT_PAIRS): the compositional split for zero-shot tests.
      "train" and "val" never contain a held-out (shape, colour) pair, in any object;
      "test" contains ONLY held-out pairs, in every object, so a model is scored on
      combinations it has never seen (val then measures the seen combinations).

    Returns {"train": ShapesData, "val": ShapesData, "test": ShapesData}.
    """
    train_seed, val_seed, test_seed = np.random.SeedSequence(seed).spawn(3)
    seen: list[tuple[str, str]] | None = None
    unseen: list[tuple[str, str]] | None = None
    if heldout_pairs is not None:
        unseen = [tuple(p) for p in heldout_pairs]
        _pair_indices(unseen)  # validates the names
        seen = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in unseen]
        missing = [s for s in SHAPES if all(p[0] != s for p in seen)]
        missing += [c for c in COLOURS if all(p[1] != c for p in seen)]
        if missing:
            raise ValueError(f"heldout_pairs leave no training example of {missing}")
    return {
        "train": make_shapes(n_train, train_seed, image_size, objects, seen),
        "val": make_shapes(n_val, val_seed, image_size, objects, seen),
        "test": make_shapes(n_test, test_seed, image_size, objects, unseen),
    }
