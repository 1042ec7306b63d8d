"""Tests of the autograd engine: graph walking, gradient accumulation, graph release, in-place
checks, no_grad, dtypes, and the Tensor basics (constructors, repr, NumPy interop)."""

from __future__ import annotations

import gc
import weakref
from itertools import pairwise

import numpy as np
import pytest

import tinymm as tm
import tinymm.functional as F
from tinymm.tensor import record

# ----------------------------------------------------------------------------------------------
# Graph shapes: reuse, diamonds, depth
# ----------------------------------------------------------------------------------------------


def test_reuse_of_a_tensor_adds_its_gradients():
    a = tm.tensor([1.0, -2.0, 3.0], requires_grad=True)
    b = a + a  # b = 2a
    c = b * b  # c = 4a^2, dc/da = 8a
    c.sum().backward()
    np.testing.assert_allclose(a.grad, 8 * a.data)


def test_same_tensor_twice_in_one_op():
    a = tm.tensor([1.5, -2.0], requires_grad=True)
    (a * a * a).sum().backward()
    np.testing.assert_allclose(a.grad, 3 * a.data**2)


def test_diamond_graph():
    x = tm.tensor([0.3, -1.2], dtype=np.float64, requires_grad=True)
    left, right = x.exp(), x * 3.0
    top = left * right + left  # f = 3x e^x + e^x, f' = 3e^x + 3x e^x + e^x
    top.sum().backward()
    e = np.exp(x.data)
    np.testing.assert_allclose(x.grad, 3 * e + 3 * x.data * e + e)


def test_wide_diamond_each_path_counted_once():
    x = tm.tensor(2.0, requires_grad=True)
    paths = [x * float(k) for k in range(1, 11)]
    total = paths[0]
    for p in paths[1:]:
        total = total + p
    (total * x).backward()  # f = 55 x^2
    assert x.grad == pytest.approx(220.0)


def test_deep_chain_of_100000_ops_no_recursion_error():
    x = tm.tensor(1.0, dtype=np.float64, requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y * 1.00001
    y.backward()
    assert x.grad == pytest.approx(1.00001**100_000)


def test_deep_chain_freed_without_backward_does_not_crash():
    x = tm.tensor(1.0, requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y + 1.0
    ref = weakref.ref(y)
    del y  # dropping a 100,000-deep graph must not overflow the C stack
    gc.collect()
    assert ref() is None


def test_grad_only_for_tensors_that_require_it():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    b = tm.tensor([3.0, 4.0])
    (a * b).sum().backward()
    np.testing.assert_array_equal(a.grad, [3.0, 4.0])
    assert b.grad is None
    assert not (b * 2).requires_grad and (b * 2).is_leaf


def test_non_leaf_grads_are_not_kept_unless_asked():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    h = a * 3
    k = a * 4
    k.retain_grad()
    (h * k).sum().backward()
    assert h.grad is None
    np.testing.assert_allclose(k.grad, h.data)
    np.testing.assert_allclose(a.grad, 24 * a.data)


# ----------------------------------------------------------------------------------------------
# backward: accumulation, explicit gradients, errors
# ----------------------------------------------------------------------------------------------


def test_leaf_grad_accumulates_across_backward_calls_until_zeroed():
    w = tm.tensor([1.0, 2.0], requires_grad=True)
    (w * 3).sum().backward()
    (w * w).sum().backward()
    np.testing.assert_allclose(w.grad, 3 + 2 * w.data)
    w.grad = None
    (w * 3).sum().backward()
    np.testing.assert_allclose(w.grad, [3.0, 3.0])
    w.grad[...] = 0  # zeroing in place works too
    (w * 5).sum().backward()
    np.testing.assert_allclose(w.grad, [5.0, 5.0])


def test_second_backward_through_a_released_graph_raises():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    loss = (a * a).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="released.*retain_graph=True"):
        loss.backward()


def test_retain_graph_allows_a_second_backward_that_doubles_the_grad():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    loss = (a * a).sum()
    loss.backward(retain_graph=True)
    first = a.grad.copy()
    loss.backward()
    np.testing.assert_allclose(a.grad, 2 * first)


def test_graph_is_released_after_backward_so_intermediates_become_garbage():
    a = tm.tensor(np.ones(3), requires_grad=True)
    hidden = a * 2.0
    ref = weakref.ref(hidden)
    loss = (hidden.exp() * hidden).sum()
    del hidden
    gc.collect()
    assert ref() is not None  # still needed by the graph
    loss.backward()
    gc.collect()
    assert ref() is None  # freed by backward, while `loss` is still alive


def test_retained_graph_keeps_intermediates_alive():
    a = tm.tensor(np.ones(3), requires_grad=True)
    hidden = a * 2.0
    ref = weakref.ref(hidden)
    loss = hidden.sum()
    del hidden
    loss.backward(retain_graph=True)
    gc.collect()
    assert ref() is not None


def test_backward_on_a_non_scalar_without_grad_is_a_clear_error():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"scalar.*shape \(2,\).*\.sum\(\)"):
        (a * 2).backward()


def test_backward_on_a_tensor_without_graph_is_an_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        tm.tensor(1.0).backward()


def test_backward_with_explicit_grad():
    a = tm.tensor([1.0, 2.0, 3.0], requires_grad=True)
    (a * a).backward(np.array([1.0, 0.0, -2.0]))
    np.testing.assert_allclose(a.grad, [2.0, 0.0, -12.0])
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        (a * a).backward(np.ones(2))


def test_backward_from_a_leaf():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    a.backward(np.array([3.0, 4.0]))
    np.testing.assert_array_equal(a.grad, [3.0, 4.0])


# ----------------------------------------------------------------------------------------------
# no_grad
# ----------------------------------------------------------------------------------------------


def test_no_grad_context_records_no_graph_and_restores_the_mode():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    with tm.no_grad():
        assert not tm.is_grad_enabled()
        b = (a * 2).exp().sum()
        with tm.no_grad():
            pass
        assert not tm.is_grad_enabled()  # nested exit does not switch it back on
    assert tm.is_grad_enabled()
    assert not b.requires_grad and b.is_leaf
    with pytest.raises(RuntimeError):
        b.backward()


def test_no_grad_as_a_decorator():
    @tm.no_grad()
    def step(t):
        return t * 3

    a = tm.tensor([1.0], requires_grad=True)
    assert not step(a).requires_grad
    assert (a * 3).requires_grad


def test_no_grad_restores_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError), tm.no_grad():
        raise ZeroDivisionError
    assert tm.is_grad_enabled()


def test_detach_cuts_the_graph():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    (a.detach() * a).sum().backward()
    np.testing.assert_array_equal(a.grad, a.data)  # d/da (const * a) = const


# ----------------------------------------------------------------------------------------------
# Version counters: in-place changes to saved tensors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda t: t.add_(1.0), "add_"),
        (lambda t: t.add_(np.ones(2), alpha=0.5), "add_"),
        (lambda t: t.mul_(2.0), "mul_"),
        (lambda t: t.sub_(tm.ones(2)), "sub_"),
        (lambda t: t.zero_(), "zero_"),
        (lambda t: t.copy_(np.array([5.0, 6.0])), "copy_"),
    ],
)
def test_in_place_change_of_a_saved_tensor_raises_naming_the_op(change, name):
    w = tm.tensor([1.0, 2.0], requires_grad=True)
    loss = (w * w).sum()  # mul saved w
    change(w)
    with pytest.raises(RuntimeError, match=f"'mul'.*'{name}'"):
        loss.backward()


def test_in_place_ops_compute_what_they_say():
    t = tm.tensor([1.0, 2.0])
    assert t._version == 0  # never changed in place
    versions = []
    assert t.add_(1.0) is t
    versions.append(t._version)
    np.testing.assert_array_equal(t.data, [2.0, 3.0])
    for change, expected in [
        (lambda: t.add_(tm.tensor([2.0, 2.0]), alpha=-0.5), [1.0, 2.0]),
        (lambda: t.mul_(3), [3.0, 6.0]),
        (lambda: t.sub_(1), [2.0, 5.0]),
        (lambda: t.copy_(tm.tensor([7.0, 8.0])), [7.0, 8.0]),
        (lambda: t.zero_(), [0.0, 0.0]),
    ]:
        np.testing.assert_array_equal(change().data, expected)
        versions.append(t._version)
    assert 0 < versions[0] and all(a < b for a, b in pairwise(versions))  # each one counted


def test_in_place_change_of_a_tensor_not_saved_by_the_op_is_fine():
    w = tm.tensor([1.0, 2.0], requires_grad=True)
    b = tm.tensor([3.0, 4.0], requires_grad=True)
    loss = (w + b).sum()  # add saves nothing: its gradient does not depend on the values
    w.add_(10.0)
    b.zero_()
    loss.backward()
    np.testing.assert_array_equal(w.grad, [1.0, 1.0])
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])


def test_in_place_change_after_backward_is_fine_optimizer_step():
    w = tm.tensor([1.0, 2.0], requires_grad=True)
    for _ in range(3):
        w.grad = None
        loss = ((w - 5.0) * (w - 5.0)).sum()
        loss.backward()
        w.sub_(0.25 * w.grad)
    np.testing.assert_allclose(w.data, 5 + (np.array([1.0, 2.0]) - 5) * 0.5**3)


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------


def test_default_dtype_is_float32_and_python_scalars_never_upcast():
    x = tm.tensor([1.0, 2.0], requires_grad=True)
    assert x.dtype == np.float32 == tm.DEFAULT_DTYPE
    outs = [
        x + 1.5,
        2.5 - x,
        x * 3,
        x / 7.0,
        7.0 / x,
        x**2,
        x**0.5,
        2.0**x,
        -x,
        tm.maximum(x, 1.5),
        tm.minimum(0.5, x),
        tm.where(x > 1, x, 0.0),
        x.clip(0.0, 1.5),
        x * np.float64(2.0),
        x * np.int64(2),
        x @ x,
        x.var() + x.mean() * x.max(),
        tm.pad(x, 1, constant_values=2.0),
    ]
    for out in outs:
        assert out.dtype == np.float32, out
    sum(o.sum() for o in outs).backward()
    assert x.grad.dtype == np.float32


def test_float32_grads_stay_float32_across_accumulation():
    x = tm.tensor([1.0, 3.0, 3.0], requires_grad=True)
    for _ in range(2):
        (x.max() * x.var()).backward()  # max's tie-split would divide by an int64 count
    assert x.grad.dtype == np.float32


def test_float64_works_end_to_end():
    x = tm.tensor(np.array([[0.5, -1.0], [2.0, 0.25]]), requires_grad=True)
    w = tm.tensor(np.eye(2) * 0.5, requires_grad=True)
    y = F.softmax(F.layer_norm(x @ w, None, None).tanh() * 2.0, axis=-1)
    loss = F.cross_entropy(y.log(), np.array([0, 1]))
    loss.backward()
    for t in (x, w, y, loss):
        assert t.dtype == np.float64
    assert x.grad.dtype == np.float64 and w.grad.dtype == np.float64


def test_only_floating_tensors_can_require_grad():
    with pytest.raises(TypeError, match="floating"):
        tm.tensor([1, 2], requires_grad=True)


def test_astype_is_differentiable_and_casts_the_gradient_back():
    x = tm.tensor([1.0, 2.0], requires_grad=True)
    y = x.astype(np.float64)
    assert y.dtype == np.float64
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])


# ----------------------------------------------------------------------------------------------
# Tensor basics
# ----------------------------------------------------------------------------------------------


def test_numpy_interop_and_properties():
    t = tm.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    a = np.asarray(t)
    assert a is t.data and a.dtype == np.float32
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    assert t.shape == (2, 3) and t.ndim == 2 and t.size == 6 and len(t) == 2
    assert t.numpy() is t.data
    assert tm.tensor(3.5).item() == 3.5 and float(tm.tensor(2.0)) == 2.0
    np.testing.assert_array_equal(t.T.data, t.data.T)
    assert bool(tm.tensor(1.0)) and not bool(tm.tensor(0.0))
    assert {t: 1}[t] == 1  # hashable despite elementwise ==


def test_repr_is_readable():
    assert repr(tm.tensor([1.0, 2.5])) == "tensor([1.  2.5])"
    assert repr(tm.tensor([1.0], requires_grad=True)) == "tensor([1.], requires_grad=True)"
    assert "grad_fn=mul" in repr(tm.tensor([1.0], requires_grad=True) * 2)
    assert "dtype=float64" in repr(tm.tensor(np.zeros(2)))
    assert "int64" in repr(tm.arange(3))
    big = repr(tm.zeros(1000))
    assert "..." in big and len(big) < 200  # summarised, not 1000 numbers


def test_constructors():
    assert tm.zeros(2, 3).shape == (2, 3) and tm.zeros((2, 3)).dtype == np.float32
    np.testing.assert_array_equal(tm.ones([2]).data, [1.0, 1.0])
    assert tm.zeros(2, dtype=np.float64).dtype == np.float64
    assert tm.ones(3, requires_grad=True).requires_grad
    assert tm.randn(4, 5).shape == (4, 5) and tm.randn(4).dtype == np.float32
    np.testing.assert_array_equal(tm.arange(4).data, [0, 1, 2, 3])
    assert tm.arange(4).dtype.kind == "i"
    assert tm.arange(0.0, 1.0, 0.25).dtype == np.float32
    assert len(tm.arange(0.0, 1.0, 0.25)) == 4
    src = tm.tensor(np.ones((2, 2), dtype=np.float64))
    assert tm.zeros_like(src).dtype == np.float64 and tm.zeros_like(src).shape == (2, 2)
    np.testing.assert_array_equal(tm.ones_like(src).data, 1.0)
    assert tm.ones_like(np.zeros(3, dtype=np.float32), dtype=np.float64).dtype == np.float64
    assert tm.tensor([1, 2]).dtype.kind == "i"  # integers keep their kind
    assert tm.tensor(np.float64(1.0)).dtype == np.float64  # NumPy float64 stays float64
    assert tm.tensor([True]).dtype == np.bool_


def test_manual_seed_reproduces_random_tensors():
    tm.manual_seed(123)
    a = tm.randn(3, 4).data
    b = tm.randn(3, 4).data
    tm.manual_seed(123)
    np.testing.assert_array_equal(tm.randn(3, 4).data, a)
    np.testing.assert_array_equal(tm.randn(3, 4).data, b)
    assert not np.array_equal(a, b)
    tm.manual_seed(124)
    assert not np.array_equal(tm.randn(3, 4).data, a)
    x = tm.randn(20000).data
    assert abs(x.mean()) < 0.03 and abs(x.std() - 1) < 0.03


# ----------------------------------------------------------------------------------------------
# The record hook (how an op is written) and sum_to
# ----------------------------------------------------------------------------------------------


def test_record_links_an_op_only_when_needed():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    out = record("double", a.data * 2, (a,), lambda g: (2 * g,))
    assert out.requires_grad and "grad_fn=double" in repr(out)
    out.sum().backward()
    np.testing.assert_array_equal(a.grad, [2.0, 2.0])
    with tm.no_grad():
        assert record("double", a.data * 2, (a,), lambda g: (2 * g,)).is_leaf
    assert record("double", a.data, (tm.tensor([1.0]),), lambda g: (g,)).is_leaf


def test_engine_sums_broadcast_gradients_back_and_rejects_wrong_shapes():
    a = tm.tensor(np.ones((3, 1)), requires_grad=True)
    out = record("bcast", np.ones((2, 3, 4)), (a,), lambda g: (g,))
    out.sum().backward()
    np.testing.assert_array_equal(a.grad, np.full((3, 1), 8.0))
    b = tm.tensor(np.ones((2, 3)), requires_grad=True)
    bad = record("bad", np.ones((3, 2)), (b,), lambda g: (g,))  # returns a (3, 2) gradient
    with pytest.raises(RuntimeError, match=r"\(3, 2\).*\(2, 3\)"):
        bad.sum().backward()


def test_an_op_returning_none_for_an_input_does_not_lose_that_inputs_other_gradients():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    b = tm.tensor([1.0, 2.0], requires_grad=True)
    c = b * 1.0  # c reaches b; the op below gives c no gradient (None)
    first = record("first", a.data + c.data, (a, c), lambda g: (g, None))
    (first + b * 3).sum().backward()
    np.testing.assert_array_equal(a.grad, [1.0, 1.0])
    np.testing.assert_array_equal(b.grad, [3.0, 3.0])  # the path through b * 3 still counts
    d = tm.tensor([1.0], requires_grad=True)
    record("cut", d.data * 2, (d * 1.0,), lambda g: (None,)).sum().backward()
    assert d.grad is None  # no path carries a gradient: none is stored


@pytest.mark.parametrize("make", [lambda x: x.exp(), lambda x: x * 2.0, lambda x: x.reshape(2)])
def test_in_place_change_of_an_op_result_whose_graph_is_alive_is_refused(make):
    """exp's backward reuses its output: a silent change to it would give a wrong gradient."""
    x = tm.tensor([0.5, 1.0], requires_grad=True)
    y = make(x)
    before = y.data.copy()
    with pytest.raises(RuntimeError, match=r"'mul_' on a tensor made by '\w+'.*graph"):
        y.mul_(2.0)
    np.testing.assert_array_equal(y.data, before)  # refused before anything changed
    y.sum().backward()
    y.mul_(2.0)  # after backward the graph is released: fine
    with tm.no_grad():
        z = x.exp()
    z.mul_(2.0)  # no graph recorded: fine
    np.testing.assert_allclose(z.data, 2 * np.exp(x.data))


def test_python_numbers_become_shared_read_only_constants_of_the_tensor_dtype():
    x32 = tm.tensor([1.0, 2.0])
    x64 = tm.tensor([1.0, 2.0], dtype=np.float64)
    assert (x32 * 0.5).dtype == np.float32 and (x64 * 0.5).dtype == np.float64
    assert x32._wrap(0.5) is x32._wrap(0.5)  # made once
    assert not x32._wrap(0.5).data.flags.writeable
    assert np.signbit((x32 * -0.0).data).all() and not np.signbit((x32 * 0.0).data).any()
    y = tm.tensor([3.0], requires_grad=True)
    (y * 0.5 + 0.5).sum().backward()
    np.testing.assert_array_equal(y.grad, [0.5])
