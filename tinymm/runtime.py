"""Process settings that make a NumPy training step fast, applied once when tinymm is imported.

Two things outside NumPy cost more time than most ops (measured: see the README's performance
section and `python -m tinymm.bench`):

1. OpenBLAS worker threads spin, waiting for the next matmul, long after each one ends, so they
   steal the CPU from the Python thread. `OPENBLAS_THREAD_TIMEOUT` makes them sleep soon. It is
   read when OpenBLAS loads, so it only works when tinymm is imported before NumPy.
2. glibc's allocator gives large freed blocks back to the operating system and maps them anew on
   the next step: every training step then page-faults through all its activations again.
   Raising the mmap and trim thresholds (mallopt) keeps that memory in the process.

Set TINYMM_NO_TUNING=1 to leave both alone. Neither changes any result, only the time.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT = "TINYMM_NO_TUNING"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit: blocks up to 32 MiB reuse
TRIM_THRESHOLD = 1 * 2**30  # keep up to 1 GiB of freed memory instead of returning it

applied: dict[str, bool] = {}


def apply() -> dict[str, bool]:
    """Apply the settings (once); return which took effect."""
    if applied or os.environ.get(OPT_OUT):
        return applied
    if "numpy" not in sys.modules:  # OpenBLAS reads it once, when NumPy loads it
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")
    applied["openblas_thread_timeout"] = "OPENBLAS_THREAD_TIMEOUT" in os.environ
    applied["malloc_thresholds"] = _mallopt()
    return applied


def _mallopt() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
