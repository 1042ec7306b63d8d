"""Check a gradient against central finite differences, in float64.

For f: inputs -> scalar-or-tensor output, pick a random output weighting u, so L = <u, f(x)> is a
scalar and backward gives dL/dx = J^T u. Then compare with the numerical derivative

    dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)         (small inputs: every element)
    <dL/dx, v> ~ (L(x + eps v) - L(x - eps v)) / (2 eps)         (large inputs: random directions v)

The second form (as HIPS autograd) checks the same thing with a few evaluations however big x is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
                original = x.data[j]
                x.data[j] = original + eps
                plus = loss()
                x.data[j] = original - eps
                minus = loss()
                x.data[j] = original
                numeric[j] = (plus - minus) / (2 * eps)
            _compare(analytic, numeric, atol, rtol, f"input {i} {x.shape}", elementwise=True)
        else:
            original = x.data.copy()
            for _ in range(directions):
                v = rng.standard_normal(x.shape)
                x.data[...] = original + eps * v
                plus = loss()
                x.data[...] = original - eps * v
                minus = loss()
                x.data[...] = original
                numeric = (plus - minus) / (2 * eps)
                _compare(
                    np.sum(analytic * v),
                    numeric,
                    atol,
                    rtol,
                    f"input {i} {x.shape} along a random direction",
                    elementwise=False,
                )
    return True


def _compare(analytic, numeric, atol, rtol, what, elementwise):
    analytic, numeric = np.asarray(analytic), np.asarray(numeric)
    error = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
    if np.all(error <= 0):
        return
    worst = np.unravel_index(np.argmax(error), error.shape) if error.ndim else ()
    where = f" at index {tuple(int(k) for k in worst)}" if elementwise else ""
    raise AssertionError(
        f"gradcheck failed for {what}{where}: analytic {analytic[worst]:.8g}, "
        f"numeric {numeric[worst]:.8g}, |diff| {abs(analytic[worst] - numeric[worst]):.3g}"
    )
