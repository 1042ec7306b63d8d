"""Tensor and the reverse-mode autograd engine.

A `Tensor` holds a NumPy array (`.data`) and, when it was made by an op on tensors that require
gradients, a `Node`: the op's name, its input tensors, and a `backward` function that maps the
gradient of the output to the gradients of the inputs.

    y = f(x)        forward:  NumPy computes y.data from x.data
    dL/dx = J^T g   backward: node.backward(g) with g = dL/dy

`Tensor.backward()` sweeps the graph once in reverse topological order (iteratively: no recursion
limit), adds up the gradients of tensors used more than once, stores `.grad` on the leaves, and
then releases the graph (unless `retain_graph=True`) so that the intermediate arrays are freed.

Every op is one short block below: its forward, and next to it its backward. An op returns the
gradient for each input in the shape of the *broadcast* result; the engine sums it back to the
input's shape in one place (`sum_to`). Ops that keep an input for their backward name it in
`saved=`; changing such a tensor in place before backward is an error (an in-place clock).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import special

DEFAULT_DTYPE = np.float32
_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)

# ----------------------------------------------------------------------------------------------
# Global state: gradient mode and the random generator
# ----------------------------------------------------------------------------------------------

_grad_enabled = True
_rng = np.random.default_rng(0)
_in_place_clock = 0  # how many in-place changes have happened so far, to any tensor
_anomaly = False  # inside tinymm.detect_anomaly(): check every op (tinymm/anomaly.py)


def manual_seed(seed: int) -> None:
    """Seed tinymm's random generator (used by randn, dropout and layer initialisation)."""
    global _rng
    _rng = np.random.default_rng(seed)


def default_rng() -> np.random.Generator:
    """The generator that `manual_seed` seeds."""
    return _rng


def is_grad_enabled() -> bool:
    return _grad_enabled


class no_grad(contextlib.ContextDecorator):
    """Context manager (and decorator) inside which no graph is recorded."""

    def __enter__(self) -> no_grad:
        global _grad_enabled
        self._prev, _grad_enabled = _grad_enabled, False
        return self

    def __exit__(self, *exc: object) -> None:
        global _grad_enabled
        _grad_enabled = self._prev


# ----------------------------------------------------------------------------------------------
# The graph
# ----------------------------------------------------------------------------------------------


class Node:
    """How a tensor was made: the op, its inputs, and the function that carries gradients back.

    `saved` are the inputs whose values the backward function reads; `made_at` is the in-place
    clock when the node was made (see `Tensor._bump`): a saved tensor changed later is an error.
    `created_at` (a stack summary) is set only inside `tinymm.detect_anomaly()`.
    """

    __slots__ = ("op", "inputs", "backward", "saved", "made_at", "created_at")

    def __init__(self, op: str, inputs: tuple, backward: Callable, saved: tuple):
        self.op = op
        self.inputs = inputs
        self.backward = backward
        self.saved = saved
        self.made_at = _in_place_clock

    def check_saved(self) -> None:
        for t in self.saved:
            if t._version > self.made_at:
                raise RuntimeError(
                    f"a tensor of shape {t.shape} that '{self.op}' saved for backward was "
                    f"modified in place by '{t._inplace_op}' after it was saved; do the in-place "
                    "update after backward, or on a copy"
                )


class GradFn:
    """A read-only view of the `Node` that made a tensor (`tensor.grad_fn`), to look at the graph.

    `op` names the op, `inputs` are its input tensors (in order), `saved` the inputs whose values
    its backward reads. `backward()` without `retain_graph=True` releases the graph as it goes:
    afterwards `released` is True, `op` is still known, and `inputs` / `saved` raise.
    """

    __slots__ = ("_node",)

    def __init__(self, node: Node):
        self._node = node

    op = property(lambda self: self._node.op)
    released = property(lambda self: self._node.backward is None)

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        self._check_alive("inputs")
        return self._node.inputs

    @property
    def saved(self) -> tuple[Tensor, ...]:
        self._check_alive("saved")
        return self._node.saved

    def _check_alive(self, what: str) -> None:
        if self._node.backward is None:
            raise RuntimeError(
                f"grad_fn.{what} of '{self._node.op}': backward() released this graph; call "
                "backward(retain_graph=True) to look at it afterwards"
            )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GradFn) and other._node is self._node

    def __hash__(self) -> int:
        return id(self._node)

    def __repr__(self) -> str:
        return f"<grad_fn {self._node.op}{' (released)' if self.released else ''}>"


def sum_to(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a broadcast gradient back to `shape`: the adjoint of np.broadcast_to(x, grad.shape)."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    if lead < 0 or any(n not in (1, m) for n, m in zip(shape, grad.shape[lead:], strict=True)):
        raise RuntimeError(f"a gradient of shape {grad.shape} does not broadcast from {shape}")
    axes = tuple(range(lead)) + tuple(
        i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1
    )
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


def record(
    op: str,
    data: np.ndarray,
    inputs: Sequence[Tensor],
    backward: Callable[[np.ndarray], Sequence[np.ndarray | None]],
    saved: Sequence[Tensor] = (),
) -> Tensor:
    """Wrap an op's result; link it into the graph when gradients are on and an input needs one.

    `backward(g)` returns one gradient (or None) per input, in the result's (broadcast) shape.
    """
    out = _new(data if type(data) is np.ndarray else np.asarray(data))
    if _anomaly:
        from . import anomaly

        anomaly.check_forward(op, out.data, inputs)
    if _grad_enabled:
        for t in inputs:
            if t.requires_grad:
                out.requires_grad = True
                out._node = Node(op, tuple(inputs), backward, tuple(saved))
                if _anomaly:
                    out._node.created_at = anomaly.creation_site()
                break
    return out


@functools.lru_cache(maxsize=1024)
def _constant(value: float, dtype: np.dtype) -> Tensor:
    """A Python number as a read-only 0-d tensor of `dtype`, made once (x * 0.5 is common)."""
    data = np.asarray(value, dtype=dtype)
    data.flags.writeable = False
    return _new(data)


def _new(data: np.ndarray) -> Tensor:
    """A tensor around an ndarray, without Tensor()'s conversions: the fast path for op results."""
    t = object.__new__(Tensor)
    t.data, t.grad, t.requires_grad, t._node = data, None, False, None
    t._version, t._inplace_op, t._retains_grad, t.name = 0, "", False, None
    return t


# ----------------------------------------------------------------------------------------------
# Tensor
# ----------------------------------------------------------------------------------------------


def _as_array(data: Any, dtype: Any = None) -> np.ndarray:
    """Convert to an ndarray: floats default to float32, integers and booleans keep their kind."""
    if isinstance(data, Tensor):
        data = data.data
    if dtype is not None:
        return np.asarray(data, dtype=dtype)
    arr = np.asarray(data)
    if arr.dtype == np.float64 and not isinstance(data, np.ndarray | np.floating):
        arr = arr.astype(DEFAULT_DTYPE)  # Python floats and lists of them -> float32
    return arr


class Tensor:
    """An n-dimensional array that remembers how it was computed, for reverse-mode autodiff."""

    __slots__ = (
        "data",
        "grad",
        "requires_grad",
        "_node",
        "_version",
        "_inplace_op",
        "_retains_grad",
        "name",
        "__weakref__",
    )
    __array_priority__ = 1000  # ndarray (op) Tensor -> Tensor's reflected op

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None):
        self.data: np.ndarray = _as_array(data, dtype)
        self.grad: np.ndarray | None = None
        self.requires_grad = bool(requires_grad)
        self._node: Node | None = None
        self._version = 0
        self._inplace_op = ""
        self._retains_grad = False
        self.name: str | None = None  # a label for figures and messages (nn names parameters)
        if self.requires_grad and not np.issubdtype(self.data.dtype, np.floating):
            raise TypeError(f"only floating point tensors can require gradients, got {self.dtype}")

    # --- what a Tensor is ----------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    T = property(lambda self: self.transpose())
    is_leaf = property(lambda self: self._node is None)

    @property
    def grad_fn(self) -> GradFn | None:
        """How this tensor was made, read-only: None for a leaf (made by hand, not by an op)."""
        return None if self._node is None else GradFn(self._node)

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> Any:
        if self.data.size != 1:
            raise ValueError(
                f"item() needs a tensor of exactly one element, this tensor has shape "
                f"{self.shape} ({self.data.size} elements)"
            )
        return self.data.item()

    def detach(self) -> Tensor:
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def retain_grad(self) -> None:
        """Keep `.grad` on this non-leaf tensor after backward (leaves always keep it)."""
        self._retains_grad = True

    def astype(self, dtype: Any) -> Tensor:
        source = self.dtype
        return record("astype", self.data.astype(dtype), (self,), lambda g: (g.astype(source),))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.data if dtype is None else self.data.astype(dtype)

    def __len__(self) -> int:
        return len(self.data)

    def __float__(self) -> float:
        return float(self.data)

    def __bool__(self) -> bool:
        return bool(self.data)

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        body = np.array2string(self.data, precision=4, threshold=20, edgeitems=2, prefix="tensor(")
        extra = f", dtype={self.dtype}" if self.dtype != DEFAULT_DTYPE else ""
        if self._node is not None:
            extra += f", grad_fn={self._node.op}"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    # --- backward ------------------------------------------------------------------------------
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) * grad into every leaf's `.grad` that requires a gradient.

        One sweep in reverse topological order (Kahn's algorithm on the reversed graph: a tensor
        is processed once every op that used it has sent back its gradient).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no graph)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a scalar, got shape {self.shape}; "
                    "reduce it first (e.g. .sum()) or pass grad= of the same shape"
                )
            grad = np.ones_like(self.data)
        grad = _as_array(grad, self.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"backward: grad of shape {grad.shape} for a tensor of {self.shape}")

        # 1. count, for every tensor in the graph, how many times it is an input (its consumers)
        pending = {id(self): 0}
        stack = [self]
        while stack:
            node = stack.pop()._node
            if node is None:
                continue
            if node.backward is None:
                raise RuntimeError(
                    "backward through a graph that was already released: the first backward "
                    "freed it; call backward(retain_graph=True) the first time to go twice"
                )
            for t in node.inputs:
                if t.requires_grad:
                    key = id(t)
                    count = pending.get(key)
                    if count is None:
                        stack.append(t)
                        count = 0
                    pending[key] = count + 1

        # 2. sweep: pass each tensor's finished gradient back through the op that made it
        ready = [(self, grad)]  # (tensor, its whole gradient): every op that used it is done
        partial: dict[int, np.ndarray | None] = {}  # sums so far, for tensors still waiting
        while ready:
            t, g = ready.pop()  # g None: every op that used t returned None (no gradient)
            node = t._node
            if g is not None and (node is None or t._retains_grad):
                t.grad = np.array(g, dtype=t.data.dtype) if t.grad is None else t.grad + g
            if node is None:
                continue
            if node.made_at < _in_place_clock:  # something changed in place since node was made
                node.check_saved()
            g_inputs = node.backward(g) if g is not None else [None] * len(node.inputs)
            if _anomaly and g is not None:
                from . import anomaly

                anomaly.check_backward(node, g, g_inputs)
            for inp, g_inp in zip(node.inputs, g_inputs, strict=True):
                if not inp.requires_grad:
                    continue
                if g_inp is not None:
                    data = inp.data
                    if g_inp.shape != data.shape:
                        g_inp = sum_to(g_inp, data.shape)
                    if g_inp.dtype is not data.dtype and g_inp.dtype != data.dtype:
                        g_inp = g_inp.astype(data.dtype)
                key = id(inp)
                waiting = pending[key] - 1  # ops that used inp and have not sent their gradient
                if key in partial:
                    previous = partial.pop(key)
                    if previous is not None:
                        g_inp = previous if g_inp is None else previous + g_inp
                if waiting:
                    pending[key] = waiting
                    partial[key] = g_inp
                else:
                    ready.append((inp, g_inp))
            if not retain_graph:  # free what the node holds: inputs, the arrays backward kept
                node.inputs = node.backward = None
                node.saved = ()

    # --- in-place updates (for optimizers; not differentiable, they bump the version) ----------
    def _bump(self, op: str) -> None:
        """Record an in-place change: `_version` becomes the tick of a global clock, so a node
        that saved this tensor before the change (its `made_at` is earlier) can tell.

        Refused on a tensor an op made while its graph is alive: the change would not be in the
        graph, so gradients through it would be silently wrong."""
        global _in_place_clock
        if self._node is not None and self._node.backward is not None:
            raise RuntimeError(
                f"'{op}' on a tensor made by '{self._node.op}' that is still part of a graph: "
                "in-place updates are not recorded, so its gradient would be wrong; use an "
                "out-of-place op (x = x * 2), or update it after backward"
            )
        _in_place_clock += 1
        self._version = _in_place_clock
        self._inplace_op = op

    def _in_place_operand(self, op: str, other: Any) -> Any:
        """The operand of an in-place op as an array; refused while it needs a gradient.

        In-place ops are not recorded in the graph: with gradients on, an operand that requires
        grad would silently get none from this update."""
        if type(other) is np.ndarray and other.shape == self.data.shape:
            return other  # the optimizers' case: nothing to check
        if isinstance(other, Tensor):
            if other.requires_grad and _grad_enabled:
                raise RuntimeError(
                    f"'{op}' with an operand that requires grad (shape {other.shape}) while "
                    "gradients are on: in-place ops are not recorded, so that operand would "
                    f"silently get no gradient from it; use an out-of-place op "
                    f"({_OUT_OF_PLACE.get(op, 'x = other')}), or wrap the update in "
                    "`with tm.no_grad():` (or pass other.detach()) if no gradient is wanted"
                )
            other = other.data
        shape = np.shape(other)
        if shape != self.data.shape:
            try:
                fits = np.broadcast_shapes(shape, self.data.shape) == self.data.shape
            except ValueError:
                fits = False
            if not fits:
                raise ValueError(
                    f"{op}: other of shape {shape} does not broadcast to this tensor's shape "
                    f"{self.data.shape} (an in-place op cannot change the shape)"
                )
        return other

    def add_(self, other: Any, alpha: float = 1.0) -> Tensor:
        other = self._in_place_operand("add_", other)
        self._bump("add_")
        if alpha == 1.0:
            self.data += other
        else:
            self.data += alpha * other
        return self

    def sub_(self, other: Any) -> Tensor:
        other = self._in_place_operand("sub_", other)
        self._bump("sub_")
        self.data -= other
        return self

    def mul_(self, other: Any) -> Tensor:
        other = self._in_place_operand("mul_", other)
        self._bump("mul_")
        self.data *= other
        return self

    def zero_(self) -> Tensor:
        self._bump("zero_")
        self.data[...] = 0
        return self

    def copy_(self, other: Any) -> Tensor:
        other = self._in_place_operand("copy_", other)
        self._bump("copy_")
        self.data[...] = other
        return self

    # --- arithmetic ----------------------------------------------------------------------------
    def _wrap(self, other: Any) -> Tensor:
        """A Python number takes this tensor's dtype (no float32 -> float64 up-cast)."""
        if isinstance(other, Tensor):
            return other
        if isinstance(other, _NUMBER) and self.data.dtype.kind == "f":
            if other == 0:  # -0.0 == 0.0 for the cache: keep the sign of zero
                return _new(np.asarray(other, dtype=self.data.dtype))
            return _constant(other, self.data.dtype)
        return Tensor(other)

    def _operand(self, other: Any, op: str) -> Tensor:
        """The other operand of a binary op, wrapped; its shape must broadcast with this one."""
        if type(other) is float and other and self.data.dtype.kind == "f":  # x * 0.5: the most
            return _constant(other, self.data.dtype)  # common case, and a 0-d constant broadcasts
        other = self._wrap(other)
        if other.data.shape != self.data.shape and other.data.ndim:
            _check_broadcast(op, self, other)
        return other

    def __add__(self, other: Any) -> Tensor:
        other = self._operand(other, "+")
        return record("add", self.data + other.data, (self, other), lambda g: (g, g))

    def __sub__(self, other: Any) -> Tensor:
        other = self._operand(other, "-")
        return record("sub", self.data - other.data, (self, other), lambda g: (g, -g))

    def __mul__(self, other: Any) -> Tensor:
        other = self._operand(other, "*")
        a, b = self.data, other.data

        def backward(g):  # d(ab)/da = b, d(ab)/db = a; only what is needed (x * 2: no db)
            return (g * b if self.requires_grad else None), (g * a if other.requires_grad else None)

        return record("mul", a * b, (self, other), backward, saved=(self, other))

    def __truediv__(self, other: Any) -> Tensor:
        other = self._operand(other, "/")
        a, b = self.data, other.data
        out = a / b

        def backward(g):  # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2 = -out/b
            g_a = g / b if self.requires_grad else None
            return g_a, (-g * out / b if other.requires_grad else None)

        return record("div", out, (self, other), backward, saved=(self, other))

    def __pow__(self, exponent: Any) -> Tensor:
        other = self._operand(exponent, "**")
        a, p = self.data, other.data
        out = a**p

        def backward(g):
            g_a = g * p * a ** (p - 1) if self.requires_grad else None
            g_p = g * out * np.log(np.where(a > 0, a, 1)) if other.requires_grad else None
            return g_a, g_p

        return record("pow", out, (self, other), backward, saved=(self, other))

    def __neg__(self) -> Tensor:
        return record("neg", -self.data, (self,), lambda g: (-g,))

    def __radd__(self, other: Any) -> Tensor:
        return self._wrap(other) + self

    def __rsub__(self, other: Any) -> Tensor:
        return self._wrap(other) - self

    def __rmul__(self, other: Any) -> Tensor:
        return self._wrap(other) * self

    def __rtruediv__(self, other: Any) -> Tensor:
        return self._wrap(other) / self

    def __rpow__(self, other: Any) -> Tensor:
        return self._wrap(other) ** self

    def __matmul__(self, other: Any) -> Tensor:
        return matmul(self, self._wrap(other))

    def __rmatmul__(self, other: Any) -> Tensor:
        return matmul(self._wrap(other), self)

    # comparisons: boolean tensors, never part of the graph
    def __lt__(self, other: Any) -> Tensor:
        return Tensor(self.data < _data(other))

    def __le__(self, other: Any) -> Tensor:
        return Tensor(self.data <= _data(other))

    def __gt__(self, other: Any) -> Tensor:
        return Tensor(self.data > _data(other))

    def __ge__(self, other: Any) -> Tensor:
        return Tensor(self.data >= _data(other))

    def __eq__(self, other: Any) -> Tensor:  # type: ignore[override]
        return Tensor(self.data == _data(other))

    def __ne__(self, other: Any) -> Tensor:  # type: ignore[override]
        return Tensor(self.data != _data(other))

    # --- elementwise ---------------------------------------------------------------------------
    def exp(self) -> Tensor:
        out = np.exp(self.data)
        return record("exp", out, (self,), lambda g: (g * out,))

    def log(self) -> Tensor:
        x = self.data
        return record("log", np.log(x), (self,), lambda g: (g / x,), saved=(self,))

    def sqrt(self) -> Tensor:
        out = np.sqrt(self.data)
        return record("sqrt", out, (self,), lambda g: (g / (2 * out),))

    def tanh(self) -> Tensor:
        out = np.tanh(self.data)
        return record("tanh", out, (self,), lambda g: (g * (1 - out * out),))

    def erf(self) -> Tensor:
        """erf(x) = 2/sqrt(pi) int_0^x e^{-t^2} dt (SciPy's);  d/dx = 2/sqrt(pi) e^{-x^2}."""
        x = self.data
        out = special.erf(x).astype(x.dtype, copy=False)

        def backward(g):
            return (g * (_TWO_OVER_SQRT_PI * np.exp(-x * x)),)

        return record("erf", out, (self,), backward, saved=(self,))

    def abs(self) -> Tensor:
        x = self.data
        return record("abs", np.abs(x), (self,), lambda g: (g * np.sign(x),), saved=(self,))

    def clip(self, min: float | None = None, max: float | None = None) -> Tensor:
        """Clamp to [min, max]; the gradient passes where the value was inside the interval."""
        x = self.data
        lo = -np.inf if min is None else min
        hi = np.inf if max is None else max
        inside = (x >= lo) & (x <= hi)
        return record(
            "clip", np.clip(x, lo, hi).astype(x.dtype, copy=False), (self,), lambda g: (g * inside,)
        )

    # --- reductions ----------------------------------------------------------------------------
    def sum(self, axis: int | tuple | None = None, keepdims: bool = False) -> Tensor:
        shape, axis = self.shape, _axes("sum", self.shape, axis)

        def backward(g):
            return (np.broadcast_to(_keep(g, axis, shape, keepdims), shape),)

        return record("sum", self.data.sum(axis=axis, keepdims=keepdims), (self,), backward)

    def mean(self, axis: int | tuple | None = None, keepdims: bool = False) -> Tensor:
        shape, axis = self.shape, _axes("mean", self.shape, axis)
        n = _count(shape, axis)

        def backward(g):
            return (np.broadcast_to(_keep(g, axis, shape, keepdims) / n, shape),)

        return record("mean", self.data.mean(axis=axis, keepdims=keepdims), (self,), backward)

    def var(self, axis: int | tuple | None = None, keepdims: bool = False) -> Tensor:
        """Population variance (ddof=0, as NumPy): mean((x - mean(x))^2)."""
        x, shape, axis = self.data, self.shape, _axes("var", self.shape, axis)
        centred = x - x.mean(axis=axis, keepdims=True)
        n = _count(shape, axis)
        out = (centred * centred).mean(axis=axis, keepdims=keepdims)

        def backward(g):
            return (_keep(g, axis, shape, keepdims) * centred * (2 / max(n, 1)),)  # n = 0: empty

        return record("var", out, (self,), backward, saved=(self,))

    def max(self, axis: int | tuple | None = None, keepdims: bool = False) -> Tensor:
        """Maximum; ties share the gradient evenly."""
        return self._extreme(np.max, "max", axis, keepdims)

    def min(self, axis: int | tuple | None = None, keepdims: bool = False) -> Tensor:
        """Minimum; ties share the gradient evenly."""
        return self._extreme(np.min, "min", axis, keepdims)

    def _extreme(self, fn: Callable, op: str, axis: Any, keepdims: bool) -> Tensor:
        x, shape, axis = self.data, self.shape, _axes(op, self.shape, axis)
        if _count(shape, axis) == 0:
            raise ValueError(
                f"{op}: the {op}imum over axis={axis} of a tensor of shape {shape} has no "
                "element to take it from (an empty axis)"
            )
        out = fn(x, axis=axis, keepdims=True)

        def backward(g):
            hit = x == out
            return (_keep(g, axis, shape, keepdims) * hit / hit.sum(axis=axis, keepdims=True),)

        value = out if keepdims else fn(x, axis=axis)
        return record(op, value, (self,), backward, saved=(self,))

    # --- shape ---------------------------------------------------------------------------------
    def reshape(self, *shape: Any) -> Tensor:
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        source = self.shape
        try:
            out = self.data.reshape(shape)
        except (ValueError, TypeError) as error:  # the message is formatted only on failure
            raise _refusal(
                "reshape", f"shape={shape!r} for a tensor of shape {source}", error
            ) from None
        return record("reshape", out, (self,), lambda g: (g.reshape(source),))

    def transpose(self, *axes: Any) -> Tensor:
        """Permute axes (NumPy semantics: no axes reverses them)."""
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], tuple | list) else axes
        if axes and sorted(axes) == list(range(self.ndim)):
            axes = tuple(axes)  # already a permutation of 0..ndim-1: nothing to normalise
        elif axes:
            normal = _axes("transpose", self.shape, tuple(axes), "axes")
            if len(normal) != self.ndim:
                raise ValueError(
                    f"transpose: axes={tuple(axes)} must name each of the {self.ndim} axes of a "
                    f"tensor of shape {self.shape} once"
                )
            axes = normal
        else:
            axes = tuple(reversed(range(self.ndim)))
        inverse = tuple(sorted(range(len(axes)), key=axes.__getitem__))  # (np.argsort: 3 us)
        return record(
            "transpose", self.data.transpose(axes), (self,), lambda g: (g.transpose(inverse),)
        )

    def swapaxes(self, a: int, b: int) -> Tensor:
        _axes("swapaxes", self.shape, a, "a")
        _axes("swapaxes", self.shape, b, "b")
        return record("swapaxes", self.data.swapaxes(a, b), (self,), lambda g: (g.swapaxes(a, b),))

    def squeeze(self, axis: int | tuple | None = None) -> Tensor:
        source = self.shape
        with _refused("squeeze", f"axis={axis!r} of a tensor of shape {source}"):
            out = np.squeeze(self.data, axis)
        return record("squeeze", out, (self,), lambda g: (g.reshape(source),))

    def expand_dims(self, axis: int | tuple) -> Tensor:
        source = self.shape
        with _refused("expand_dims", f"axis={axis!r} for a tensor of shape {source}"):
            out = np.expand_dims(self.data, axis)
        return record("expand_dims", out, (self,), lambda g: (g.reshape(source),))

    def broadcast_to(self, shape: tuple) -> Tensor:
        with _refused("broadcast_to", f"shape={shape!r} from a tensor of shape {self.shape}"):
            out = np.broadcast_to(self.data, shape)
        return record("broadcast_to", out, (self,), lambda g: (g,))

    def flatten(self) -> Tensor:
        return self.reshape(-1)

    def __getitem__(self, index: Any) -> Tensor:
        """Basic and advanced indexing; the gradient is scattered back (added where repeated)."""
        index = _index_data(index)
        shape, dtype = self.shape, self.dtype

        def backward(g):
            if isinstance(index, np.ndarray) and index.dtype.kind in "iu":  # rows by id
                return (add_rows(shape, index, g, dtype),)
            full = np.zeros(shape, dtype=dtype)
            if _is_basic(index):
                full[index] = g  # basic indexing never repeats an element
            else:
                np.add.at(full, index, g)
            return (full,)

        try:
            out = self.data[index]
        except (ValueError, IndexError, TypeError) as error:
            raise _refusal(
                "getitem", f"index {index!r} into a tensor of shape {shape}", error
            ) from None
        return record("getitem", out, (self,), backward)


# ----------------------------------------------------------------------------------------------
# Helpers for the ops
# ----------------------------------------------------------------------------------------------


def _data(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


_NUMBER = int | float | bool | np.integer | np.bool_
_OUT_OF_PLACE = {"add_": "x = x + other", "sub_": "x = x - other", "mul_": "x = x * other"}


def _check_broadcast(op: str, a: Tensor, b: Tensor) -> None:
    if a.data.shape != b.data.shape and a.data.ndim and b.data.ndim:
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise ValueError(
                f"operands of '{op}' cannot be broadcast together: shapes {a.shape} and "
                f"{b.shape} (each axis, aligned from the right, must be equal or 1)"
            ) from None


@contextlib.contextmanager
def _refused(op: str, arguments: str):
    """NumPy's refusal of an op's arguments, re-raised as the op's own error that names them
    (an axis out of range: IndexError, as PyTorch; NumPy's AxisError is also a ValueError)."""
    try:
        yield
    except (ValueError, IndexError, TypeError, ZeroDivisionError) as error:
        raise _refusal(op, arguments, error) from None


def _refusal(op: str, arguments: str, error: Exception) -> Exception:
    """The error `_refused` raises; hot ops (reshape, indexing) build it only when NumPy has
    refused, so that the message is not formatted on every call."""
    kind = IndexError if isinstance(error, np.exceptions.AxisError) else type(error)
    kind = ValueError if kind is ZeroDivisionError else kind
    refusal = kind(f"{op}: {arguments}: {error}")
    return refusal


def _axes(op: str, shape: tuple, axis: Any, name: str = "axis") -> Any:
    """A reduction's `axis` checked and made non-negative: None, an int, or a tuple of ints,
    each in [-ndim, ndim), none twice. Out of range raises IndexError, as PyTorch (never wraps)."""
    if axis is None:
        return None
    ndim = len(shape)
    for a in axis if isinstance(axis, tuple | list) else (axis,):
        if isinstance(a, bool) or not isinstance(a, int | np.integer):
            raise TypeError(f"{op}: {name} must be an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise IndexError(
                f"{op}: {name}={axis!r} is out of range for a tensor of shape {shape} "
                f"(expected an axis in [{-ndim}, {ndim - 1}])"
            )
    if not isinstance(axis, tuple | list):
        return int(axis) % ndim
    normal = tuple(int(a) % ndim for a in axis)
    if len(set(normal)) != len(normal):
        raise ValueError(f"{op}: {name}={tuple(axis)!r} names an axis twice (shape {shape})")
    return normal


def _count(shape: tuple, axis: int | tuple | None) -> int:
    """How many elements a reduction over `axis` combines into one."""
    if axis is None:
        return int(np.prod(shape))
    axes = (axis,) if isinstance(axis, int) else axis
    return int(np.prod([shape[a] for a in axes]))


def _keep(g: np.ndarray, axis: Any, shape: tuple, keepdims: bool) -> np.ndarray:
    """Re-insert the reduced axes (as size 1) so a reduction's gradient broadcasts to `shape`."""
    if keepdims or axis is None:
        return g.reshape((1,) * len(shape)) if axis is None else g
    axes = (axis,) if isinstance(axis, int) else axis
    return np.expand_dims(g, tuple(a % len(shape) for a in axes))


def _index_data(index: Any) -> Any:
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


def add_rows(shape: tuple, ids: np.ndarray, g: np.ndarray, dtype: Any = None) -> np.ndarray:
    """The gradient of a row lookup `table[ids]` (getitem with one integer array): zeros(shape)
    with each g[...] added to row ids[...], repeated ids summed. What np.add.at(full, ids, g)
    computes (up to float rounding: reduceat adds a row's terms pairwise, add.at one by one),
    4x faster for lesson 04's image rows (each image's tokens repeated for its 5 questions): the
    ids are sorted once and each run of equal ids is summed by one np.add.reduceat."""
    flat = ids.reshape(-1)
    rows = g.reshape(flat.size, math.prod(shape[1:]))
    full = np.zeros((shape[0], rows.shape[1]), dtype=g.dtype if dtype is None else dtype)
    if flat.size:
        flat = np.where(flat < 0, flat + shape[0], flat)  # negative ids count from the end
        order = np.argsort(flat, kind="stable")
        ordered = flat[order]
        starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        full[ordered[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return full.reshape(shape)


def _is_basic(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, int | slice | type(Ellipsis) | type(None)) for i in parts)


# ----------------------------------------------------------------------------------------------
# Module-level ops
# ----------------------------------------------------------------------------------------------


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 1-D, 2-D and batched N-D operands (NumPy rules, broadcast batch axes).

    (N, L, D) @ (D, O) is folded into one 2-D product (N*L, D) @ (D, O): one large BLAS call.
    """
    a, b = _tensor(a), _tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul needs operands with at least 1 axis, got {a.shape} @ {b.shape}")
    k_a = a.shape[-1]
    k_b = b.shape[-2] if b.ndim > 1 else b.shape[0]
    if k_a != k_b:
        raise ValueError(
            f"matmul: shapes {a.shape} @ {b.shape} do not match: the last axis of the left "
            f"operand ({k_a}) must equal the {'second-to-last' if b.ndim > 1 else 'only'} axis "
            f"of the right operand ({k_b})"
        )
    if a.ndim > 2 and b.ndim > 2:
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(
                f"matmul: shapes {a.shape} @ {b.shape}: the batch axes {a.shape[:-2]} and "
                f"{b.shape[:-2]} cannot be broadcast together"
            ) from None
    x, w = a.data, b.data
    if x.ndim == 1 or w.ndim == 1:  # promote vectors to matrices, then drop the added axis
        x2 = x[None] if x.ndim == 1 else x
        w2 = w[:, None] if w.ndim == 1 else w
        out2 = _matmul_nd(x2, w2)
        out = out2[..., 0, :] if x.ndim == 1 else out2
        out = out[..., 0] if w.ndim == 1 else out

        def backward(g):
            g2 = g.reshape(out2.shape)
            ga = g2 @ np.swapaxes(w2, -1, -2)
            gb = np.swapaxes(x2, -1, -2) @ g2
            return (ga[..., 0, :] if x.ndim == 1 else ga), (gb[..., 0] if w.ndim == 1 else gb)

        return record("matmul", out, (a, b), backward, saved=(a, b))

    if w.ndim == 2:  # fold the leading axes of x: one 2-D product

        def backward(g):
            g2 = _rows(g)
            ga = (g2 @ w.T).reshape(x.shape) if a.requires_grad else None
            gb = _rows(x).T @ g2 if b.requires_grad else None
            return ga, gb

        return record("matmul", _matmul_nd(x, w), (a, b), backward, saved=(a, b))

    def backward(g):
        ga = g @ np.swapaxes(w, -1, -2) if a.requires_grad else None
        gb = np.swapaxes(x, -1, -2) @ g if b.requires_grad else None
        return ga, gb

    return record("matmul", np.matmul(x, w), (a, b), backward, saved=(a, b))


def _broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """np.broadcast_shapes(*shapes), the usual case first: all equal (np.broadcast_shapes costs
    ~5 us, and a decoding step of attention ops counts them). Raises ValueError as it does."""
    first = shapes[0]
    if all(shape == first for shape in shapes):
        return first
    return np.broadcast_shapes(*shapes)


def _rows(a: np.ndarray) -> np.ndarray:
    """(..., n) -> (rows, n), the leading axes folded (written out: -1 is ambiguous at size 0)."""
    if a.size:
        return a.reshape(-1, a.shape[-1])
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


def _matmul_nd(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    if w.ndim == 2 and x.ndim > 2:
        return (_rows(x) @ w).reshape(x.shape[:-1] + (w.shape[1],))
    return np.matmul(x, w)


def maximum(a: Any, b: Any) -> Tensor:
    """Elementwise maximum; where a == b the gradient is split evenly."""
    return _pick(a, b, np.greater, "maximum")


def minimum(a: Any, b: Any) -> Tensor:
    """Elementwise minimum; where a == b the gradient is split evenly."""
    return _pick(a, b, np.less, "minimum")


def _pick(a: Any, b: Any, wins: Callable, op: str) -> Tensor:
    a, b = _pair(a, b)
    _check_broadcast(op, a, b)
    x, y = a.data, b.data
    share = np.where(wins(x, y), 1.0, np.where(x == y, 0.5, 0.0)).astype(_float(x, y))
    out = np.where(wins(x, y) | (x == y), x, y)
    return record(op, out, (a, b), lambda g: (g * share, g * (1 - share)), saved=(a, b))


def where(condition: Any, a: Any, b: Any) -> Tensor:
    """Pick from a where condition is True, else from b.

    The branch not taken gets an exact zero gradient (never g * 0, so an inf or NaN upstream does
    not leak in). A NaN can still come from *inside* an untaken branch, e.g. the backward of
    sqrt(x) at x < 0: guard the input too, `where(x > 0, sqrt(where(x > 0, x, 1)), 0)`.
    """
    cond = np.asarray(_data(condition), dtype=bool)
    a, b = _pair(a, b)
    zero = np.zeros((), dtype=_float(a.data, b.data))
    shapes = f"condition {cond.shape}, a {a.shape}, b {b.shape}"
    with _refused("where", f"{shapes} do not broadcast together"):
        out = np.where(cond, a.data, b.data)
    return record(
        "where", out, (a, b), lambda g: (np.where(cond, g, zero), np.where(cond, zero, g))
    )


def concatenate(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    tensors = [_tensor(t) for t in tensors]
    shapes = [t.shape for t in tensors]
    with _refused("concatenate", f"tensors of shapes {shapes} along axis={axis!r}"):
        out = np.concatenate([t.data for t in tensors], axis=axis)
    bounds = list(itertools.accumulate(t.shape[axis] for t in tensors))[:-1]
    return record("concatenate", out, tensors, lambda g: np.split(g, bounds, axis=axis))


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along a new axis."""
    tensors = [_tensor(t) for t in tensors]
    shapes = [t.shape for t in tensors]
    with _refused("stack", f"tensors of shapes {shapes} along a new axis={axis!r}"):
        out = np.stack([t.data for t in tensors], axis=axis)
    return record(
        "stack", out, tensors, lambda g: [np.take(g, i, axis=axis) for i in range(len(tensors))]
    )


def split(x: Tensor, indices_or_sections: int | Sequence[int], axis: int = 0) -> list[Tensor]:
    """np.split for tensors: each piece is a slice of x, with the slice's gradient."""
    x = _tensor(x)
    axis = _axes("split", x.shape, axis)
    n = x.shape[axis]
    if isinstance(indices_or_sections, int | np.integer):
        if indices_or_sections < 1 or n % indices_or_sections:
            raise ValueError(
                f"split: axis {axis} of length {n} does not divide into "
                f"{indices_or_sections} equal parts"
            )
        step = n // indices_or_sections
        cuts = [step * i for i in range(1, indices_or_sections)]
    else:
        cuts = list(indices_or_sections)
        if any(not isinstance(c, int | np.integer) or c < 0 for c in cuts):
            raise ValueError(
                f"split: indices_or_sections must be a number of sections or non-negative "
                f"integer positions, got {indices_or_sections!r}"
            )
    edges = [0, *cuts, n]
    lead = (slice(None),) * axis
    return [x[(*lead, slice(lo, hi))] for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def pad(x: Tensor, pad_width: Any, constant_values: float = 0.0) -> Tensor:
    """Constant padding (np.pad semantics for pad_width); the gradient is the inner slice."""
    x = _tensor(x)
    with _refused("pad", f"pad_width={pad_width!r} for a tensor of shape {x.shape}"):
        widths = np.broadcast_to(np.asarray(pad_width, dtype=int), (x.ndim, 2))
        if (widths < 0).any():
            raise ValueError("widths must be >= 0")
        out = np.pad(x.data, widths, constant_values=constant_values)
    inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(widths, x.shape, strict=True))
    return record("pad", out, (x,), lambda g: (g[inner],))


def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def _pair(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    """Two operands as tensors; a Python number takes the other operand's dtype."""
    if isinstance(a, Tensor):
        return a, a._wrap(b)
    if isinstance(b, Tensor):
        return b._wrap(a), b
    return Tensor(a), Tensor(b)


def _float(*arrays: np.ndarray) -> np.dtype:
    dtype = np.result_type(*arrays)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(DEFAULT_DTYPE)


# ----------------------------------------------------------------------------------------------
# Constructors
# ----------------------------------------------------------------------------------------------


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """Make a tensor from array-like data (Python floats become float32)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def _shape(shape: tuple) -> tuple:
    """A constructor's shape, as zeros(2, 3) or zeros((2, 3)): non-negative integers."""
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"shape must be non-negative integers, got {shape!r}")
    return shape


def zeros(*shape: Any, dtype: Any = DEFAULT_DTYPE, requires_grad: bool = False) -> Tensor:
    return Tensor(np.zeros(_shape(shape), dtype=dtype), requires_grad=requires_grad)


def ones(*shape: Any, dtype: Any = DEFAULT_DTYPE, requires_grad: bool = False) -> Tensor:
    return Tensor(np.ones(_shape(shape), dtype=dtype), requires_grad=requires_grad)


def randn(*shape: Any, dtype: Any = DEFAULT_DTYPE, requires_grad: bool = False) -> Tensor:
    """Standard normal samples from tinymm's generator (see manual_seed)."""
    data = _rng.standard_normal(_shape(shape)).astype(dtype)
    return Tensor(data, requires_grad=requires_grad)


def arange(*args: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    """np.arange; integer arguments give an integer tensor, float ones float32."""
    with _refused("arange", f"arguments {args!r}"):
        data = np.arange(*args, dtype=dtype)
    if dtype is None and data.dtype == np.float64:
        data = data.astype(DEFAULT_DTYPE)
    return Tensor(data, requires_grad=requires_grad)


def zeros_like(x: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return Tensor(np.zeros_like(_data(x), dtype=dtype), requires_grad=requires_grad)


def ones_like(x: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return Tensor(np.ones_like(_data(x), dtype=dtype), requires_grad=requires_grad)


__all__ = [
    "DEFAULT_DTYPE",
    "GradFn",
    "Node",
    "Tensor",
    "arange",
    "concatenate",
    "default_rng",
    "is_grad_enabled",
    "manual_seed",
    "matmul",
    "maximum",
    "minimum",
    "no_grad",
    "ones",
    "ones_like",
    "pad",
    "randn",
    "record",
    "split",
    "stack",
    "sum_to",
    "tensor",
    "where",
    "zeros",
    "zeros_like",
]
