"""Two cores for the big matmuls and elementwise kernels: all of tinymm's threading is here.

`tinymm.runtime.tune()` gives OpenBLAS one thread (runtime.py explains why), so by itself a step
would use one core of a laptop. NumPy releases the GIL inside its loops and BLAS calls, so two
Python threads can each do half of the rows at the same time. Three functions do that, for the
ops worth it:

    matmul(a, b, bias)    a @ b + bias, the rows of a (or the leading axis of both) split in two
    rows(kernel, like)    kernel(slice(h, n)) on a worker thread, kernel(slice(0, h)) on this
                          one, n = len(like), h ~ n / 2; kernel(...) once (all rows) when small
    both(f, g, macs)      f() here and g() on the worker: two independent jobs at once

A kernel reads and writes only its own rows of arrays made before the call, so which thread did
which half changes nothing: every output element is computed by the same code either way (up to
float32 rounding where BLAS picks another kernel for a smaller product).

Handing work to the worker costs ~30 us (waking it), and while both threads run, every NumPy
call of a kernel hands the GIL back and forth (~10-30 us each time). So only big jobs are split:
matmuls of MIN_MACS multiply-adds or more (one long call), and elementwise kernels over MIN_SIZE
elements or more (each of their calls long enough: attention's softmax, not a layer norm).
The worker sleeps between jobs (no spinning, unlike BLAS threads): with another process busy on
one of two cores, the ViT training step of tinymm.bench took ~10% longer on two threads than on
one (98 vs 90 ms; idle: 62 vs 90 ms), where two OpenBLAS threads were 4-17x slower.
TINYMM_THREADS=1, or `set_threads(1)`, keeps everything on the calling thread (as on a machine
with a single core). So does a debugger: while a trace function is set (pdb, an IDE) or in
reference mode (tinymm/modes.py), every op runs on the calling thread, so a breakpoint in a
kernel or a backward is hit and sees all the rows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import EllipsisType
from typing import TypeVar

import numpy as np

from . import modes

MIN_SIZE = 2**19  # elements of an elementwise kernel worth splitting (see above)
MIN_MACS = 2**22  # multiply-adds of a matmul worth splitting (~0.1 ms of work)


def _cores() -> int:
    """The cores this process may run on (a container or `taskset` may allow fewer than exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_threads = 1 if os.environ.get("TINYMM_THREADS") == "1" or _cores() < 2 else 2
_pool: ThreadPoolExecutor | None = None
_local = threading.local()


def set_threads(n: int) -> None:
    """Use 1 (the calling thread only) or 2 threads for big matmuls and fused kernels."""
    global _threads
    if n not in (1, 2):
        raise ValueError(f"tinymm splits work over 1 or 2 threads, got {n}")
    _threads = n


def threads() -> int:
    """How many threads tinymm's ops use (1 or 2)."""
    return _threads


A, B = TypeVar("A"), TypeVar("B")
Index = slice | EllipsisType  # a half of the rows, or ... for all of them


def rows(kernel: Callable[[Index], object], like: np.ndarray) -> None:
    """kernel(index) over the rows (first axis) of arrays shaped as `like`: two calls, with the
    halves, on two threads when `like` has MIN_SIZE elements or more; else one call kernel(...)."""
    _run(kernel, like.shape[0] if like.ndim else 1, like.size >= MIN_SIZE)


def matmul(
    a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """a @ b (+ bias, added to every row), into `out` if given, on two threads: rows of a 2-D
    `a`, or the leading axis when a and b have the same batch shape. Small products and
    broadcast batches are one np.matmul."""
    if (
        a.ndim < 2
        or a.size * b.shape[-1] < MIN_MACS  # a.size * N multiply-adds
        or a.ndim != b.ndim
        or a.shape[:-2] != b.shape[:-2]
        or not _may_split()
    ):
        out = np.matmul(a, b, out=out)
        if bias is not None:
            out += bias
        return out
    if out is None:
        out = np.empty((*a.shape[:-1], b.shape[-1]), np.result_type(a, b))
    batched = a.ndim > 2  # then each half is a slice of the batch of both operands

    def kernel(r: Index) -> None:
        np.matmul(a[r], b[r] if batched else b, out=out[r])
        if bias is not None:
            out[r] += bias

    _run(kernel, a.shape[0], True)
    return out


def both(first: Callable[[], A], second: Callable[[], B], macs: int) -> tuple[A, B]:
    """(first(), second()), with second() on the worker thread while first() runs on this one
    when the two jobs are big (`macs`: multiply-adds of each). For two independent products of
    the same size, such as the input and weight gradients of a matmul."""
    if macs < MIN_MACS or not _may_split():
        return first(), second()
    other = _worker().submit(second)
    return first(), other.result()


def _may_split() -> bool:
    """Two threads may be used now: not set to one, not already on the worker (a kernel that
    calls rows() again runs it there alone), no debugger and not in reference mode."""
    return _threads > 1 and not getattr(_local, "worker", False) and not modes.single_threaded()


def _run(kernel: Callable[[Index], object], n: int, big: bool) -> None:
    if n < 2 or not big or not _may_split():
        kernel(...)
        return
    half = int(n * 0.55)  # the worker starts ~30 us late (waking up): give it a bit less
    other = _worker().submit(kernel, slice(half, n))
    kernel(slice(0, half))
    other.result()  # wait for the worker's half (and raise its error, if any)


def _worker() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="tinymm", initializer=_mark_worker)
    return _pool


def _mark_worker() -> None:
    _local.worker = True  # a kernel that calls rows() again runs it on this thread alone


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has no worker thread: it starts its own when needed


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
