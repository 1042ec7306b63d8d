"""Hypothesis strategies shared by the autograd tests.

Shapes are 0-d to 4-d with small sides, so that a full finite-difference Jacobian stays cheap
(at most 3^4 = 81 elements by default). Values are float64 and bounded. Kinks and singularities
are avoided by how values are *drawn*, never by shifting inputs after the fact:

- `nonzero_arrays`: |x| >= margin (abs, relu, division, the kink of clip at a bound)
- `positive_arrays`: x >= lo > 0 (log, sqrt, the base of pow)
- `grid_arrays`: values on a grid k * step + offset, so two arrays drawn with different offsets
  never come closer than |offset difference| (maximum, minimum, clip against its bounds)
- `distinct_arrays`: all elements at least `gap` apart (max/min reductions without ties)
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

MAX_SIDE = 3


def shapes(min_dims: int = 0, max_dims: int = 4, min_side: int = 1, max_side: int = MAX_SIDE):
    return hnp.array_shapes(
        min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    )


def broadcastable_shapes(num_shapes: int = 2, min_dims: int = 0, max_dims: int = 4):
    """Input shapes that broadcast together (each axis equal or 1, or missing on the left)."""
    return hnp.mutually_broadcastable_shapes(
        num_shapes=num_shapes, min_dims=min_dims, max_dims=max_dims, max_side=MAX_SIDE
    ).map(lambda b: b.input_shapes)


def floats(lo: float = -2.0, hi: float = 2.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)


def arrays(shape, lo: float = -2.0, hi: float = 2.0):
    return hnp.arrays(np.float64, shape, elements=floats(lo, hi))


def nonzero_arrays(shape, lo: float = -2.0, hi: float = 2.0, margin: float = 0.05):
    """|x| >= margin: away from the kink of abs/relu and the pole of 1/x."""
    return hnp.arrays(np.float64, shape, elements=floats(lo, hi).filter(lambda v: abs(v) >= margin))


def positive_arrays(shape, lo: float = 0.2, hi: float = 3.0):
    return arrays(shape, lo, hi)


def grid_arrays(shape, offset: float = 0.0, step: float = 0.25, k: int = 8):
    """Values k' * step + offset for integers |k'| <= k."""
    return hnp.arrays(
        np.float64, shape, elements=st.integers(-k, k).map(lambda i: i * step + offset)
    )


@st.composite
def distinct_arrays(draw, shape, gap: float = 0.1):
    """All elements pairwise at least `gap` apart, in a random order (no ties anywhere)."""
    n = int(np.prod(shape))
    order = np.array(draw(st.permutations(range(n))), dtype=np.float64)
    jitter = draw(hnp.arrays(np.float64, (n,), elements=floats(0.0, gap / 2)))
    return ((order - n / 2) * gap * 1.5 + jitter).reshape(shape)


@st.composite
def axes(draw, ndim: int):
    """A reduction axis: None, one int (maybe negative) or a tuple of distinct axes."""
    kind = draw(st.sampled_from(["none", "int", "tuple"] if ndim else ["none", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    return draw(hnp.valid_tuple_axes(ndim))


@st.composite
def shape_and_array(draw, elements=arrays, min_dims: int = 0, max_dims: int = 4, **kwargs):
    shape = draw(shapes(min_dims, max_dims))
    return draw(elements(shape, **kwargs))


# ----------------------------------------------------------------------------------------------
# The check every op goes through
# ----------------------------------------------------------------------------------------------


def check_op(fn, reference, *arrays, rtol: float = 1e-7, atol: float = 1e-9, **gradcheck_kw):
    """Check one differentiable op on float64 `arrays` (each becomes an input needing grad):

    1. forward equals `reference(*arrays)` (plain NumPy/SciPy) in value and shape;
    2. backward equals central finite differences (gradcheck, float64);
    3. float32 in -> float32 out and float32 grads, close to the float64 ones.
    """
    import tinymm as tm
    from tinymm.gradcheck import gradcheck

    xs = [tm.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*xs)
    expected = np.asarray(reference(*arrays))
    assert out.dtype == np.float64
    assert out.shape == expected.shape, (out.shape, expected.shape)
    np.testing.assert_allclose(out.data, expected, rtol=rtol, atol=atol)
    assert gradcheck(fn, xs, **gradcheck_kw)

    # the same op in float32, against the float64 gradient for the same upstream gradient
    u = np.random.default_rng(1).standard_normal(out.shape)
    xs64 = [tm.tensor(a, requires_grad=True) for a in arrays]
    fn(*xs64).backward(u)
    xs32 = [tm.tensor(a.astype(np.float32), requires_grad=True) for a in arrays]
    out32 = fn(*xs32)
    assert out32.dtype == np.float32, f"float32 inputs gave {out32.dtype}"
    np.testing.assert_allclose(out32.data, expected, rtol=1e-4, atol=1e-4)
    out32.backward(u.astype(np.float32))
    for x32, x64 in zip(xs32, xs64, strict=True):
        assert x32.grad is not None and x32.grad.dtype == np.float32
        scale = 1 + np.abs(x64.grad).max(initial=0)
        np.testing.assert_allclose(x32.grad, x64.grad, rtol=1e-3, atol=1e-4 * scale)
