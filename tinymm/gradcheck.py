"""Check a gradient against central finite differences, in float64.

For f: inputs -> scalar-or-tensor output, pick a random output weighting u, so L = <u, f(x)> is a
scalar and backward gives dL/dx = J^T u. Then compare with the numerical derivative

    dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)         (small inputs: every element)
    <dL/dx, v> ~ (L(x + eps v) - L(x - eps v)) / (2 eps)         (large inputs: random directions v)

The second form (as HIPS autograd) checks the same thing with a few evaluations however big x is.

`gradcheck(fn, inputs)` checks a function's inputs; `gradcheck_module(model, loss_fn, *inputs)`
checks a whole model's loss with respect to every parameter, and names the parameter that fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .tensor import Tensor, no_grad

FULL_JACOBIAN_MAX = 256  # inputs with more elements are checked along random directions


def gradcheck(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    directions: int = 8,
    seed: int = 0,
) -> bool:
    """True if backward through `fn(*inputs)` matches finite differences; else AssertionError.

    Inputs that require grad are checked (they must be float64: float32 is too coarse for
    differences). The error names the input and the worst element.
    """
    rng = np.random.default_rng(seed)
    inputs = list(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {inputs[i].dtype}; use float64")

    out = fn(*inputs)
    u = rng.standard_normal(out.shape)  # output weighting: L = <u, f(x)>

    def loss() -> float:
        with no_grad():
            return float(np.sum(u * fn(*inputs).data))

    for i in checked:
        inputs[i].grad = None
    (out * Tensor(u)).sum().backward()

    for i in checked:
        x = inputs[i]
        analytic = np.zeros(x.shape) if x.grad is None else x.grad
        if x.data.size <= FULL_JACOBIAN_MAX:
            numeric = np.zeros(x.shape)
            for j in np.ndindex(x.shape):
                numeric[j] = _partial(loss, x, j, eps)
            _compare(analytic, numeric, atol, rtol, f"input {i} {x.shape}", elementwise=True)
        else:
            for _ in range(directions):
                v = rng.standard_normal(x.shape)
                numeric = _along(loss, x, v, eps)
                _compare(
                    np.sum(analytic * v),
                    numeric,
                    atol,
                    rtol,
                    f"input {i} {x.shape} along a random direction",
                    elementwise=False,
                )
    return True


def _compare(analytic, numeric, atol, rtol, what, elementwise, index=None):
    """Raise if any |analytic - numeric| > atol + rtol |numeric|, naming the worst element
    (or `index`, when the two are single elements of a bigger array)."""
    analytic, numeric = np.asarray(analytic), np.asarray(numeric)
    error = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
    if np.all(error <= 0):
        return
    worst = np.unravel_index(np.argmax(error), error.shape) if error.ndim else ()
    where = f" at index {_index(worst if index is None else index)}" if elementwise else ""
    raise AssertionError(
        f"gradcheck failed for {what}{where}: analytic {analytic[worst]:.8g}, "
        f"numeric {numeric[worst]:.8g}, |diff| {abs(analytic[worst] - numeric[worst]):.3g}"
    )


def gradcheck_module(
    model: Any,
    loss_fn: Callable[..., Any],
    *inputs: Any,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    directions: int = 2,
    elements: int = 4,
    seed: int = 0,
) -> bool:
    """True if backward through `loss_fn(model, *inputs)` gives every parameter of `model` the
    gradient finite differences give; else AssertionError naming the parameter and an element.

    loss_fn is called as in `tinymm.train.fit`: it returns the loss, or (loss, metric); a loss
    that is not a scalar is weighted by a random u (L = <u, loss>). The model must be float64
    (`model.double()`) and deterministic (`model.eval()` turns dropout off).

    Each parameter p with gradient g = dL/dp is checked
      - element by element if it has at most FULL_JACOBIAN_MAX elements;
      - else along `directions` random directions v, <g, v> ~ (L(p + eps v) - L(p - eps v)) / 2eps,
        and on `elements` single elements (random ones and the one with the largest |g|).
    When a direction fails, it is halved again and again (keeping the half whose two sides
    disagree more) down to one element, which the error names with its analytic and numeric
    derivative: about 2 log2(p.size) more evaluations of the loss.
    """
    params = list(model.named_parameters())
    if not params:
        raise ValueError(f"gradcheck_module: {type(model).__name__} has no parameters")
    for name, p in params:
        if p.dtype != np.float64:
            raise TypeError(
                f"gradcheck_module: parameter '{name}' is {p.dtype}; call model.double() first "
                "(float32 is too coarse for finite differences)"
            )
    rng = np.random.default_rng(seed)

    def evaluate() -> Tensor:
        out = loss_fn(model, *inputs)
        out = out[0] if isinstance(out, tuple) else out
        if not isinstance(out, Tensor):
            raise TypeError(
                f"gradcheck_module: loss_fn returned {type(out).__name__}, not a Tensor"
            )
        return out

    out = evaluate()
    u = np.ones(out.shape) if out.size == 1 else rng.standard_normal(out.shape)

    def loss() -> float:
        with no_grad():
            return float(np.sum(u * evaluate().data))

    first, again = loss(), loss()
    if first != again:
        raise ValueError(
            f"gradcheck_module: loss_fn gave {first!r}, then {again!r} for the same parameters; "
            "it must be deterministic (dropout in training mode? call model.eval())"
        )
    for _, p in params:
        p.grad = None
    (out * Tensor(u)).sum().backward()

    for name, p in params:
        analytic = np.zeros(p.shape) if p.grad is None else p.grad
        what = f"parameter '{name}' {p.shape}"
        if p.size <= FULL_JACOBIAN_MAX:
            numeric = np.zeros(p.shape)
            for j in np.ndindex(p.shape):
                numeric[j] = _partial(loss, p, j, eps)
            _compare(analytic, numeric, atol, rtol, what, elementwise=True)
            continue
        flat = analytic.reshape(-1)
        picks = {int(np.argmax(np.abs(flat)))}
        picks.update(int(k) for k in rng.choice(p.size, size=min(elements, p.size), replace=False))
        for k in sorted(picks):
            j = np.unravel_index(k, p.shape)
            numeric = _partial(loss, p, j, eps)
            _compare(analytic[j], numeric, atol, rtol, f"{what} at index {_index(j)}", False)
        for _ in range(directions):
            v = rng.standard_normal(p.shape)
            numeric = _along(loss, p, v, eps)
            if _excess(np.sum(analytic * v), numeric, atol, rtol) > 0:
                k = _bisect(loss, p, analytic, v, eps, atol, rtol)
                j = np.unravel_index(k, p.shape)
                _compare(analytic[j], _partial(loss, p, j, eps), atol, rtol, what, True, j)
                _compare(  # no single element stands out: report the direction
                    np.sum(analytic * v),
                    numeric,
                    atol,
                    rtol,
                    f"{what} along a random direction",
                    False,
                )
    return True


def _partial(loss: Callable[[], float], x: Tensor, j: tuple, eps: float) -> float:
    """dL/dx_j by central differences; x.data is restored exactly."""
    original = x.data[j]
    x.data[j] = original + eps
    plus = loss()
    x.data[j] = original - eps
    minus = loss()
    x.data[j] = original
    return (plus - minus) / (2 * eps)


def _along(loss: Callable[[], float], x: Tensor, v: np.ndarray, eps: float) -> float:
    """<dL/dx, v> by central differences along v; x.data is restored exactly."""
    original = x.data.copy()
    x.data[...] = original + eps * v
    plus = loss()
    x.data[...] = original - eps * v
    minus = loss()
    x.data[...] = original
    return (plus - minus) / (2 * eps)


def _excess(analytic: float, numeric: float, atol: float, rtol: float) -> float:
    """How far |analytic - numeric| is beyond the tolerance (> 0: a failure)."""
    return abs(analytic - numeric) - (atol + rtol * abs(numeric))


def _bisect(loss, x, analytic, v, eps, atol, rtol) -> int:
    """Flat index of an element where a failing direction v goes wrong: keep halving v's support,
    following the half whose analytic and numeric <g, v> differ more."""
    flat_v, flat_g = v.reshape(-1), analytic.reshape(-1)
    support = np.arange(v.size)
    while len(support) > 1:
        halves = np.array_split(support, 2)
        gaps = []
        for half in halves:
            w = np.zeros(v.size)
            w[half] = flat_v[half]
            gaps.append(
                abs(float(flat_g[half] @ w[half]) - _along(loss, x, w.reshape(v.shape), eps))
            )
        support = halves[int(np.argmax(gaps))]
    return int(support[0])


def _index(j: tuple) -> tuple:
    return tuple(int(k) for k in j)
