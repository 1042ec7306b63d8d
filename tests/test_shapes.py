"""Tests for tinymm.data.shapes: determinism, what is drawn matches the labels, captions round
trip, the compositional split holds out what it says, classes are balanced."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

from tinymm.data.shapes import (
    COLOUR_RGB,
    COLOURS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    ShapesData,
    make_caption,
    make_shapes,
    parse_caption,
    splits,
)

seeds = st.integers(0, 2**32 - 1)
image_sizes = st.integers(16, 64)
object_counts = st.sampled_from([1, 2])


def object_mask(image: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """Pixels far from the background, judged from the picture alone: (H, W) bool.

    The background is estimated as the per-channel median (objects cover well under half).
    """
    background = np.median(image.reshape(-1, 3), axis=0)
    return np.abs(image - background).max(axis=-1) > threshold


def cell_of(ys: np.ndarray, xs: np.ndarray, image_size: int) -> int:
    """3x3 grid cell (index into POSITIONS) holding the centroid of the given pixels."""
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # pixel i covers [i, i + 1)
    return int(cy * 3 // image_size) * 3 + int(cx * 3 // image_size)


def nearest_colour(rgb: np.ndarray) -> int:
    return int(np.argmin(np.linalg.norm(COLOUR_RGB - rgb, axis=1)))


def as_tuple(data: ShapesData):
    return (data.images, data.shape, data.colour, data.size, data.position, data.captions)


# ---- determinism and seeds -----------------------------------------------------------------


@given(seed=seeds, image_size=image_sizes, objects=object_counts)
def test_same_seed_gives_bitwise_identical_data(seed, image_size, objects):
    a = make_shapes(6, seed=seed, image_size=image_size, objects=objects)
    b = make_shapes(6, seed=seed, image_size=image_size, objects=objects)
    assert a.images.tobytes() == b.images.tobytes()
    for x, y in zip(as_tuple(a)[1:5], as_tuple(b)[1:5], strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.captions == b.captions


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_images_do_not_depend_on_how_many_are_composed_at_a_time(chunk, monkeypatch):
    """make_shapes composes CHUNK images at a time (to bound its memory) and draws their noise
    chunk after chunk: the same pixels, bitwise, as all at once."""
    from tinymm.data import shapes

    whole = make_shapes(10, seed=3, objects=2)
    monkeypatch.setattr(shapes, "CHUNK", chunk)
    chunked = make_shapes(10, seed=3, objects=2)
    assert chunked.images.tobytes() == whole.images.tobytes()
    assert chunked.captions == whole.captions


@given(seed=seeds)
def test_different_seeds_give_different_data(seed):
    a = make_shapes(20, seed=seed)
    b = make_shapes(20, seed=seed + 1)
    assert not np.array_equal(a.images, b.images)
    assert a.captions != b.captions


def test_splits_use_disjoint_seeds_and_are_reproducible():
    sets = splits(300, 100, 300, seed=5)
    again = splits(300, 100, 300, seed=5)
    assert [len(sets[k]) for k in ("train", "val", "test")] == [300, 100, 300]
    for key in sets:
        assert sets[key].images.tobytes() == again[key].images.tobytes()
        assert sets[key].captions == again[key].captions
    seen = {image.tobytes() for image in sets["train"].images}
    for key in ("val", "test"):
        assert not seen & {image.tobytes() for image in sets[key].images}
    # the three streams differ from the start, not just somewhere
    firsts = {sets[key].captions[0] + sets[key].captions[1] for key in sets}
    assert len(firsts) == 3
    assert sets["train"].images.tobytes() != splits(300, 0, 0, seed=6)["train"].images.tobytes()


# ---- arrays --------------------------------------------------------------------------------


@given(image_size=image_sizes, objects=object_counts, seed=seeds)
def test_images_are_float32_channels_last_in_unit_range(image_size, objects, seed):
    data = make_shapes(5, seed=seed, image_size=image_size, objects=objects)
    assert data.images.shape == (5, image_size, image_size, 3)
    assert data.images.dtype == np.float32
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    labels_shape = (5,) if objects == 1 else (5, objects)
    for labels, names in [
        (data.shape, SHAPES),
        (data.colour, COLOURS),
        (data.size, SIZES),
        (data.position, POSITIONS),
    ]:
        assert labels.shape == labels_shape and labels.dtype == np.int64
        assert labels.min() >= 0 and labels.max() < len(names)
    assert len(data) == 5 and data.objects == objects and len(data.captions) == 5


@pytest.mark.parametrize("image_size", [16, 32, 48])
def test_the_object_stands_out_from_a_grey_background(image_size):
    data = make_shapes(60, seed=1, image_size=image_size)
    for image in data.images:
        mask = object_mask(image)
        assert 0 < mask.sum() < 0.3 * image_size**2
        background = image[~object_mask(image, threshold=0.15)]
        # neutral grey: channels agree, so no background is confusable with a named colour
        assert np.abs(background.mean(axis=0) - background.mean()).max() < 0.02
        assert background.mean() < 0.45


def test_bad_arguments_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="image_size"):
        make_shapes(2, image_size=12)
    with pytest.raises(ValueError, match="objects"):
        make_shapes(2, objects=3)
    with pytest.raises(ValueError, match="pair"):
        make_shapes(2, pairs=[("circle", "purple")])
    with pytest.raises(ValueError, match="circle"):
        splits(10, 10, 10, heldout_pairs=[("circle", c) for c in COLOURS])


def test_subset_selects_matching_images_labels_and_captions():
    data = make_shapes(10, seed=2, objects=2)
    for index in ([7, 2, 2], np.arange(10) % 3 == 0, slice(1, 8, 3)):
        part = data.subset(index)
        picked = np.arange(10)[index]
        np.testing.assert_array_equal(part.images, data.images[picked])
        np.testing.assert_array_equal(part.position, data.position[picked])
        assert part.captions == [data.captions[i] for i in picked]
        assert [part.attributes(j) for j in range(len(part))] == [
            data.attributes(i) for i in picked
        ]


# ---- what is drawn matches the labels --------------------------------------------------------


@pytest.mark.parametrize("image_size", [24, 32, 48])
def test_one_object_has_its_named_colour_and_cell(image_size):
    data = make_shapes(300, seed=3, image_size=image_size)
    for i, image in enumerate(data.images):
        ys, xs = np.nonzero(object_mask(image))
        assert cell_of(ys, xs, image_size) == data.position[i], data.captions[i]
        core = object_mask(image, threshold=0.45)
        assert nearest_colour(image[core].mean(axis=0)) == data.colour[i], data.captions[i]


def test_two_objects_are_apart_in_their_named_cells_with_their_colours():
    image_size = 32
    data = make_shapes(300, seed=4, image_size=image_size, objects=2)
    assert np.all(data.position[:, 0] < data.position[:, 1])  # reading order
    for i, image in enumerate(data.images):
        components, count = ndimage.label(object_mask(image))
        # an anti-aliased star tip may touch its star only at a corner: drop specks
        pieces = [c for c in range(1, count + 1) if (components == c).sum() > 3]
        assert len(pieces) == 2, data.captions[i]  # two objects that do not touch
        found = {}
        for c in pieces:
            ys, xs = np.nonzero(components == c)
            core = (components == c) & object_mask(image, threshold=0.45)
            found[cell_of(ys, xs, image_size)] = nearest_colour(image[core].mean(axis=0))
        assert found == dict(zip(data.position[i], data.colour[i], strict=True)), data.captions[i]


def test_large_objects_cover_more_pixels_than_small_ones_of_the_same_shape():
    data = make_shapes(600, seed=5)
    area = np.array([object_mask(image).sum() for image in data.images])
    for s, name in enumerate(SHAPES):
        small = area[(data.shape == s) & (data.size == SIZES.index("small"))]
        large = area[(data.shape == s) & (data.size == SIZES.index("large"))]
        assert len(small) > 10 and len(large) > 10
        assert large.min() > small.max(), name


def centred_masks(data: ShapesData, half: int) -> np.ndarray:
    """Each image's object mask, cut out around its centroid: (N, 2 half + 1, 2 half + 1)."""
    out = np.zeros((len(data), 2 * half + 1, 2 * half + 1), dtype=np.float32)
    for i, image in enumerate(data.images):
        mask = np.pad(object_mask(image), half)
        ys, xs = np.nonzero(mask)
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        out[i] = mask[cy - half : cy + half + 1, cx - half : cx + half + 1]
    return out


def test_shapes_are_recognisable_by_a_template_classifier_at_both_sizes():
    """Nearest mean mask (one template per shape and size) on held-out images: chance is 1/6."""
    train, test = make_shapes(1200, seed=6), make_shapes(600, seed=7)
    half = 8
    train_masks, test_masks = centred_masks(train, half), centred_masks(test, half)
    keys = [(s, z) for s in range(len(SHAPES)) for z in range(len(SIZES))]
    templates = np.stack(
        [train_masks[(train.shape == s) & (train.size == z)].mean(axis=0) for s, z in keys]
    )  # (12, 17, 17)
    distance = ((test_masks[:, None] - templates[None]) ** 2).sum(axis=(2, 3))  # (N, 12)
    predicted = np.array([keys[k][0] for k in distance.argmin(axis=1)])
    for z, name in enumerate(SIZES):
        accuracy = (predicted == test.shape)[test.size == z].mean()
        assert accuracy > 0.9, f"{name}: template accuracy {accuracy:.2f}"


# ---- captions ----------------------------------------------------------------------------------


@given(seed=seeds, objects=object_counts)
def test_captions_parse_back_to_the_labels(seed, objects):
    data = make_shapes(8, seed=seed, objects=objects)
    for i, caption in enumerate(data.captions):
        objects_ = parse_caption(caption)
        assert objects_ == data.attributes(i)
        assert make_caption(objects_) == caption
        labels = np.atleast_1d(data.shape[i]), np.atleast_1d(data.colour[i])
        assert [o.shape for o in objects_] == [SHAPES[s] for s in labels[0]]
        assert [o.colour for o in objects_] == [COLOURS[c] for c in labels[1]]


def test_caption_wording():
    one = (Attributes("circle", "red", "large", "top left"),)
    assert make_caption(one) == "a large red circle in the top left"
    two = (Attributes("star", "blue", "small", "top right"),) + one
    caption = "a small blue star in the top right and a large red circle in the top left"
    assert make_caption(two) == caption
    assert parse_caption(caption) == two


@pytest.mark.parametrize(
    "caption",
    ["a huge red circle in the top", "red circle", "a large red blob in the center", ""],
)
def test_malformed_captions_raise(caption):
    with pytest.raises(ValueError):
        parse_caption(caption)


# ---- compositional split -----------------------------------------------------------------------


def pairs_of(data: ShapesData) -> set[tuple[str, str]]:
    return {(SHAPES[s], COLOURS[c]) for s, c in zip(data.shape.flat, data.colour.flat, strict=True)}


def caption_pairs(data: ShapesData) -> set[tuple[str, str]]:
    return {(o.shape, o.colour) for c in data.captions for o in parse_caption(c)}


@pytest.mark.parametrize("objects", [1, 2])
def test_compositional_split_holds_out_pairs_from_training(objects):
    sets = splits(1500, 200, 300, seed=8, objects=objects, heldout_pairs=HELDOUT_PAIRS)
    heldout = set(HELDOUT_PAIRS)
    for key in ("train", "val"):
        assert not pairs_of(sets[key]) & heldout
        assert not caption_pairs(sets[key]) & heldout
    assert pairs_of(sets["test"]) == heldout == caption_pairs(sets["test"])
    train = sets["train"]
    assert set(np.unique(train.shape)) == set(range(len(SHAPES)))
    assert set(np.unique(train.colour)) == set(range(len(COLOURS)))
    # every other pair is seen in training
    assert len(pairs_of(train)) == len(SHAPES) * len(COLOURS) - len(heldout)


def test_pairs_restricts_what_is_drawn():
    data = make_shapes(50, seed=9, pairs=[("heart", "orange"), ("cross", "white")])
    assert pairs_of(data) == {("heart", "orange"), ("cross", "white")}


# ---- balance -------------------------------------------------------------------------------


@pytest.mark.parametrize("objects", [1, 2])
def test_class_counts_are_balanced(objects):
    data = make_shapes(5000, seed=10, objects=objects)
    data.images = None  # only the labels matter here
    for labels, names in [
        (data.shape, SHAPES),
        (data.colour, COLOURS),
        (data.size, SIZES),
        (data.position, POSITIONS),
    ]:
        counts = np.bincount(labels.ravel(), minlength=len(names))
        expected = labels.size / len(names)
        assert np.all(np.abs(counts - expected) < 0.2 * expected), (names, counts)
    # size does not depend on the cell (two large objects in neighbouring cells still fit)
    for cell in range(len(POSITIONS)):
        large = data.size[data.position == cell] == SIZES.index("large")
        assert 0.4 < large.mean() < 0.6, POSITIONS[cell]
