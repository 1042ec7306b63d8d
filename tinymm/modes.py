"""How ops run: the fused kernels or the lecture's plain compositions, on one thread or two.

Every composite op (softmax, log_softmax, logsumexp, cross entropy, layer norm, group norm,
GELU, SiLU, linear, conv2d, attention) has two readings:

- the *reference*: the formula as the lecture writes it, a short composition of Tensor ops in
  `tinymm/functional.py` that the engine differentiates node by node;
- the *fused kernel*: the same function as one graph node with a backward derived by hand
  (`tinymm/kernels.py`): fewer nodes, fewer temporaries, faster. It is the default.

`reference_mode()` (a context manager, or a decorator) or `TINYMM_REFERENCE=1` in the
environment runs the references everywhere; every lesson takes `--reference`. The tests check
that both readings give the same values and gradients.

Threads: `tinymm.parallel` splits big kernels over two threads. A debugger stops only on the
thread it traces, so while a trace function is set (pdb, an IDE's debugger) or in reference
mode, every op runs on the calling thread and a breakpoint anywhere is hit.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

_reference = os.environ.get("TINYMM_REFERENCE", "") not in ("", "0")


def is_reference_mode() -> bool:
    """True while the plain compositions run instead of the fused kernels."""
    return _reference


def set_reference_mode(enabled: bool) -> None:
    """Switch reference mode on or off for the rest of the process (a lesson's --reference)."""
    global _reference
    _reference = bool(enabled)


class reference_mode(contextlib.ContextDecorator):
    """Run the plain compositions of functional.py instead of the fused kernels, on one thread.

        with tm.reference_mode():
            loss = model(x).mean()       # every softmax, norm, attention ... as Tensor ops
            loss.backward()

    Also a decorator (`@tm.reference_mode()`); `reference_mode(False)` turns it off inside.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def __enter__(self) -> reference_mode:
        global _reference
        self._previous, _reference = _reference, self.enabled
        return self

    def __exit__(self, *exc: object) -> None:
        global _reference
        _reference = self._previous


def debugger_attached() -> bool:
    """True while a trace function is set on this thread or for new threads (pdb, IDE
    debuggers, coverage), or a debugger is registered with sys.monitoring (Python >= 3.12)."""
    if sys.gettrace() is not None or threading.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and monitoring.get_tool(monitoring.DEBUGGER_ID) is not None


def single_threaded() -> bool:
    """Should every op run on the calling thread now? (reference mode, or a debugger)"""
    return _reference or debugger_attached()
