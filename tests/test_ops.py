"""Property tests of every differentiable Tensor op and module-level op.

Each op is checked over generated shapes (0-d to 4-d; mutually broadcastable shapes for binary
ops) and values: forward against NumPy, backward against finite differences in float64, and the
same op in float32 (dtype kept, gradients close). Kinks and poles are kept out by the strategies.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import (
    arrays,
    axes,
    broadcastable_shapes,
    check_op,
    distinct_arrays,
    floats,
    grid_arrays,
    nonzero_arrays,
    positive_arrays,
    shapes,
)

import tinymm as tm
from tinymm.gradcheck import gradcheck

# ----------------------------------------------------------------------------------------------
# Binary arithmetic with broadcasting
# ----------------------------------------------------------------------------------------------

BINARY = {
    "add": (operator.add, arrays),
    "sub": (operator.sub, arrays),
    "mul": (operator.mul, arrays),
    "div": (operator.truediv, nonzero_arrays),  # the divisor stays away from 0
}


@pytest.mark.parametrize("name", list(BINARY))
@given(data=st.data(), shapes_=broadcastable_shapes())
def test_binary_ops_broadcast(name, data, shapes_):
    op, right = BINARY[name]
    a = data.draw(arrays(shapes_[0]), label="a")
    b = data.draw(right(shapes_[1], margin=0.3) if right is nonzero_arrays else right(shapes_[1]))
    check_op(op, op, a, b)


@given(data=st.data(), shapes_=broadcastable_shapes())
def test_pow_positive_base_both_gradients(data, shapes_):
    base = data.draw(positive_arrays(shapes_[0], 0.3, 2.5), label="base")
    exponent = data.draw(arrays(shapes_[1], -2.0, 2.0), label="exponent")
    check_op(operator.pow, np.power, base, exponent)


@given(x=shapes().flatmap(positive_arrays), p=st.sampled_from([2, 3, 0.5, -1, -1.5, 2.5]))
def test_pow_scalar_exponent(x, p):
    check_op(lambda t: t**p, lambda a: a**p, x)


@pytest.mark.parametrize(
    "op, ref",
    [
        (lambda t: 1.5 + t, lambda a: 1.5 + a),
        (lambda t: 1.5 - t, lambda a: 1.5 - a),
        (lambda t: -2 * t, lambda a: -2 * a),
        (lambda t: 1.5 / t, lambda a: 1.5 / a),
        (lambda t: 2.0**t, lambda a: 2.0**a),
        (lambda t: 3 + t * 0.5 - t / 4, lambda a: 3 + a * 0.5 - a / 4),
        (lambda t: -t, lambda a: -a),
    ],
    ids=["radd", "rsub", "rmul", "rtruediv", "rpow", "mixed", "neg"],
)
@given(x=shapes().flatmap(lambda s: nonzero_arrays(s, margin=0.3)))
def test_reflected_and_unary_ops_with_python_scalars(op, ref, x):
    check_op(op, ref, x)  # includes: a Python scalar never up-casts float32


@given(shapes_=broadcastable_shapes(), data=st.data())
def test_ndarray_on_the_left_gives_a_tensor_with_gradient(shapes_, data):
    a = data.draw(arrays(shapes_[0]))
    b = data.draw(arrays(shapes_[1]))
    t = tm.tensor(b, requires_grad=True)
    for op in (operator.add, operator.sub, operator.mul):
        out = op(a, t)  # ndarray (op) Tensor -> Tensor.__rop__ thanks to __array_priority__
        assert isinstance(out, tm.Tensor) and out.requires_grad
        np.testing.assert_allclose(out.data, op(a, b))
    c = a.astype(np.float32)  # a float32 constant keeps float32 tensors float32
    check_op(lambda t: c * t - c, lambda x: c * x - c, b)


@pytest.mark.parametrize("op", [operator.lt, operator.le, operator.gt, operator.ge, operator.eq])
@given(shapes_=broadcastable_shapes(), data=st.data())
def test_comparisons_are_boolean_and_outside_the_graph(op, shapes_, data):
    a = data.draw(grid_arrays(shapes_[0]))
    b = data.draw(grid_arrays(shapes_[1]))
    ta, tb = tm.tensor(a, requires_grad=True), tm.tensor(b, requires_grad=True)
    for out in (op(ta, tb), op(ta, b)):
        assert out.dtype == np.bool_
        assert not out.requires_grad and out.is_leaf
        np.testing.assert_array_equal(out.data, op(a, b))
    np.testing.assert_array_equal((ta != tb).data, a != b)


# ----------------------------------------------------------------------------------------------
# Matrix product: 1-D, 2-D and batched N-D with broadcast batch axes (np.matmul's signature)
# ----------------------------------------------------------------------------------------------


@given(
    shapes_=hnp.mutually_broadcastable_shapes(
        signature=np.matmul.signature, max_dims=2, max_side=3
    ),
    data=st.data(),
)
def test_matmul_all_ranks(shapes_, data):
    sa, sb = shapes_.input_shapes
    a = data.draw(arrays(sa), label="a")
    b = data.draw(arrays(sb), label="b")
    check_op(operator.matmul, np.matmul, a, b)


@given(a=arrays((2, 3, 4)), w=arrays((4, 2)))
def test_matmul_folded_nd_by_2d_and_reflected(a, w):
    check_op(operator.matmul, np.matmul, a, w)  # the folded (N*L, D) @ (D, O) path
    t = tm.tensor(w, requires_grad=True)
    out = a @ t  # ndarray @ Tensor -> Tensor.__rmatmul__
    assert isinstance(out, tm.Tensor)
    out.sum().backward()
    np.testing.assert_allclose(t.grad, a.reshape(-1, 4).sum(0)[:, None] * np.ones((4, 2)))


# ----------------------------------------------------------------------------------------------
# Elementwise functions
# ----------------------------------------------------------------------------------------------


@given(x=shapes().flatmap(lambda s: arrays(s, -3, 3)))
def test_exp(x):
    check_op(lambda t: t.exp(), np.exp, x)


@given(x=shapes().flatmap(lambda s: positive_arrays(s, 0.1, 5)))
def test_log(x):
    check_op(lambda t: t.log(), np.log, x)


@given(x=shapes().flatmap(lambda s: positive_arrays(s, 0.1, 5)))
def test_sqrt(x):
    check_op(lambda t: t.sqrt(), np.sqrt, x)


@given(x=shapes().flatmap(lambda s: arrays(s, -3, 3)))
def test_tanh(x):
    check_op(lambda t: t.tanh(), np.tanh, x)


@given(x=shapes().flatmap(nonzero_arrays))
def test_abs_away_from_zero(x):
    check_op(lambda t: t.abs(), np.abs, x)


@given(
    x=shapes().flatmap(lambda s: grid_arrays(s, offset=0.125)),
    lo=st.integers(-6, 0).map(lambda k: k * 0.25),
    width=st.integers(1, 8).map(lambda k: k * 0.25),
    which=st.sampled_from(["both", "min", "max"]),
)
def test_clip_values_stay_off_the_bounds(x, lo, width, which):
    hi = lo + width  # bounds on the 0.25 grid, values on the grid shifted by 0.125
    lo_, hi_ = (lo if which != "max" else None), (hi if which != "min" else None)
    check_op(lambda t: t.clip(lo_, hi_), lambda a: np.clip(a, lo_, hi_), x)


@pytest.mark.parametrize("fn, ref", [(tm.maximum, np.maximum), (tm.minimum, np.minimum)])
@given(shapes_=broadcastable_shapes(), data=st.data())
def test_maximum_minimum_broadcast(fn, ref, shapes_, data):
    a = data.draw(grid_arrays(shapes_[0]), label="a")
    b = data.draw(grid_arrays(shapes_[1], offset=0.1), label="b")  # |a - b| >= 0.1 everywhere
    check_op(fn, ref, a, b)
    check_op(lambda t: fn(t, 0.05), lambda x: ref(x, 0.05), a)  # a Python number operand


@pytest.mark.parametrize("fn", [tm.maximum, tm.minimum])
def test_maximum_minimum_split_ties_evenly(fn):
    a = tm.tensor([1.0, 2.0, 3.0], requires_grad=True)
    b = tm.tensor([2.0, 2.0, 1.0], requires_grad=True)
    fn(a, b).sum().backward()
    winner_a = [0.0, 0.5, 1.0] if fn is tm.maximum else [1.0, 0.5, 0.0]
    np.testing.assert_allclose(a.grad, winner_a)
    np.testing.assert_allclose(b.grad, 1 - np.array(winner_a))


# ----------------------------------------------------------------------------------------------
# where
# ----------------------------------------------------------------------------------------------


@given(shapes_=broadcastable_shapes(num_shapes=3), data=st.data())
def test_where_broadcast(shapes_, data):
    cond = data.draw(hnp.arrays(np.bool_, shapes_[0]), label="cond")
    a = data.draw(arrays(shapes_[1]), label="a")
    b = data.draw(arrays(shapes_[2]), label="b")
    check_op(lambda x, y: tm.where(cond, x, y), lambda x, y: np.where(cond, x, y), a, b)
    check_op(lambda x: tm.where(tm.tensor(cond), x, 0.0), lambda x: np.where(cond, x, 0.0), a)


def test_where_inf_in_the_untaken_branch_does_not_reach_the_taken_one():
    cond = np.array([True, True, False])
    a = tm.tensor([1.0, 2.0, 3.0], requires_grad=True)
    b = tm.tensor([np.inf, np.nan, 4.0], requires_grad=True)  # bad values where not taken
    out = tm.where(cond, a, b)
    np.testing.assert_array_equal(out.data, [1.0, 2.0, 4.0])
    (out * out).sum().backward()
    np.testing.assert_array_equal(a.grad, [2.0, 4.0, 0.0])
    np.testing.assert_array_equal(b.grad, [0.0, 0.0, 8.0])


def test_where_inf_upstream_gradient_does_not_become_nan_in_the_untaken_branch():
    # d/dy (1/y) at y = 0 is -inf; the branch not taken there must get an exact 0, not inf * 0
    a = tm.tensor([0.0, 1.0], requires_grad=True)
    b = tm.tensor([5.0, 5.0], requires_grad=True)
    with np.errstate(divide="ignore"):
        (1 / tm.where([True, True], a, b)).sum().backward()
    assert not np.isnan(b.grad).any()
    np.testing.assert_array_equal(b.grad, [0.0, 0.0])
    assert a.grad[0] == -np.inf and a.grad[1] == -1.0


@given(x=shapes(1).flatmap(lambda s: grid_arrays(s, step=0.5)))
def test_where_double_where_pattern_for_sqrt(x):
    """The documented pattern where(x > 0, sqrt(where(x > 0, x, 1)), 0): finite gradients."""
    t = tm.tensor(x, requires_grad=True)
    positive = t > 0
    out = tm.where(positive, tm.where(positive, t, 1.0).sqrt(), 0.0)
    np.testing.assert_allclose(out.data, np.sqrt(np.maximum(x, 0)))
    out.sum().backward()
    assert np.isfinite(t.grad).all()
    expected = np.where(x > 0, 0.5 / np.sqrt(np.where(x > 0, x, 1)), 0.0)
    np.testing.assert_allclose(t.grad, expected)


def test_where_single_where_around_sqrt_leaks_nan_which_is_why_the_pattern_exists():
    t = tm.tensor([-1.0, 0.0, 4.0], requires_grad=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        tm.where(t > 0, t.sqrt(), 0.0).sum().backward()
    assert np.isnan(t.grad[0]) and t.grad[2] == 0.25


# ----------------------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------------------


REDUCTIONS = ["sum", "mean", "var"]


@pytest.mark.parametrize("name", REDUCTIONS)
@given(data=st.data(), x=shapes().flatmap(arrays), keepdims=st.booleans())
def test_reductions(name, data, x, keepdims):
    axis = data.draw(axes(x.ndim), label="axis")
    if name != "sum":
        assume(axis != ())  # mean/var over no axis: NumPy itself is a no-op only for sum

    def fn(t):
        return getattr(t, name)(axis=axis, keepdims=keepdims)

    check_op(fn, lambda a: getattr(np, name)(a, axis=axis, keepdims=keepdims), x)


@pytest.mark.parametrize("name", ["max", "min"])
@given(data=st.data(), x=shapes().flatmap(distinct_arrays), keepdims=st.booleans())
def test_max_min_without_ties(name, data, x, keepdims):
    axis = data.draw(axes(x.ndim), label="axis")
    assume(x.size > 0)

    def fn(t):
        return getattr(t, name)(axis=axis, keepdims=keepdims)

    check_op(fn, lambda a: getattr(np, name)(a, axis=axis, keepdims=keepdims), x)


@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_split_the_gradient_evenly_between_ties(name):
    sign = 1 if name == "max" else -1
    x = tm.tensor(sign * np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), requires_grad=True)
    getattr(x, name)(axis=1).sum().backward()
    np.testing.assert_allclose(x.grad, [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    x.grad = None
    (getattr(x, name)() * 6).backward()  # axis=None: the two 3s tie
    np.testing.assert_allclose(x.grad, [[0, 3, 3], [0, 0, 0]])
    x.grad = None
    getattr(x, name)(axis=(0, 1), keepdims=True).backward(np.array([[2.0]]))
    np.testing.assert_allclose(x.grad, [[0, 1, 1], [0, 0, 0]])


# ----------------------------------------------------------------------------------------------
# Shape ops
# ----------------------------------------------------------------------------------------------


@given(x=shapes().flatmap(arrays), data=st.data())
def test_reshape(x, data):
    dims = list(x.shape) + [1] * data.draw(st.integers(0, 2))
    target = tuple(data.draw(st.permutations(dims)))  # same number of elements, new layout
    if target and data.draw(st.booleans()):
        target = (-1, *target[1:])
    check_op(lambda t: t.reshape(target), lambda a: a.reshape(target), x)
    check_op(lambda t: t.reshape(*target), lambda a: a.reshape(target), x)
    check_op(lambda t: t.flatten(), lambda a: a.reshape(-1), x)


@given(x=shapes().flatmap(arrays), data=st.data())
def test_transpose_any_permutation_with_negative_axes(x, data):
    perm = data.draw(st.permutations(range(x.ndim)))
    perm = tuple(p - x.ndim if data.draw(st.booleans()) else p for p in perm)
    check_op(lambda t: t.transpose(*perm), lambda a: a.transpose(perm), x)
    check_op(lambda t: t.transpose(perm), lambda a: a.transpose(perm), x)
    check_op(lambda t: t.transpose(), lambda a: a.transpose(), x)
    check_op(lambda t: t.T, lambda a: a.T, x)


@given(x=shapes(1).flatmap(arrays), data=st.data())
def test_swapaxes(x, data):
    i = data.draw(st.integers(-x.ndim, x.ndim - 1))
    j = data.draw(st.integers(-x.ndim, x.ndim - 1))
    check_op(lambda t: t.swapaxes(i, j), lambda a: a.swapaxes(i, j), x)


@given(shape=shapes(min_side=1, max_side=2), data=st.data())
def test_squeeze(shape, data):
    x = data.draw(arrays(shape))
    ones = [i for i, n in enumerate(shape) if n == 1]
    axis = data.draw(
        st.one_of(st.none(), st.lists(st.sampled_from(ones), unique=True).map(tuple))
        if ones
        else st.none()
    )
    check_op(lambda t: t.squeeze(axis), lambda a: np.squeeze(a, axis), x)


@given(x=shapes(0, 3).flatmap(arrays), data=st.data())
def test_expand_dims(x, data):
    axis = data.draw(st.integers(-x.ndim - 1, x.ndim))
    check_op(lambda t: t.expand_dims(axis), lambda a: np.expand_dims(a, axis), x)


@given(
    shapes_=hnp.mutually_broadcastable_shapes(num_shapes=1, max_dims=4, max_side=3),
    data=st.data(),
)
def test_broadcast_to_sums_the_gradient_back(shapes_, data):
    x = data.draw(arrays(shapes_.input_shapes[0]))
    target = shapes_.result_shape
    check_op(lambda t: t.broadcast_to(target), lambda a: np.broadcast_to(a, target), x)


# ----------------------------------------------------------------------------------------------
# Indexing
# ----------------------------------------------------------------------------------------------


@given(x=shapes(1).flatmap(arrays), data=st.data())
def test_getitem_basic(x, data):
    index = data.draw(hnp.basic_indices(x.shape, allow_newaxis=True), label="index")
    check_op(lambda t: t[index], lambda a: a[index], x)


@given(x=shapes(1).flatmap(arrays), data=st.data())
def test_getitem_integer_arrays_with_repeats(x, data):
    index = data.draw(
        hnp.integer_array_indices(x.shape, result_shape=hnp.array_shapes(max_dims=2, max_side=5)),
        label="index",
    )
    check_op(lambda t: t[index], lambda a: a[index], x)
    t = tm.tensor(x, requires_grad=True)
    t[index].sum().backward()
    counts = np.zeros(x.shape)
    np.add.at(counts, index, 1.0)  # every repeat adds its share
    np.testing.assert_array_equal(t.grad, counts)


@given(x=shapes(1).flatmap(arrays), data=st.data())
def test_getitem_boolean_mask(x, data):
    mask = data.draw(hnp.arrays(np.bool_, x.shape), label="mask")
    check_op(lambda t: t[mask], lambda a: a[mask], x)
    check_op(lambda t: t[tm.tensor(mask)], lambda a: a[mask], x)


@given(
    rows=st.integers(1, 6),
    tail=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
    ids=hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=6),
    data=st.data(),
)
def test_add_rows_is_add_at(rows, tail, ids, data):
    """The gradient of a row lookup (getitem with one id array) sums each id's rows,
    negative ids included: what np.add.at does, up to float rounding."""
    from tinymm.tensor import add_rows

    index = data.draw(hnp.arrays(np.int64, ids, elements=st.integers(-rows, rows - 1)))
    g = data.draw(hnp.arrays(np.float64, ids + tail, elements=st.floats(-10, 10)))
    expected = np.zeros((rows, *tail))
    np.add.at(expected, index, g)
    got = add_rows((rows, *tail), index, g)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_getitem_repeated_index_scatter_adds():
    t = tm.tensor([1.0, 2.0, 3.0], requires_grad=True)
    t[[0, 0, 2, 0]].sum().backward()
    np.testing.assert_array_equal(t.grad, [3.0, 0.0, 1.0])
    t.grad = None
    t[tm.tensor(np.array([2, 2]))].sum().backward()
    np.testing.assert_array_equal(t.grad, [0.0, 0.0, 2.0])


# ----------------------------------------------------------------------------------------------
# concatenate, stack, split, pad
# ----------------------------------------------------------------------------------------------


@given(
    base=shapes(1, 3),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    data=st.data(),
)
def test_concatenate(base, sizes, data):
    axis = data.draw(st.integers(-len(base), len(base) - 1))
    parts = []
    for n in sizes:
        shape = list(base)
        shape[axis] = n
        parts.append(data.draw(arrays(tuple(shape))))
    check_op(
        lambda *ts: tm.concatenate(ts, axis=axis),
        lambda *xs: np.concatenate(xs, axis=axis),
        *parts,
    )


@given(shape=shapes(0, 3), k=st.integers(1, 3), data=st.data())
def test_stack(shape, k, data):
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    parts = [data.draw(arrays(shape)) for _ in range(k)]
    check_op(lambda *ts: tm.stack(ts, axis=axis), lambda *xs: np.stack(xs, axis=axis), *parts)


@given(x=shapes(1, 3, max_side=4).flatmap(arrays), data=st.data())
def test_split_sections_and_indices(x, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    n = x.shape[axis]
    sections = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
    for how in (sections, cuts):
        pieces = tm.split(tm.tensor(x), how, axis=axis)
        expected = np.split(x, how, axis=axis)
        assert len(pieces) == len(expected)
        for p, e in zip(pieces, expected, strict=True):
            np.testing.assert_array_equal(p.data, e)
        # gradient: weight each piece differently, the pieces tile x
        weights = [float(i + 1) for i in range(len(expected))]

        def fn(t, how=how, weights=weights):
            return tm.concatenate(
                [p * w for p, w in zip(tm.split(t, how, axis=axis), weights, strict=True)], axis
            )

        ref = np.concatenate([e * w for e, w in zip(expected, weights, strict=True)], axis)
        check_op(fn, lambda a, ref=ref: ref, x)


@given(x=shapes(1, 3).flatmap(arrays), data=st.data(), value=floats(-1, 1))
def test_pad(x, data, value):
    widths = tuple(
        (data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))) for _ in range(x.ndim)
    )
    check_op(
        lambda t: tm.pad(t, widths, constant_values=value),
        lambda a: np.pad(a, widths, constant_values=value),
        x,
    )
    check_op(lambda t: tm.pad(t, 1), lambda a: np.pad(a, 1), x)


# ----------------------------------------------------------------------------------------------
# Composites: a small expression using many ops at once, checked as one function
# ----------------------------------------------------------------------------------------------


@given(x=arrays((2, 3)), w=arrays((3, 3)), b=positive_arrays((3,)))
def test_expression_mixing_ops(x, w, b):
    def fn(x, w, b):
        h = (x @ w).tanh() * b.sqrt() + x[:, ::-1] / b
        return (h.exp().sum(axis=1, keepdims=True).log() - h.mean(axis=0)).var()

    def ref(x, w, b):
        h = np.tanh(x @ w) * np.sqrt(b) + x[:, ::-1] / b
        return (np.log(np.exp(h).sum(axis=1, keepdims=True)) - h.mean(axis=0)).var()

    check_op(fn, ref, x, w, b)


def test_gradcheck_random_directions_on_a_large_broadcast_op():
    rng = np.random.default_rng(0)
    a = tm.tensor(rng.standard_normal((20, 30)), requires_grad=True)  # 600 > 256 elements
    b = tm.tensor(rng.standard_normal((30,)), requires_grad=True)
    assert gradcheck(lambda a, b: (a * b).tanh() @ b, [a, b])
