"""Process settings that make a NumPy training step fast, applied once when tinymm is imported.

Two things outside NumPy cost more time than most ops (measured: see the README's performance
section and `python -m tinymm.bench`):

1. OpenBLAS worker threads spin, waiting for the next matmul, long after each one ends, so they
   steal the CPU from the Python thread. `OPENBLAS_THREAD_TIMEOUT` makes them sleep soon. It is
   read when OpenBLAS loads, so it only works when tinymm is imported before NumPy.
2. glibc's allocator gives large freed blocks back to the operating system and maps them anew on
   the next step: every training step then page-faults through all its activations again.
   Raising the mmap and trim thresholds (mallopt) keeps that memory in the process.

3. On a 2-core machine the matmuls of these small models gain little from a second OpenBLAS
   thread, and lose 4-17x as soon as anything else wants a core (measured with
   `python -m tinymm.bench` while other jobs ran). tinymm asks OpenBLAS for one thread
   unless OPENBLAS_NUM_THREADS is set; TINYMM_BLAS_THREADS=n (or `blas_threads(n)`) chooses.
   The second core is used by tinymm.parallel instead, whose worker sleeps between jobs.
4. A graph is thousands of small Python objects (tensors, nodes, closures) that live for one step
   and are freed by reference counting alone: tinymm makes no reference cycles (tested). CPython's
   cycle collector does not know that. It runs after every 700 new objects, promotes the graph
   being built to older generations, and every ~70,000 objects walks *every* object in the
   process: with torch or matplotlib loaded, 200,000 of them. On a chain of tiny ops that doubled
   the time per node (4 -> 8 us). tinymm raises the first threshold from 700 to 10,000, so the
   collector runs 14x less often; other code's cyclic garbage is still collected, a little later.

Set TINYMM_NO_TUNING=1 to leave all of this alone. None of it changes a result, only the time.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

OPT_OUT = "TINYMM_NO_TUNING"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit: blocks up to 32 MiB reuse
TRIM_THRESHOLD = 1 * 2**30  # keep up to 1 GiB of freed memory instead of returning it
GC_THRESHOLD = 10_000  # new container objects between two young collections (CPython: 700)

applied: dict[str, bool] = {}


def apply() -> dict[str, bool]:
    """Apply the settings (once); return which took effect."""
    if applied or os.environ.get(OPT_OUT):
        return applied
    if "numpy" not in sys.modules:  # OpenBLAS reads it once, when NumPy loads it
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")
    applied["openblas_thread_timeout"] = "OPENBLAS_THREAD_TIMEOUT" in os.environ
    applied["malloc_thresholds"] = _mallopt()
    young, *older = gc.get_threshold()
    if 0 < young < GC_THRESHOLD:  # 0: the collector is off; leave it so
        gc.set_threshold(GC_THRESHOLD, *older)
    applied["gc_threshold"] = gc.get_threshold()[0] >= GC_THRESHOLD
    threads = os.environ.get("TINYMM_BLAS_THREADS")
    if threads or "OPENBLAS_NUM_THREADS" not in os.environ:
        applied["blas_threads"] = blas_threads(int(threads or 1)) == int(threads or 1)
    return applied


_PREFIXES = ("openblas_", "scipy_openblas_", "openblas64_")  # NumPy wheels rename the symbols
_SUFFIXES = ("", "64_")


def _openblas_call(name: str, *args: int) -> int | None:
    """Call OpenBLAS's `name` (e.g. "set_num_threads") in the library NumPy loaded, if any."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in _PREFIXES:
            for suffix in _SUFFIXES:
                fn = getattr(lib, f"{prefix}{name}{suffix}", None)
                if fn is not None:
                    return fn(*args)
    return None


def blas_threads(n: int | None = None) -> int | None:
    """The number of threads OpenBLAS uses for NumPy's matmuls; with `n`, set it first.

    None when NumPy does not use OpenBLAS (then the setting is left to that library).
    """
    import numpy  # noqa: F401  (loads OpenBLAS)

    if n is not None:
        _openblas_call("set_num_threads", int(n))
    return _openblas_call("get_num_threads")


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
