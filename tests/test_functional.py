"""Tests of every function in tinymm.functional.

Each function: forward against a plain NumPy/SciPy reference, backward against finite differences
(float64), float32 kept. The fused ones (softmax, log_softmax, logsumexp, cross_entropy, layer_norm,
group_norm, gelu, attention, multi-head attention, linear) are also checked against their *unfused*
composition of Tensor ops, written out below, in values and in gradients. Then the invariants that
matter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import erf, expit
from scipy.special import logsumexp as np_logsumexp
from scipy.special import softmax as np_softmax
from strategies import arrays, check_op, nonzero_arrays, shapes

import tinymm as tm
import tinymm.functional as F
from tinymm.gradcheck import gradcheck

# ----------------------------------------------------------------------------------------------
# The two readings: every composite op runs as its fused kernel (the default) and as the plain
# composition of Tensor ops in functional.py (reference mode); both must agree.
# ----------------------------------------------------------------------------------------------


def reference(fn):
    """fn run in reference mode: the plain compositions instead of the fused kernels."""

    def run(*args):
        with tm.reference_mode():
            return fn(*args)

    return run


def assert_same_function(fused, unfused, *arrays, rtol=1e-8, atol=1e-10):
    """fused(*xs) and unfused(*xs) agree in value and in every input's gradient (float64).
    Called as assert_two_readings(fn, ...): fn against reference(fn)."""
    u = np.random.default_rng(2).standard_normal(np.shape(fused(*map(tm.tensor, arrays)).data))
    results = []
    for fn in (fused, unfused):
        xs = [tm.tensor(a, requires_grad=True) for a in arrays]
        out = fn(*xs)
        out.backward(u)
        results.append((out.data, [x.grad for x in xs]))
    (out_f, grads_f), (out_u, grads_u) = results
    np.testing.assert_allclose(out_f, out_u, rtol=rtol, atol=atol)
    for gf, gu in zip(grads_f, grads_u, strict=True):
        np.testing.assert_allclose(gf, gu, rtol=rtol, atol=atol)


def assert_two_readings(fn, *arrays, rtol=1e-8, atol=1e-10):
    """The fused kernel and the reference composition of `fn` agree, values and gradients."""
    assert_same_function(fn, reference(fn), *arrays, rtol=rtol, atol=atol)


def axis_of(x):
    return st.integers(-x.ndim, x.ndim - 1)


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------


@given(x=shapes().flatmap(nonzero_arrays))
def test_relu(x):
    check_op(F.relu, lambda a: np.maximum(a, 0), x)


@given(x=shapes().flatmap(lambda s: arrays(s, -6, 6)))
def test_sigmoid(x):
    check_op(F.sigmoid, expit, x)


@given(x=shapes().flatmap(lambda s: arrays(s, -6, 6)))
def test_silu(x):
    check_op(F.silu, lambda a: a * expit(a), x)


def test_sigmoid_silu_do_not_overflow():
    x = tm.tensor([-1000.0, -50.0, 0.0, 50.0, 1000.0], requires_grad=True)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        s = F.sigmoid(x)
        s.sum().backward()
    np.testing.assert_allclose(s.data, [0, expit(-50), 0.5, expit(50), 1], atol=1e-12)
    assert np.isfinite(x.grad).all()
    with np.errstate(over="raise"):
        np.testing.assert_allclose(F.silu(x).data, [0, -50 * expit(-50), 0, 50, 1000], atol=1e-6)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@given(x=shapes().flatmap(lambda s: arrays(s, -4, 4)))
def test_gelu(approximate, x):
    def reference(a):
        if approximate == "none":
            return 0.5 * a * (1 + erf(a / math.sqrt(2)))  # the exact Gaussian CDF
        return 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))

    check_op(lambda t: F.gelu(t, approximate), reference, x)
    if approximate == "tanh":
        assert_two_readings(lambda t: F.gelu(t, approximate), x)


def test_gelu_tanh_is_close_to_exact():
    x = np.linspace(-5, 5, 101)
    exact = F.gelu(tm.tensor(x), "none").data
    np.testing.assert_allclose(F.gelu(tm.tensor(x), "tanh").data, exact, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Softmax family
# ----------------------------------------------------------------------------------------------


@given(x=shapes(1).flatmap(lambda s: arrays(s, -5, 5)), data=st.data())
def test_softmax(x, data):
    axis = data.draw(axis_of(x))
    check_op(lambda t: F.softmax(t, axis), lambda a: np_softmax(a, axis=axis), x)
    assert_two_readings(lambda t: F.softmax(t, axis), x)
    y = F.softmax(tm.tensor(x), axis).data
    np.testing.assert_allclose(y.sum(axis=axis), 1.0)  # rows sum to 1
    assert (y > 0).all()
    shift = data.draw(arrays(tuple(1 if i == axis % x.ndim else n for i, n in enumerate(x.shape))))
    np.testing.assert_allclose(F.softmax(tm.tensor(x + 10 * shift), axis).data, y, rtol=1e-10)


@given(x=shapes(1).flatmap(lambda s: arrays(s, -5, 5)), data=st.data())
def test_log_softmax(x, data):
    axis = data.draw(axis_of(x))
    ref = np_softmax(x, axis=axis)
    check_op(lambda t: F.log_softmax(t, axis), lambda a: np.log(ref), x)
    assert_two_readings(lambda t: F.log_softmax(t, axis), x)
    assert_same_function(
        lambda t: F.log_softmax(t, axis), lambda t: F.softmax(t, axis).log(), x
    )  # log_softmax == log(softmax), gradients too


@given(x=shapes(1).flatmap(lambda s: arrays(s, -5, 5)), data=st.data(), keepdims=st.booleans())
def test_logsumexp(x, data, keepdims):
    axis = data.draw(axis_of(x))
    check_op(
        lambda t: F.logsumexp(t, axis, keepdims),
        lambda a: np_logsumexp(a, axis=axis, keepdims=keepdims),
        x,
    )
    assert_two_readings(lambda t: F.logsumexp(t, axis, keepdims), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_family_stable_for_logits_of_magnitude_1e4(dtype):
    z = np.array([[1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4 - 2.0, -1e4 + 3.0]], dtype=dtype)
    x = tm.tensor(z, requires_grad=True)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        lse = F.logsumexp(x, axis=-1)
        lse.sum().backward()
        expected = np.array(
            [1e4 + np.log1p(np.exp(-1.0)), -1e4 + 3 + np.log1p(np.exp(-3) + np.exp(-5))]
        )
        np.testing.assert_allclose(lse.data, expected, rtol=1e-6)
        np.testing.assert_allclose(x.grad, np_softmax(z.astype(np.float64), axis=-1), atol=1e-6)
        for y in (F.softmax(x), F.log_softmax(x)):
            assert np.isfinite(y.data).all()
        np.testing.assert_allclose(
            F.log_softmax(x).data[0, :2],
            [-np.log1p(np.exp(-1.0)), -1 - np.log1p(np.exp(-1.0))],
            rtol=1e-5,
        )
        loss = F.cross_entropy(x, np.array([1, 2]))
        loss.backward()
    assert np.isfinite(loss.item()) and np.isfinite(x.grad).all()
    assert lse.dtype == dtype and x.grad.dtype == dtype


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def numpy_cross_entropy(z, t, ignore_index=-100, eps=0.0):
    """PyTorch's definition: q = (1 - eps) onehot + eps / C; mean of -sum q log p over kept rows."""
    c = z.shape[-1]
    z, t = z.reshape(-1, c), t.reshape(-1)
    log_p = z - np_logsumexp(z, axis=-1, keepdims=True)
    keep = t != ignore_index
    q = np.full(z.shape, eps / c)
    q[np.arange(len(t))[keep], t[keep]] += 1 - eps
    return -(q * log_p).sum(-1)[keep].sum() / keep.sum()


@st.composite
def logits_and_targets(draw):
    lead = draw(st.sampled_from([(3,), (2, 3), (1,), (2, 1)]))  # (N,) or (N, L)
    c = draw(st.integers(2, 5))
    z = draw(arrays((*lead, c), -4, 4))
    t = draw(hnp.arrays(np.int64, lead, elements=st.integers(0, c - 1)))
    ignore = draw(hnp.arrays(np.bool_, lead))
    assume(not ignore.all())
    return z, np.where(ignore, -100, t)


@given(zt=logits_and_targets(), eps=st.sampled_from([0.0, 0.1, 0.3]))
def test_cross_entropy(zt, eps):
    z, t = zt
    check_op(
        lambda x: F.cross_entropy(x, t, label_smoothing=eps),
        lambda a: numpy_cross_entropy(a, t, -100, eps),
        z,
    )
    assert_two_readings(lambda x: F.cross_entropy(x, t, label_smoothing=eps), z)


def test_cross_entropy_custom_ignore_index_and_ignored_rows_get_no_gradient():
    z = np.random.default_rng(0).standard_normal((4, 3))
    t = np.array([0, 7, 2, 7])
    x = tm.tensor(z, requires_grad=True)
    loss = F.cross_entropy(x, t, ignore_index=7)
    np.testing.assert_allclose(loss.item(), numpy_cross_entropy(z, t, ignore_index=7))
    np.testing.assert_allclose(loss.item(), numpy_cross_entropy(z[[0, 2]], t[[0, 2]]))
    loss.backward()
    np.testing.assert_array_equal(x.grad[[1, 3]], 0.0)


@given(shape=shapes(), data=st.data())
def test_mse_loss(shape, data):
    a = data.draw(arrays(shape))
    b = data.draw(arrays(shape))
    check_op(F.mse_loss, lambda x, y: np.mean((x - y) ** 2), a, b)
    c = b.astype(np.float32)  # a float32 constant keeps float32 tensors float32
    check_op(lambda x: F.mse_loss(x, c), lambda x: np.mean((x - c) ** 2), a)


# ----------------------------------------------------------------------------------------------
# Layers as functions
# ----------------------------------------------------------------------------------------------


@given(
    lead=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 4),
    data=st.data(),
)
def test_linear(lead, d_in, d_out, data):
    x = data.draw(arrays((*lead, d_in)))
    w = data.draw(arrays((d_in, d_out)))
    b = data.draw(arrays((d_out,)))
    check_op(F.linear, lambda x, w, b: x @ w + b, x, w, b)
    check_op(F.linear, lambda x, w: x @ w, x, w)
    assert_two_readings(F.linear, x, w, b)


@given(
    idx=hnp.arrays(
        np.int64, hnp.array_shapes(min_dims=0, max_dims=2, max_side=4), elements=st.integers(0, 3)
    ),
    weight=arrays((4, 3)),
)
def test_embedding_picks_rows_and_scatter_adds(idx, weight):
    check_op(lambda w: F.embedding(idx, w), lambda w: w[idx], weight)
    w = tm.tensor(weight, requires_grad=True)
    F.embedding(tm.tensor(idx), w).sum().backward()
    counts = np.bincount(idx.reshape(-1), minlength=4)
    np.testing.assert_array_equal(w.grad, counts[:, None] * np.ones((4, 3)))


@given(
    lead=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
    d=st.integers(2, 5),
    data=st.data(),
)
def test_layer_norm(lead, d, data):
    x = data.draw(arrays((*lead, d), -3, 3))
    assume(np.all(x.std(axis=-1) > 0.1))  # a constant row has no scale to normalise
    w = data.draw(arrays((d,)))
    b = data.draw(arrays((d,)))

    def reference(x, w, b):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b

    check_op(F.layer_norm, reference, x, w, b, rtol=1e-6)
    assert_two_readings(F.layer_norm, x, w, b, rtol=1e-7, atol=1e-9)
    y = F.layer_norm(tm.tensor(x), None, None).data  # weight 1, bias 0: mean 0, variance 1
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-10)
    np.testing.assert_allclose(y.var(-1), x.var(-1) / (x.var(-1) + 1e-5), rtol=1e-10)
    np.testing.assert_allclose(y.var(-1), 1, atol=1e-3)
    check_op(lambda x: F.layer_norm(x, None, None), lambda x: reference(x, 1, 0), x, rtol=1e-6)


@given(
    n=st.integers(1, 2),
    hw=st.sampled_from([(1, 2), (2, 2), (2, 3)]),
    groups_and_c=st.sampled_from([(1, 2), (2, 4), (3, 3), (2, 2)]),
    data=st.data(),
)
def test_group_norm_channels_last(n, hw, groups_and_c, data):
    groups, c = groups_and_c
    x = data.draw(arrays((n, *hw, c), -3, 3))
    grouped = x.reshape(n, -1, groups, c // groups)
    assume(np.all(grouped.std(axis=(1, 3)) > 0.1))
    w = data.draw(arrays((c,)))
    b = data.draw(arrays((c,)))

    def reference(x, w, b):
        g = x.reshape(n, -1, groups, c // groups)
        mu = g.mean(axis=(1, 3), keepdims=True)
        var = g.var(axis=(1, 3), keepdims=True)
        return ((g - mu) / np.sqrt(var + 1e-5)).reshape(x.shape) * w + b

    def fused(x, w, b):
        return F.group_norm(x, groups, w, b)

    check_op(fused, reference, x, w, b, rtol=1e-6)
    assert_two_readings(fused, x, w, b, rtol=1e-7, atol=1e-9)
    y = F.group_norm(tm.tensor(x), groups, None, None).data.reshape(grouped.shape)
    np.testing.assert_allclose(y.mean(axis=(1, 3)), 0, atol=1e-10)


def test_group_norm_with_one_group_per_channel_is_instance_norm():
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 4))
    y = F.group_norm(tm.tensor(x), 4, None, None).data
    expected = (x - x.mean(axis=(1, 2), keepdims=True)) / np.sqrt(
        x.var(axis=(1, 2), keepdims=True) + 1e-5
    )
    np.testing.assert_allclose(y, expected, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_statistics_and_gradient(p):
    tm.manual_seed(0)
    x = tm.tensor(np.full((200, 250), 3.0), requires_grad=True)
    y = F.dropout(x, p)
    zeroed = (y.data == 0).mean()
    assert abs(zeroed - p) < 0.01  # 50,000 draws: 0.01 is more than 4 standard deviations
    np.testing.assert_allclose(y.data.mean(), 3.0, rtol=0.05)  # mean preserved
    np.testing.assert_allclose(y.data[y.data != 0], 3.0 / (1 - p))  # survivors scaled
    u = np.random.default_rng(0).standard_normal(x.shape)
    y.backward(u)
    np.testing.assert_allclose(x.grad, u * (y.data != 0) / (1 - p))  # gradient = mask / (1 - p)


def test_dropout_eval_and_p0_are_identity_and_seed_reproduces():
    x = tm.randn(5, 6, requires_grad=True)
    for out in (F.dropout(x, 0.5, training=False), F.dropout(x, 0.0)):
        np.testing.assert_array_equal(out.data, x.data)
        out.sum().backward()
    np.testing.assert_array_equal(x.grad, 2.0)
    tm.manual_seed(3)
    a = F.dropout(x, 0.5).data
    tm.manual_seed(3)
    np.testing.assert_array_equal(F.dropout(x, 0.5).data, a)
    assert F.dropout(x, 0.5).dtype == np.float32


@given(x=arrays((2, 3, 4)))
def test_dropout_gradcheck_with_a_fixed_mask(x):
    def fn(t):
        tm.manual_seed(11)  # the same mask on every evaluation
        return F.dropout(t, 0.3)

    assert gradcheck(fn, [tm.tensor(x, requires_grad=True)])


# ----------------------------------------------------------------------------------------------
# Convolution and resampling
# ----------------------------------------------------------------------------------------------


def naive_conv2d(x, w, b, stride, padding):
    """The definition, one output element at a time (cross-correlation, channels-last)."""
    n, h, wd, _ = x.shape
    kh, kw, _, c_out = w.shape
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, ho, wo, c_out))
    for i in range(ho):
        for j in range(wo):
            window = xp[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            out[:, i, j, :] = np.einsum("nhwc,hwco->no", window, w)
    return out + (0 if b is None else b)


@st.composite
def conv_case(draw):
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 1))
    h = draw(st.integers(max(1, k - 2 * padding), 5))
    wd = draw(st.integers(max(1, k - 2 * padding), 5))
    n, c_in, c_out = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    x = draw(arrays((n, h, wd, c_in)))
    w = draw(arrays((k, k, c_in, c_out)))
    b = draw(arrays((c_out,)))
    return x, w, b, stride, padding


@given(case=conv_case())
def test_conv2d_against_naive_loops(case):
    x, w, b, stride, padding = case
    check_op(
        lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=padding),
        lambda x, w, b: naive_conv2d(x, w, b, stride, padding),
        x,
        w,
        b,
    )
    check_op(
        lambda x, w: F.conv2d(x, w, stride=stride, padding=padding),
        lambda x, w: naive_conv2d(x, w, None, stride, padding),
        x,
        w,
    )
    assert_two_readings(lambda x, w: F.conv2d(x, w, stride=stride, padding=padding), x, w)


@given(case=conv_case(), frozen=st.sampled_from(["x", "weight"]))
def test_conv2d_gradients_are_the_same_when_one_input_needs_none(case, frozen):
    """The backward computes dx and dW together (on two threads) when both are needed, and
    alone otherwise, as for a first layer's input or a frozen weight: the same gradients."""
    x, w, b, stride, padding = case
    grads = {}
    for needed in ({"x", "weight"}, {"x", "weight"} - {frozen}):
        xt = tm.tensor(x, requires_grad="x" in needed)
        wt = tm.tensor(w, requires_grad="weight" in needed)
        out = F.conv2d(xt, wt, tm.tensor(b), stride=stride, padding=padding)
        (out * out).sum().backward()
        grads[len(needed)] = {"x": xt.grad, "weight": wt.grad}
    kept = "weight" if frozen == "x" else "x"
    np.testing.assert_allclose(grads[1][kept], grads[2][kept], rtol=1e-12, atol=1e-12)
    assert grads[1][frozen] is None


@given(x=arrays((2, 3, 4, 3)), w=arrays((3, 5)), b=arrays((5,)))
def test_conv2d_with_a_1x1_kernel_is_a_matmul(x, w, b):
    assert_same_function(
        lambda x, w, b: F.conv2d(x, w.reshape(1, 1, 3, 5), b),
        lambda x, w, b: x @ w + b,
        x,
        w,
        b,
    )


def test_conv2d_rectangular_kernel_and_large_input_random_directions():
    rng = np.random.default_rng(0)
    x = tm.tensor(rng.standard_normal((2, 7, 6, 3)), requires_grad=True)  # > 256 elements
    w = tm.tensor(rng.standard_normal((2, 3, 3, 4)), requires_grad=True)
    out = F.conv2d(x, w, stride=2, padding=1)
    np.testing.assert_allclose(out.data, naive_conv2d_rect(x.data, w.data, 2, 1))
    assert gradcheck(lambda x, w: F.conv2d(x, w, stride=2, padding=1), [x, w])


def naive_conv2d_rect(x, w, stride, padding):
    kh, kw = w.shape[:2]
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(ho):
        for j in range(wo):
            win = xp[:, i * stride : i * stride + kh, j * stride : j * stride + kw]
            out[:, i, j] = np.einsum("nhwc,hwco->no", win, w)
    return out


@given(
    k=st.integers(1, 3),
    stride=st.none() | st.integers(1, 3),
    hw=st.tuples(st.integers(3, 6), st.integers(3, 6)),
    data=st.data(),
)
def test_avg_pool2d(k, stride, hw, data):
    x = data.draw(arrays((2, *hw, 2)))
    s = stride or k

    def reference(a):
        ho, wo = (hw[0] - k) // s + 1, (hw[1] - k) // s + 1
        out = np.zeros((2, ho, wo, 2))
        for i in range(ho):
            for j in range(wo):
                out[:, i, j] = a[:, i * s : i * s + k, j * s : j * s + k].mean(axis=(1, 2))
        return out

    check_op(lambda t: F.avg_pool2d(t, k, stride), reference, x)


@given(x=arrays((2, 2, 3, 2)), scale=st.integers(1, 3))
def test_upsample_nearest2d(x, scale):
    reference = np.repeat(np.repeat(x, scale, axis=1), scale, axis=2)
    check_op(lambda t: F.upsample_nearest2d(t, scale), lambda a: reference, x)


# ----------------------------------------------------------------------------------------------
# Patches
# ----------------------------------------------------------------------------------------------


@given(
    p=st.integers(1, 3),
    grid=st.tuples(st.integers(1, 3), st.integers(1, 2)),
    c=st.integers(1, 3),
    data=st.data(),
)
def test_patchify_unpatchify_round_trip_and_patch_content(p, grid, c, data):
    h, w = grid[0] * p, grid[1] * p
    x = data.draw(arrays((2, h, w, c)))

    def reference(a):  # patch number r * (W/P) + s holds rows r*P.., columns s*P.., (row, col, ch)
        return np.stack(
            [
                a[:, r * p : (r + 1) * p, s * p : (s + 1) * p, :].reshape(2, -1)
                for r in range(grid[0])
                for s in range(grid[1])
            ],
            axis=1,
        )

    check_op(lambda t: F.patchify(t, p), reference, x)
    patches = F.patchify(tm.tensor(x), p)
    np.testing.assert_array_equal(F.unpatchify(patches, p, (h, w), c).data, x)
    check_op(lambda t: F.unpatchify(t, p, (h, w), c), lambda a: x, reference(x))


@given(x=arrays((2, 4, 6, 3)), e=arrays((2 * 2 * 3, 5)))
def test_patchify_then_embedding_equals_strided_conv(x, e):
    assert_same_function(
        lambda x, e: F.patchify(x, 2) @ e,
        lambda x, e: F.conv2d(x, e.reshape(2, 2, 3, 5), stride=2).reshape(2, 6, 5),
        x,
        e,
    )


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def numpy_attention(q, k, v, allowed=None):
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    return np_softmax(s, axis=-1) @ v


@st.composite
def attention_case(draw):
    batch_q, batch_kv = draw(
        hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=2)
    ).input_shapes
    lq, lk, d, dv = (draw(st.integers(1, 3)) for _ in range(4))
    q = draw(arrays((*batch_q, lq, d)))
    k = draw(arrays((*batch_kv, lk, d)))
    v = draw(arrays((*batch_kv, lk, dv)))
    mask = draw(hnp.arrays(np.bool_, (lq, lk)))
    assume(mask.any(axis=-1).all())  # every query may attend to something
    return q, k, v, mask


@given(case=attention_case(), use_mask=st.booleans())
def test_attention_batch_broadcast_and_mask(case, use_mask):
    q, k, v, mask = case
    m = mask if use_mask else None
    check_op(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask=m),
        lambda q, k, v: numpy_attention(q, k, v, m),
        q,
        k,
        v,
    )
    assert_two_readings(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask=m), q, k, v)


@given(qkv=arrays((3, 2, 4, 3)))
def test_causal_attention_equals_an_explicit_lower_triangular_mask(qkv):
    q, k, v = qkv
    tri = np.tril(np.ones((4, 4), dtype=bool))
    check_op(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
        lambda q, k, v: numpy_attention(q, k, v, tri),
        q,
        k,
        v,
    )
    out, weights = F.scaled_dot_product_attention(
        tm.tensor(q), tm.tensor(k), tm.tensor(v), causal=True, return_weights=True
    )
    np.testing.assert_array_equal(weights.data[..., ~tri], 0.0)
    np.testing.assert_allclose(weights.data.sum(-1), 1.0)
    assert not weights.requires_grad


@given(qkv=arrays((3, 2, 5, 3)), t=st.integers(0, 3), change=arrays((3, 2, 3)))
def test_causal_attention_never_reads_the_future(qkv, t, change):
    """Changing token t+1.. leaves outputs 0..t unchanged; their gradients w.r.t. later keys and
    values are exactly zero."""
    q, k, v = (tm.tensor(a, requires_grad=True) for a in qkv)
    out = F.scaled_dot_product_attention(q, k, v, causal=True)
    later = qkv.copy()
    later[:, :, t + 1 :] += np.abs(change[:, :, None]) + 1.0  # never zero (-1 + 1 was)
    out2 = F.scaled_dot_product_attention(*map(tm.tensor, later), causal=True)
    np.testing.assert_allclose(out2.data[:, : t + 1], out.data[:, : t + 1], rtol=1e-12)
    assert not np.allclose(out2.data[:, t + 1 :], out.data[:, t + 1 :])  # the change is visible
    out[:, : t + 1].sum().backward()
    np.testing.assert_array_equal(k.grad[:, t + 1 :], 0.0)
    np.testing.assert_array_equal(v.grad[:, t + 1 :], 0.0)
    np.testing.assert_array_equal(q.grad[:, t + 1 :], 0.0)
    assert np.abs(v.grad[:, : t + 1]).sum() > 0


def test_attention_mask_broadcasts_over_batch_and_heads():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 4, 2)) for _ in range(3))  # (N, heads, L, d)
    pad = np.array([[True, True, True, False], [True, True, False, False]])  # (N, L_k)
    mask = pad[:, None, None, :]  # -> (N, 1, 1, L_k)
    out = F.scaled_dot_product_attention(tm.tensor(q), tm.tensor(k), tm.tensor(v), mask=mask)
    np.testing.assert_allclose(out.data, numpy_attention(q, k, v, mask))
    assert gradcheck(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask=tm.tensor(mask)),
        [tm.tensor(a, requires_grad=True) for a in (q, k, v)],
    )


def numpy_multi_head_attention(qkv, heads, allowed=None):
    """Per head h: attention over columns h d..(h+1) d of Q, K and V; heads side by side."""
    q, k, v = np.split(qkv, 3, axis=-1)
    d = q.shape[-1] // heads
    return np.concatenate(
        [numpy_attention(*(z[..., h * d : (h + 1) * d] for z in (q, k, v)), allowed)
         for h in range(heads)],
        axis=-1,
    )  # fmt: skip


@given(
    sizes=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
    kind=st.sampled_from(["none", "causal", "padding"]),
    data=st.data(),
)
def test_multi_head_attention_is_each_head_on_its_own_columns(sizes, kind, data):
    """The packed self-attention (one qkv, heads split and merged inside) against attention per
    head in NumPy; the fused kernel against its composition, values and gradients."""
    n, length, heads, d = sizes
    qkv = data.draw(arrays((n, length, 3 * heads * d)))
    mask = causal = None
    allowed = None
    if kind == "causal":
        causal, allowed = True, np.tril(np.ones((length, length), dtype=bool))
    elif kind == "padding":  # (N, 1, 1, L): some keys of each sequence are padding
        real = data.draw(hnp.arrays(np.bool_, (n, length)))
        real[:, 0] = True
        mask = real[:, None, None, :]
        allowed = real[:, None, :]  # (N, 1, L_k) for the per-head reference

    def fn(x):
        return F.multi_head_attention(x, heads, mask=mask, causal=bool(causal))

    check_op(fn, lambda x: numpy_multi_head_attention(x, heads, allowed), qkv)
    assert_two_readings(fn, qkv)


def test_multi_head_attention_returns_each_heads_weights():
    rng = np.random.default_rng(0)
    qkv = tm.tensor(rng.standard_normal((2, 5, 3 * 6)))
    out, weights = F.multi_head_attention(qkv, 3, causal=True, return_weights=True)
    with tm.reference_mode():
        ref_out, ref_weights = F.multi_head_attention(qkv, 3, causal=True, return_weights=True)
    assert weights.shape == (2, 3, 5, 5) and not weights.requires_grad
    np.testing.assert_allclose(weights.data, ref_weights.data, rtol=1e-12)
    np.testing.assert_allclose(out.data, ref_out.data, rtol=1e-12)
    np.testing.assert_allclose(weights.data.sum(-1), 1.0)


def test_attention_query_with_nothing_to_attend_gets_uniform_weights_not_nan():
    rng = np.random.default_rng(0)
    q, k, v = (tm.tensor(rng.standard_normal((3, 2)), requires_grad=True) for _ in range(3))
    mask = np.array([[True, False, False], [False, False, False], [True, True, True]])
    out = F.scaled_dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out.data[1], v.data.mean(0))
    out.sum().backward()
    assert all(np.isfinite(t.grad).all() for t in (q, k, v))
