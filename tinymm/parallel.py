"""The cores for the big matmuls and elementwise kernels: all of tinymm's threading is here.

`tinymm.runtime.tune()` gives OpenBLAS one thread (runtime.py explains why), so by itself a step
would use one core. NumPy releases the GIL inside its loops and BLAS calls, so several Python
threads can each do a share of the rows at the same time. Three functions do that, for the ops
worth it:

    matmul(a, b, bias)    a @ b + bias, the rows of a (or the leading axis of both) in shares
    rows(kernel, like)    kernel(slice) for each share of the rows of `like`: the first share on
                          this thread, the others on workers; kernel(...) once when small
    both(f, g, macs)      f() here and g() on a worker: two independent jobs at once

A kernel reads and writes only its own rows of arrays made before the call, so which thread did
which share changes nothing: every output element is computed by the same code either way (up to
float32 rounding where BLAS picks another kernel for a smaller product). Tested with 1, 2, 3 and
4 threads, also with more threads than cores.

How many: as many as the process may run on (its CPU affinity: a container or `taskset` may allow
fewer than the machine has); TINYMM_THREADS=n caps it, `set_threads(n)` sets it.

Handing work to a worker costs ~30 us (waking it), and while threads run, every NumPy call of a
kernel hands the GIL around (~10-30 us each time). So only big jobs are split: matmuls of
MIN_MACS multiply-adds or more (one long call), and elementwise kernels over MIN_SIZE elements
or more (each of their calls long enough: attention's softmax, not a layer norm), and into no
more shares than that size pays for. Measured on 2 cores: the ViT step of tinymm.bench 88 -> 62
ms with two threads. On more cores expect the matmuls (one long GIL-free call per share) to
keep scaling and the elementwise kernels less so (their short calls queue for the GIL).
Workers sleep between jobs (no spinning, unlike BLAS threads): with another process busy on one
of two cores, that ViT step took ~10% longer on two threads than on one (98 vs 90 ms), where two
OpenBLAS threads were 4-17x slower.
TINYMM_THREADS=1, or `set_threads(1)`, keeps everything on the calling thread. So does a
debugger: while a trace function is set (pdb, an IDE) or in reference mode (tinymm/modes.py),
every op runs on the calling thread, so a breakpoint in a kernel or a backward is hit and sees
all the rows.
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


def _default_threads() -> int:
    wanted = os.environ.get("TINYMM_THREADS", "")
    cap = int(wanted) if wanted.isdigit() and int(wanted) > 0 else _cores()
    return max(1, min(cap, _cores()))


_threads = _default_threads()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_local = threading.local()


def set_threads(n: int) -> None:
    """Use n threads (1: the calling thread only) for big matmuls and fused kernels. n may
    exceed the cores (then the shares wait for each other, with the same results)."""
    global _threads
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_threads: n must be a positive integer, got {n!r}")
    _threads = n


def threads() -> int:
    """How many threads tinymm's ops use."""
    return _threads


A, B = TypeVar("A"), TypeVar("B")
Index = slice | EllipsisType  # a half of the rows, or ... for all of them


def rows(kernel: Callable[[Index], object], like: np.ndarray) -> None:
    """kernel(index) over the rows (first axis) of arrays shaped as `like`: one call per share
    of the rows, on as many threads as `like`'s size pays for (MIN_SIZE / 2 elements or more
    per share); a `like` under MIN_SIZE elements is one call kernel(...)."""
    n = like.shape[0] if like.ndim else 1
    _run(kernel, n, 2 * like.size // MIN_SIZE if MIN_SIZE else n)  # shares >= MIN_SIZE / 2


def matmul(
    a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """a @ b (+ bias, added to every row), into `out` if given, in shares over the threads: rows
    of a 2-D `a`, or the leading axis when a and b have the same batch shape. Small products and
    broadcast batches are one np.matmul."""
    macs = a.size * b.shape[-1] if a.ndim >= 1 and b.ndim >= 1 else 0  # multiply-adds
    if (
        a.ndim < 2
        or macs < MIN_MACS
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
    batched = a.ndim > 2  # then each share is a slice of the batch of both operands

    def kernel(r: Index) -> None:
        np.matmul(a[r], b[r] if batched else b, out=out[r])
        if bias is not None:
            out[r] += bias

    _run(kernel, a.shape[0], 2 * macs // MIN_MACS if MIN_MACS else a.shape[0])
    return out


def both(first: Callable[[], A], second: Callable[[], B], macs: int) -> tuple[A, B]:
    """(first(), second()), with second() on a worker thread while first() runs on this one
    when the two jobs are big (`macs`: multiply-adds of each). For two independent products of
    the same size, such as the input and weight gradients of a matmul."""
    if macs < MIN_MACS or not _may_split():
        return first(), second()
    other = _worker().submit(second)
    return first(), other.result()


def _may_split() -> bool:
    """Several threads may be used now: not set to one, not already on a worker (a kernel that
    calls rows() again runs it there alone), no debugger and not in reference mode."""
    return _threads > 1 and not getattr(_local, "worker", False) and not modes.single_threaded()


def _run(kernel: Callable[[Index], object], n: int, worth: int) -> None:
    """kernel over n rows in min(threads, n, worth) shares; this thread does the first, which
    is a little bigger (a worker starts ~30 us late, waking up)."""
    shares = min(_threads, n, worth)
    if shares < 2 or not _may_split():
        kernel(...)
        return
    weights = np.array([1.2] + [1.0] * (shares - 1))
    bounds = [int(b) for b in np.cumsum(weights) / weights.sum() * n]
    bounds[-1] = n
    starts = [0, *bounds[:-1]]
    pool = _worker()
    others = [pool.submit(kernel, slice(s, e)) for s, e in zip(starts[1:], bounds[1:], strict=True)]
    kernel(slice(0, bounds[0]))
    for other in others:
        other.result()  # wait for every worker's share (and raise its error, if any)


def _worker() -> ThreadPoolExecutor:
    """The pool of threads - 1 workers (made anew when set_threads changed the count)."""
    global _pool, _pool_size
    if _pool is None or _pool_size != _threads - 1:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool_size = max(_threads - 1, 1)
        _pool = ThreadPoolExecutor(
            _pool_size, thread_name_prefix="tinymm", initializer=_mark_worker
        )
    return _pool


def _mark_worker() -> None:
    _local.worker = True  # a kernel that calls rows() again runs it on this thread alone


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has no worker thread: it starts its own when needed


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
