"""Process settings that make a NumPy training step fast, applied only when asked: `tune()`.

`import tinymm` changes nothing outside tinymm. The lessons, `python -m tinymm.bench` and
`tinymm.train.fit` call `tune()`, which applies the settings below, returns what it changed, and
can be undone (`untune(changes)`); call it in your own training script for the same speed.
Four things outside NumPy cost more time than most ops (measured: see the README's performance
section and `python -m tinymm.bench`):

1. glibc's allocator gives large freed blocks back to the operating system and maps them anew on
   the next step: every training step then page-faults through all its activations again.
   Raising the mmap and trim thresholds (mallopt) keeps that memory in the process. The biggest
   single item: a plain process went from ~84 to ~45 ms per ViT step.
2. On a 2-core machine the matmuls of these small models gain little from a second OpenBLAS
   thread, and lose 4-17x as soon as anything else wants a core (measured with
   `python -m tinymm.bench` while other jobs ran). tune() gives OpenBLAS one thread unless
   OPENBLAS_NUM_THREADS is set (TINYMM_BLAS_THREADS=n chooses n). The other cores are used by
   tinymm.parallel instead, whose workers sleep between jobs. This is the setting that touches
   your own code most: your NumPy matmuls in the same process lose their BLAS threads until
   `untune`.
3. A graph is thousands of small Python objects that live for one step and are freed by
   reference counting alone: tinymm makes no reference cycles (tested). CPython's cycle collector
   does not know that: it runs after every 700 new objects and every ~70,000 walks *every* object
   in the process (200,000 with torch or matplotlib loaded), which doubled the time per node
   (4 -> 8 us). tune() raises the first threshold to 10,000: other code's cyclic garbage is still
   collected, a little later.
4. OpenBLAS worker threads spin after each matmul, stealing the CPU from the Python thread.
   `OPENBLAS_THREAD_TIMEOUT` makes them sleep soon; OpenBLAS reads it once, when NumPy loads it,
   so tune() can only set it when called before NumPy is imported (a lesson imports NumPy first;
   with one BLAS thread there is nothing to spin anyway).

TINYMM_NO_TUNING=1 makes tune() a no-op. None of this changes a result, only the time.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from typing import Any

OPT_OUT = "TINYMM_NO_TUNING"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit: blocks up to 32 MiB reuse
TRIM_THRESHOLD = 1 * 2**30  # keep up to 1 GiB of freed memory instead of returning it
GLIBC_DEFAULT_THRESHOLD = 128 * 2**10  # glibc's initial mmap and trim thresholds
GC_THRESHOLD = 10_000  # new container objects between two young collections (CPython: 700)

_applied: dict[str, tuple[Any, Any]] = {}  # what tune() changed: name -> (before, after)


def tune() -> dict[str, tuple[Any, Any]]:
    """Apply the settings above (once per process); return what changed, name -> (before,
    after): "malloc_thresholds", "blas_threads", "gc_threshold", "openblas_thread_timeout"."""
    if _applied or os.environ.get(OPT_OUT):
        return dict(_applied)
    if "numpy" not in sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = "1"
        _applied["openblas_thread_timeout"] = (None, "1")
    if _mallopt(MMAP_THRESHOLD, TRIM_THRESHOLD):
        _applied["malloc_thresholds"] = ("glibc default", (MMAP_THRESHOLD, TRIM_THRESHOLD))
    young, *older = gc.get_threshold()
    if 0 < young < GC_THRESHOLD:  # 0: the collector is off; leave it so
        gc.set_threshold(GC_THRESHOLD, *older)
        _applied["gc_threshold"] = (young, GC_THRESHOLD)
    wanted = os.environ.get("TINYMM_BLAS_THREADS")
    if wanted or "OPENBLAS_NUM_THREADS" not in os.environ:
        before = blas_threads()
        if before is not None and before != int(wanted or 1):
            _applied["blas_threads"] = (before, blas_threads(int(wanted or 1)))
    return dict(_applied)


def untune(changes: dict[str, tuple[Any, Any]] | None = None) -> None:
    """Put back what tune() changed (all of it, or the given `changes`). glibc's thresholds go
    back to their initial 128 KiB (glibc's own dynamic adjustment of them stays off)."""
    changes = dict(_applied) if changes is None else changes
    if "gc_threshold" in changes:
        young, *older = gc.get_threshold()
        gc.set_threshold(changes["gc_threshold"][0], *older)
    if "blas_threads" in changes:
        blas_threads(changes["blas_threads"][0])
    if "malloc_thresholds" in changes:
        _mallopt(GLIBC_DEFAULT_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
    if "openblas_thread_timeout" in changes:
        os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)
    for name in changes:
        _applied.pop(name, None)


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """One line for a log: 'blas_threads 2 -> 1, gc_threshold 700 -> 10000, ...'."""
    return ", ".join(f"{name} {before} -> {after}" for name, (before, after) in changes.items())


_PREFIXES = ("openblas_", "scipy_openblas_", "openblas64_")  # NumPy wheels rename the symbols
_SUFFIXES = ("", "64_")


def _openblas_call(name: str, *args: int, returns: Any = ctypes.c_int) -> Any:
    """Call OpenBLAS's `name` (e.g. "set_num_threads") in the library NumPy loaded, if any; its
    result as the ctypes type `returns`."""
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
                    fn.restype = returns
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


def blas_core() -> str | None:
    """The kernels OpenBLAS runs ("Haswell": AVX2, "SkylakeX": AVX-512, ...), None without
    OpenBLAS. It picks them when NumPy loads it, from the CPU, unless OPENBLAS_CORETYPE names
    them: on an AVX-512 CPU the AVX2 kernels do float32 matmuls at about half the speed."""
    import numpy  # noqa: F401  (loads OpenBLAS)

    name = _openblas_call("get_corename", returns=ctypes.c_char_p)
    return name.decode() if name else None


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
