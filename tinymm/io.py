"""Save and load state dicts as .npz files: atomic writes, and never a pickle.

A state dict is a flat dict name -> array, e.g. "blocks.0.attn.q_proj.weight" -> (D, D) float32
(`Module.state_dict()`, `Optimizer.state_dict()`). An .npz file is a zip archive holding one
.npy file per array ("blocks.0.attn.q_proj.weight.npy"): dtype, shape, then the raw bytes.
NumPy reads it back with `np.load`; so can any other tool.

Two promises:
- `save` writes to a temporary file next to `path`, flushes it to disk, then renames it onto
  `path` (`os.replace` is atomic): a crash mid-save leaves the previous checkpoint whole.
- `load` reads with `allow_pickle=False`: a checkpoint is data, never code. A file that is not an
  .npz of plain arrays is refused with an error that names it and says what was wrong.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from .tensor import Tensor

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members; an empty zip
_NPY_MAGIC = b"\x93NUMPY"


def save(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a dict name -> ndarray (or Tensor: its .data) to `path` as an uncompressed .npz.

    The file is written exactly at `path`: no ".npz" suffix is added (np.savez would add one to
    a name without it), so `load(path)` reads back what `save(sd, path)` wrote.
    Names may contain dots; every value must be a numeric, bool or string array (no objects).
    """
    arrays = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict keys must be strings, got {name!r}")
        array = np.asarray(value.data if isinstance(value, Tensor) else value)
        if array.dtype.hasobject:
            raise TypeError(f"cannot save {name!r}: {type(value).__name__} is not a plain array")
        arrays[name] = array

    path = os.fspath(path)
    temp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"  # same folder, so os.replace is a rename
    try:
        with open(temp, "xb") as file:
            # what np.savez does, with pickling refused (and no clash with its own keywords)
            with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, array in arrays.items():
                    with archive.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, array, allow_pickle=False)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the file itself is already on disk
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an .npz written by `save` (or np.savez) into a dict name -> ndarray, in memory.

    Raises FileNotFoundError if `path` does not exist, and ValueError naming `path` if it is not
    a zip archive (a text file, a pickle, a single .npy), is truncated or corrupt, or holds
    anything but plain arrays (object arrays would need unpickling, which is never done).
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        head = file.read(8)
        if head[:4] not in _ZIP_MAGIC:
            raise ValueError(f"cannot load {path!r}: not an .npz file ({_what_is(head)})")
        file.seek(0)
        try:
            with np.load(file, allow_pickle=False) as archive:
                state_dict = {name: archive[name] for name in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"cannot load {path!r}: corrupt or foreign .npz ({err})") from err
    for name, value in state_dict.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"cannot load {path!r}: member {name!r} is not a .npy array")
    return state_dict


def _what_is(head: bytes) -> str:
    if head.startswith(_NPY_MAGIC):
        return "it is a single .npy array, not a dict of them"
    if head[:1] == b"\x80":
        return "it looks like a pickle, which tinymm never loads"
    if not head:
        return "it is empty"
    return f"it starts with {head!r}"


__all__ = ["load", "save"]
