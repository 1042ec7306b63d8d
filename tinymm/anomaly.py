"""Anomaly detection: which op first made a NaN or an infinity, and where it was created.

    with tm.detect_anomaly():          # also a decorator: @tm.detect_anomaly()
        loss = model(x).mean()
        loss.backward()

While it is on, the engine checks every op's forward output and, in backward, every gradient an
op returns. The first op that turns finite values into a NaN or an inf raises a RuntimeError
naming the op, its input and output shapes, and the line that created it: the innermost line
outside tinymm (the user's), and the tinymm lines it went through. A value that was already
non-finite when it reached the op (a -inf mask, a NaN in the data) is not the op's doing and is
not reported there: the report is about where the first one *appeared*.

Off (the default), the engine pays one flag test per op: nothing is recorded. On, every op
records a short stack summary, which makes a step a few times slower: use it to find a bug,
not to train. As PyTorch's torch.autograd.detect_anomaly, which checks backward only; tinymm
also checks forward, where most NaN are born (log of 0, 0/0, inf - inf).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import tensor as _engine

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class detect_anomaly(contextlib.ContextDecorator):
    """Check every forward output and every backward gradient for NaN/inf (see the module)."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def __enter__(self) -> detect_anomaly:
        self._previous, _engine._anomaly = _engine._anomaly, self.enabled
        return self

    def __exit__(self, *exc: object) -> None:
        _engine._anomaly = self._previous


def is_anomaly_enabled() -> bool:
    """True inside `detect_anomaly()`."""
    return _engine._anomaly


def creation_site() -> traceback.StackSummary:
    """The calling stack, without reading source lines yet (that waits for a report)."""
    return traceback.StackSummary.extract(traceback.walk_stack(None), lookup_lines=False)


def _where(stack: traceback.StackSummary | None) -> str:
    """'file:line in fn: code' of the innermost frame outside tinymm, then the tinymm frames."""
    if not stack:
        return "(unknown: the op was created before detect_anomaly was on)"
    inside = [f for f in stack if f.filename.startswith(_PACKAGE)]
    outside = [f for f in stack if not f.filename.startswith(_PACKAGE)]
    lines = []
    if outside:
        f = outside[0]  # walk_stack goes from the innermost frame outwards
        lines.append(f"created at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}")
    skip = {"record", "creation_site", "check_forward"}
    via = [f for f in inside if f.name not in skip][:4]
    if via:
        path = ", ".join(
            f"{os.path.relpath(f.filename, os.path.dirname(_PACKAGE[:-1]))}:{f.lineno} ({f.name})"
            for f in via
        )
        lines.append(f"through {path}")
    return "\n  ".join(lines)


def _bad(a: Any) -> str | None:
    """'nan' / 'inf' / 'nan and inf' if the float array a holds such values, else None."""
    a = np.asarray(a)
    if a.dtype.kind not in "fc" or np.isfinite(a).all():
        return None
    kinds = [k for k, test in (("nan", np.isnan), ("inf", np.isinf)) if test(a).any()]
    return " and ".join(kinds)


def _describe(arrays: Sequence[Any]) -> str:
    return ", ".join(
        f"{tuple(np.shape(a))} {np.asarray(a).dtype}" if a is not None else "None" for a in arrays
    )


def check_forward(op: str, out: np.ndarray, inputs: Sequence[Any]) -> None:
    """Raise if op made a NaN/inf from finite inputs."""
    made = _bad(out)
    if made is None or any(_bad(t.data) for t in inputs):
        return
    raise RuntimeError(
        f"detect_anomaly: the forward of '{op}' produced {made} "
        f"({int((~np.isfinite(out)).sum())} of {out.size} values) from finite inputs\n"
        f"  inputs {_describe([t.data for t in inputs])} -> output {_describe([out])}\n"
        f"  {_where(creation_site())}"
    )


def check_backward(node: Any, g: np.ndarray, grads: Sequence[Any]) -> None:
    """Raise if node's backward returned a NaN/inf gradient from a finite output gradient."""
    if _bad(g) is not None:
        return
    for i, grad in enumerate(grads):
        made = None if grad is None else _bad(grad)
        if made is not None:
            raise RuntimeError(
                f"detect_anomaly: the backward of '{node.op}' returned {made} in the gradient "
                f"of its input {i} from a finite output gradient {_describe([g])}\n"
                f"  inputs {_describe([t.data for t in node.inputs])}, "
                f"gradients {_describe(grads)}\n"
                f"  {_where(getattr(node, 'created_at', None))}"
            )
