"""Reliability: no NaN from finite (or -inf masked) inputs where a well-kept library gives a
finite answer, in both readings; in-place ops that would lose a gradient are refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymm as tm
import tinymm.functional as F

READINGS = [pytest.param(False, id="fused"), pytest.param(True, id="reference")]


def run(fn, x, reference, *args):
    """fn(x, *args) in one reading: (value, gradient of sum(value * u)) as arrays."""
    with tm.reference_mode(reference):
        t = tm.tensor(x, requires_grad=True)
        out = fn(t, *args)
        u = np.random.default_rng(0).standard_normal(out.shape)
        out.backward(u)
    return out.data, t.grad


@st.composite
def masked_rows(draw):
    """(rows, n) float64 scores where some rows are entirely -inf and others partly."""
    rows, n = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    x = np.asarray(
        draw(st.lists(st.floats(-5, 5), min_size=rows * n, max_size=rows * n)), dtype=np.float64
    ).reshape(rows, n)
    blocked = np.asarray(
        draw(st.lists(st.booleans(), min_size=rows * n, max_size=rows * n))
    ).reshape(rows, n)
    empty = np.asarray(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    x[blocked | empty[:, None]] = -np.inf
    return x, np.isneginf(x).all(axis=1)


@pytest.mark.parametrize("reference", READINGS)
@given(case=masked_rows())
def test_softmax_family_of_rows_that_are_entirely_minus_inf(reference, case):
    """softmax: uniform 1/n; log_softmax: log(1/n); logsumexp: -inf (PyTorch's); gradient 0 on
    such rows; the other rows as NumPy computes them over their finite entries."""
    x, empty = case
    n = x.shape[1]
    finite = np.where(np.isneginf(x), -np.inf, x)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(empty, 0, finite.max(axis=1))
        lse = m + np.log(np.exp(finite - m[:, None]).sum(axis=1))
    y, g = run(F.softmax, x, reference)
    assert not np.isnan(y).any() and not np.isnan(g).any()
    np.testing.assert_allclose(y[empty], 1 / n)
    np.testing.assert_allclose(y[~empty], np.exp(x[~empty] - lse[~empty, None]), atol=1e-12)
    np.testing.assert_array_equal(g[empty], 0.0)

    y, g = run(F.log_softmax, x, reference)
    assert not np.isnan(y).any() and not np.isnan(g).any()
    np.testing.assert_allclose(y[empty], -np.log(n))
    np.testing.assert_allclose(y[~empty], x[~empty] - lse[~empty, None], atol=1e-12)
    np.testing.assert_array_equal(g[empty], 0.0)

    y, g = run(F.logsumexp, x, reference)
    assert not np.isnan(y).any() and not np.isnan(g).any()
    assert np.all(np.isneginf(y[empty]))
    np.testing.assert_allclose(y[~empty], lse[~empty])
    np.testing.assert_array_equal(g[empty], 0.0)


@pytest.mark.parametrize("reference", READINGS)
def test_fully_masked_rows_agree_between_the_readings(reference):
    x = np.array([[-np.inf, -np.inf, -np.inf], [1.0, -np.inf, 2.0], [0.5, 0.1, -0.3]])
    for fn in (F.softmax, F.log_softmax, F.logsumexp):
        y_f, g_f = run(fn, x, False)
        y_r, g_r = run(fn, x, True)
        np.testing.assert_allclose(y_f, y_r, atol=1e-12)
        np.testing.assert_allclose(g_f, g_r, atol=1e-12)


@pytest.mark.parametrize("reference", READINGS)
def test_cross_entropy_with_a_row_of_minus_inf_logits_is_finite(reference):
    """-inf logits (a masked vocabulary) with no label smoothing: no 0 * -inf = NaN."""
    logits = np.array([[-np.inf, -np.inf, -np.inf], [1.0, -np.inf, 2.0]])
    loss, g = run(lambda z: F.cross_entropy(z, np.array([0, 2])), logits, reference)
    np.testing.assert_allclose(loss, (np.log(3) + np.log1p(np.exp(-1.0))) / 2)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[0], 0.0)


@pytest.mark.parametrize("reference", READINGS)
@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 3)])
def test_cross_entropy_with_every_target_ignored_is_zero_with_zero_gradient(reference, shape):
    logits = np.random.default_rng(0).standard_normal(shape)
    targets = np.full(shape[:-1], -100)
    loss, g = run(lambda z: F.cross_entropy(z, targets), logits, reference)
    assert loss == 0.0
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("a, b", [((3, 1), (3,)), ((4,), (1, 4)), ((2, 3), (3, 2))])
def test_mse_loss_refuses_shapes_that_differ(a, b):
    with pytest.raises(
        ValueError, match=rf"mse_loss.*same shape.*{a}.*{b}".replace("(", r"\(").replace(")", r"\)")
    ):
        F.mse_loss(tm.randn(*a, requires_grad=True), tm.randn(*b))


# ----------------------------------------------------------------------------------------------
# In-place ops whose operand requires grad
# ----------------------------------------------------------------------------------------------

IN_PLACE = [
    pytest.param(lambda t, o: t.add_(o), id="add_"),
    pytest.param(lambda t, o: t.add_(o, alpha=0.5), id="add_alpha"),
    pytest.param(lambda t, o: t.sub_(o), id="sub_"),
    pytest.param(lambda t, o: t.mul_(o), id="mul_"),
    pytest.param(lambda t, o: t.copy_(o), id="copy_"),
]


@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_op_with_an_operand_that_requires_grad_is_refused(op):
    target, operand = tm.zeros(3), tm.randn(3, requires_grad=True)
    before = target.data.copy()
    with pytest.raises(RuntimeError, match=r"requires grad.*no gradient.*out-of-place.*no_grad"):
        op(target, operand)
    np.testing.assert_array_equal(target.data, before)  # refused before anything changed
    assert target._version == 0


@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_op_with_such_an_operand_is_fine_without_grad_or_detached(op):
    target, operand = tm.zeros(3), tm.randn(3, requires_grad=True)
    with tm.no_grad():
        op(target, operand)
    op(target, operand.detach())
    op(target, operand.data)


@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_op_with_an_operand_that_does_not_broadcast_names_both_shapes(op):
    with pytest.raises(ValueError, match=r"other of shape \(4,\).*shape \(3,\)"):
        op(tm.zeros(3), tm.zeros(4))
    with pytest.raises(ValueError, match=r"other of shape \(2, 3\).*shape \(3,\)"):
        op(tm.zeros(3), np.zeros((2, 3)))  # would broadcast, but not into this tensor


def test_optimizers_still_update_parameters_from_tensors_that_require_grad():
    for make in (tm.optim.SGD, tm.optim.Adam, tm.optim.AdamW):
        layer = tm.nn.Linear(3, 2)
        before = layer.weight.data.copy()
        opt = make(layer.parameters(), lr=0.1)
        layer(tm.randn(4, 3)).sum().backward()
        opt.step()
        assert not np.allclose(layer.weight.data, before)
