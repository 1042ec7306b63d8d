"""Mini-batches of aligned arrays."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def batches(
    arrays: Sequence[np.ndarray],
    batch_size: int,
    shuffle: bool = True,
    rng: np.random.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, ...]]:
    """One pass over aligned arrays (same first axis) in batches of `batch_size`.

    With shuffle, the order is a permutation drawn from `rng` (seeded generator: reproducible).
    The last batch may be smaller unless drop_last.
    """
    n = len(arrays[0])
    for a in arrays:
        if len(a) != n:
            raise ValueError(f"batches: arrays differ in length: {[len(a) for a in arrays]}")
    if batch_size <= 0:
        raise ValueError(f"batches: batch_size must be positive, got {batch_size}")
    order = (rng or np.random.default_rng()).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield tuple(a[idx] for a in arrays)
