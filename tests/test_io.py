"""Checkpoints: .npz round trips, atomic saves, and loads that refuse anything but plain arrays."""

import os
import pickle
import zipfile

import numpy as np
import pytest

import tinymm as tm
from tinymm import io

STATE = {
    "blocks.0.attn.q_proj.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "blocks.0.attn.q_proj.bias": np.array([1e-300, -2.5, np.inf, np.nan]),  # float64
    "pos_embedding": np.zeros((1, 5, 2), dtype=np.float32),
    "optim.state.0.step": np.array(7, dtype=np.int64),
    "mask": np.array([[True, False], [False, True]]),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "file": np.array([1, 2], dtype=np.int64),  # a name np.savez(file, **kwds) could not take
    "allow_pickle": np.array(1.5),
}


def test_round_trip_keeps_names_dtypes_shapes_and_values(tmp_path):
    path = tmp_path / "model.ckpt"
    io.save(STATE, path)
    assert os.listdir(tmp_path) == ["model.ckpt"]  # exactly at `path`: no ".npz" appended
    loaded = io.load(path)
    assert list(loaded) == list(STATE)
    for name, want in STATE.items():
        got = loaded[name]
        assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert {k: v.dtype for k, v in np.load(path).items()} == {k: v.dtype for k, v in STATE.items()}


def test_tensors_are_saved_as_their_data(tmp_path):
    weight = tm.tensor(np.ones((2, 3), np.float32), requires_grad=True)
    io.save({"weight": weight, "step": 3}, tmp_path / "sd.npz")
    loaded = io.load(tmp_path / "sd.npz")
    assert loaded["weight"].dtype == np.float32 and np.array_equal(loaded["weight"], weight.data)
    assert loaded["step"] == 3


def test_empty_state_dict_round_trips(tmp_path):
    io.save({}, tmp_path / "empty.npz")
    assert io.load(tmp_path / "empty.npz") == {}


def test_loaded_arrays_outlive_the_file(tmp_path):
    path = tmp_path / "sd.npz"
    io.save(STATE, path)
    loaded = io.load(path)
    os.remove(path)  # nothing is memory-mapped or read lazily
    np.testing.assert_array_equal(loaded["pos_embedding"], STATE["pos_embedding"])


# --- a failed save never destroys the previous checkpoint --------------------------------------


def previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    io.save({"w": np.ones(3, np.float32)}, path)
    return path


def assert_previous_intact(path):
    assert os.listdir(path.parent) == [path.name]  # and no temporary file left behind
    assert np.array_equal(io.load(path)["w"], np.ones(3, np.float32))


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_half_way_through_a_save_leaves_the_previous_file(tmp_path, monkeypatch, error):
    path = previous_checkpoint(tmp_path)
    real_write_array = np.lib.format.write_array
    written = []

    def write_then_crash(member, array, **kwargs):
        if written:
            raise error
        written.append(array)
        real_write_array(member, array, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_then_crash)
    with pytest.raises(type(error)):
        io.save({"w": np.zeros(3, np.float32), "b": np.zeros(2)}, path)
    assert len(written) == 1  # the crash did come half way
    monkeypatch.undo()
    assert_previous_intact(path)


def test_crash_before_the_rename_leaves_the_previous_file(tmp_path, monkeypatch):
    path = previous_checkpoint(tmp_path)

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        io.save({"w": np.zeros(3, np.float32)}, path)
    monkeypatch.undo()
    assert_previous_intact(path)


@pytest.mark.parametrize(
    "bad", [np.array([{"a": 1}, None], dtype=object), {"nested": np.ones(2)}, None]
)
def test_unserialisable_value_is_refused_and_leaves_the_previous_file(tmp_path, bad):
    path = previous_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="'w'"):
        io.save({"w": bad}, path)
    assert_previous_intact(path)


def test_file_is_synced_to_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    path = previous_checkpoint(tmp_path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    io.save({"w": np.zeros(3, np.float32)}, path)
    assert events[:2] == ["fsync", "replace"]
    assert np.array_equal(io.load(path)["w"], np.zeros(3, np.float32))


# --- loading refuses what is not a plain .npz, and says which file ----------------------------


class MakesMarker:
    """Unpickling this creates a file: proof that load() ran pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_missing_file_raises_file_not_found_with_the_path(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        io.load(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"step,loss\n1,0.5\n", "starts with"),
        (b"", "empty"),
        (b"\x93NUMPY", "single .npy"),
    ],
)
def test_foreign_files_are_refused_with_the_path(tmp_path, content, reason):
    path = tmp_path / "weights.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason) as err:
        io.load(path)
    assert str(path) in str(err.value)


def test_single_npy_file_is_refused(tmp_path):
    path = tmp_path / "weights.npz"
    with open(path, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(ValueError, match="single .npy") as err:
        io.load(path)
    assert str(path) in str(err.value)


def test_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.npz"
    path.write_bytes(pickle.dumps({"w": MakesMarker(marker)}))
    with pytest.raises(ValueError, match="pickle") as err:
        io.load(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_npz_with_an_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.npz"
    np.savez(path, w=np.ones(2), evil=np.array([MakesMarker(marker)], dtype=object))
    with pytest.raises(ValueError) as err:
        io.load(path)
    assert str(path) in str(err.value) and "pickle" in str(err.value)
    assert not marker.exists()


def test_truncated_file_is_refused_with_the_path(tmp_path):
    path = tmp_path / "weights.npz"
    io.save(STATE, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a non-atomic save could leave after a crash
    with pytest.raises(ValueError, match="corrupt") as err:
        io.load(path)
    assert str(path) in str(err.value)


def test_flipped_bytes_are_detected(tmp_path):
    path = tmp_path / "weights.npz"
    io.save({"w": np.arange(1000, dtype=np.float32)}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the array's bytes: only the zip CRC can tell
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt") as err:
        io.load(path)
    assert str(path) in str(err.value)


def test_zip_of_non_arrays_is_refused(tmp_path):
    path = tmp_path / "weights.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not an array")
    with pytest.raises(ValueError, match="readme.txt") as err:
        io.load(path)
    assert str(path) in str(err.value)
