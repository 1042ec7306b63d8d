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


# ----------------------------------------------------------------------------------------------
# Anomaly detection
# ----------------------------------------------------------------------------------------------


def test_detect_anomaly_names_the_forward_op_that_made_a_nan_and_the_users_line():
    x = tm.tensor([1.0, -1.0, 2.0], requires_grad=True)
    y = x * 2  # finite: not reported
    with pytest.raises(RuntimeError) as info, tm.detect_anomaly():
        z = y.sqrt()  # sqrt(-2) = nan: the first non-finite value
        (z * 0).sum()
    message = str(info.value)
    assert "forward of 'sqrt' produced nan (1 of 3 values)" in message
    assert "inputs (3,) float32 -> output (3,) float32" in message
    assert f"{__file__}:" in message and "z = y.sqrt()" in message
    assert "tinymm/tensor.py" in message


def test_detect_anomaly_does_not_blame_an_op_for_a_value_that_reached_it_non_finite():
    x = tm.tensor([1.0, -np.inf, 2.0], requires_grad=True)  # a -inf mask: data, not a bug
    with tm.detect_anomaly():
        out = F.softmax(x * 1.0)
        out.sum().backward()
    assert np.isfinite(out.data).all() and np.isfinite(x.grad).all()


def test_detect_anomaly_names_the_backward_op_and_where_it_was_created():
    x = tm.tensor([0.0, 1.0, 4.0], requires_grad=True)
    with tm.detect_anomaly():
        y = x.sqrt()  # sqrt(0) = 0 is fine; its derivative 1 / (2 sqrt 0) is inf
        loss = y.sum()
        with pytest.raises(RuntimeError) as info:
            loss.backward()
    message = str(info.value)
    assert "backward of 'sqrt' returned inf in the gradient of its input 0" in message
    assert "finite output gradient (3,) float32" in message
    assert f"{__file__}:" in message and "y = x.sqrt()" in message


def test_detect_anomaly_is_a_decorator_and_off_outside():
    @tm.detect_anomaly()
    def step(x):
        assert tm.is_anomaly_enabled()
        return (x / x).sum()  # 0 / 0

    with pytest.raises(RuntimeError, match="'div' produced nan"):
        step(tm.tensor([0.0, 1.0], requires_grad=True))
    assert not tm.is_anomaly_enabled()
    with np.errstate(invalid="ignore"):
        assert np.isnan((tm.tensor([0.0]) / tm.tensor([0.0])).item())  # off: no check
    node = (tm.tensor([1.0], requires_grad=True) * 2)._node
    assert not hasattr(node, "created_at")  # off: nothing recorded


def test_a_model_step_passes_under_detect_anomaly_and_gives_the_same_gradients():
    def grads(anomaly):
        tm.manual_seed(0)
        block = tm.nn.TransformerBlock(8, 2)
        x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
        with tm.detect_anomaly(anomaly):
            (block(x, causal=True) ** 2).mean().backward()
        return [p.grad for p in block.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fit_stops_with_the_step_when_the_loss_is_not_finite():
    from tinymm.train import fit

    model = tm.nn.Linear(2, 1)
    opt = tm.optim.SGD(model.parameters(), lr=0.1)
    x, y = np.ones((8, 2), np.float32), np.zeros((8, 1), np.float32)
    calls = []

    def loss_fn(m, xb, yb):  # the second step's target overflows
        calls.append(1)
        return F.mse_loss(m(xb), yb + (np.float32(np.inf) if len(calls) == 2 else 0))

    with pytest.raises(FloatingPointError, match=r"loss is (inf|nan) at step 2/3.*detect_anomaly"):
        fit(model, opt, loss_fn, (x, y), steps=3, batch_size=4, seed=0, log=lambda s: None)
    assert np.isfinite(model.weight.data).all() and len(calls) == 2  # stopped before backward


@pytest.mark.parametrize("causal", [False, True])
def test_a_query_that_may_attend_to_nothing_gets_uniform_weights_and_no_gradient(causal):
    """Both readings: uniform weights (PyTorch gives NaN), and the scores of such a query send
    no gradient to Q or K (the fused kernel used to send the uniform softmax's)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s) for s in ((1, 3, 2), (1, 2, 2), (1, 2, 2)))
    mask = np.array([[False, False], [True, False], [True, True]])  # query 0: nothing
    u = rng.standard_normal((1, 3, 2))
    results = []
    for reference in (False, True):
        with tm.reference_mode(reference):
            ts = [tm.tensor(a, requires_grad=True) for a in (q, k, v)]
            out, weights = F.scaled_dot_product_attention(
                *ts, mask=None if causal else mask, causal=causal, return_weights=True
            )  # causal with L_q = 3 > L_k = 2: query 0 sees no key either
            out.backward(u)
        np.testing.assert_allclose(weights.data[0, 0], [0.5, 0.5])
        assert ts[0].grad[0, 0].tolist() == [0.0, 0.0]  # query 0's scores are constants
        results.append([out.data, *(t.grad for t in ts)])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Argument checks at the call (the fuzz test, tests/test_fuzz_api.py, covers every function;
# these are the cases the issue names, with their messages)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sum", "mean", "max", "min", "var"])
def test_a_reduction_axis_out_of_range_raises_rather_than_wrapping(method):
    x = tm.randn(2, 3, requires_grad=True)
    for axis in (2, -3, (0, 2)):
        with pytest.raises(IndexError, match=rf"{method}: axis=.* out of range.*\(2, 3\)"):
            getattr(x, method)(axis=axis)
    with pytest.raises(ValueError, match="names an axis twice"):
        getattr(x, method)(axis=(1, -1))


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax, F.logsumexp])
def test_softmax_family_axis_out_of_range_raises(fn):
    with pytest.raises(IndexError, match=r"axis 2 is out of range.*\(2, 3\).*\[-2, 1\]"):
        fn(tm.randn(2, 3), axis=2)


def test_transpose_axes_must_be_a_permutation():
    x = tm.randn(2, 3, 4)
    with pytest.raises(IndexError, match=r"transpose: axes=\(0, 1, 3\) is out of range"):
        x.transpose(0, 1, 3)  # used to wrap 3 -> 0
    with pytest.raises(ValueError, match=r"transpose: axes=\(0, 1\) must name each of the 3"):
        x.transpose(0, 1)


def test_a_pooling_window_larger_than_its_input_raises():
    x = tm.randn(1, 3, 3, 2)
    with pytest.raises(ValueError, match=r"avg_pool2d: kernel_size=4 is larger than the input"):
        F.avg_pool2d(x, 4)  # used to return an empty tensor
    with pytest.raises(ValueError, match=r"avg_pool2d: stride must be an integer >= 1, got 0"):
        F.avg_pool2d(x, 2, stride=0)


def test_layer_norm_on_an_input_whose_last_axis_differs_names_both():
    with pytest.raises(ValueError, match=r"LayerNorm\(4\).*dim=4.*shape \(2, 3\).*last axis 3"):
        tm.nn.LayerNorm(4)(tm.randn(2, 3))
    with pytest.raises(
        ValueError, match=r"GroupNorm\(num_channels=4\).*\(N, H, W, 4\).*\(1, 2, 2, 3\)"
    ):
        tm.nn.GroupNorm(2, 4)(tm.randn(1, 2, 2, 3))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: tm.nn.Linear(0, 3), r"Linear: in_features must be an integer >= 1, got 0"),
        (lambda: tm.nn.Conv2d(3, 4, 0), r"Conv2d: kernel_size must be an integer >= 1, got 0"),
        (lambda: tm.nn.Conv2d(3, 4, 3, padding=-1), r"Conv2d: padding must be .* >= 0, got -1"),
        (lambda: tm.nn.MultiHeadAttention(8, 0), r"MultiHeadAttention: heads must be .* got 0"),
        (lambda: tm.nn.GroupNorm(0, 4), r"GroupNorm: num_groups must be .* got 0"),
        (lambda: tm.nn.Embedding(-1, 4), r"Embedding: num must be .* got -1"),
    ],
)
def test_layers_check_their_sizes_when_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_attention_mask_must_broadcast_to_the_scores_not_merely_with_them():
    q = tm.randn(1, 1, 4)
    with pytest.raises(
        ValueError, match=r"mask of shape \(2,\) does not broadcast to .*\(1, 1, 1\)"
    ):
        F.scaled_dot_product_attention(q, q, q, mask=np.ones(2, bool))


def test_errors_are_raised_in_the_call_not_in_backward():
    """The size-0 cases once failed only in backward (reshape(-1, 0) is ambiguous)."""
    a, b = tm.randn(0, 3, requires_grad=True), tm.randn(3, 0, requires_grad=True)
    (a @ b).sum().backward()
    assert a.grad.shape == (0, 3) and b.grad.shape == (3, 0)
    x = tm.randn(0, requires_grad=True)
    x.var().backward()  # (was ZeroDivisionError in backward)
    assert x.grad.shape == (0,)


def test_text_transformer_checks_ids_and_eos_positions():
    tm.manual_seed(0)
    text = tm.models.TextTransformer(vocab_size=10, max_len=6, dim=8, depth=1, heads=2)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=r"ids must be \(N, L\) token ids, got shape \(3,\)"):
        text.encode(ids[0])
    with pytest.raises(IndexError, match=r"eos_positions must lie in \[0, 3\).*-1\.\.2"):
        text(ids, np.array([-1, 2]))  # used to wrap around to the last token
    with pytest.raises(ValueError, match=r"eos_positions must be \(N,\) = \(2,\)"):
        text(ids, np.array([2]))
    assert text(ids, np.array([2, 1])).shape == (2, 8)
