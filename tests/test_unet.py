"""The U-Net denoiser, its cross-attention, the KL-autoencoder, and MultiHeadAttention's
context_dim: shapes, the properties that matter, gradients (gradcheck in float64)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymm as tm
from tinymm import nn
from tinymm.gradcheck import gradcheck
from tinymm.models.autoencoder import KLAutoencoder, kl_divergence
from tinymm.models.unet import (
    CrossAttention,
    UNet,
    coordinates,
    position_features,
    timestep_embedding,
)


def randomise(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Random values in every parameter (the U-Net's output conv starts at zero)."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data = scale * rng.standard_normal(p.shape)  # float64
    return model


def tiny_unet(seed: int = 0, context_dim: int = 3) -> UNet:
    tm.manual_seed(seed)
    unet = UNet(2, context_dim, channels=(4, 8), attention=(True, True), heads=2, groups=2)
    return randomise(unet, seed)


def inputs(rng, n=2, side=4, channels=2, length=3, context_dim=3):
    x = rng.standard_normal((n, side, side, channels))
    return x, rng.integers(1000, size=n), rng.standard_normal((n, length, context_dim))


# --- U-Net ---------------------------------------------------------------------------------------


@given(st.integers(1, 3), st.sampled_from([2, 4, 8]), st.integers(1, 5))
def test_unet_output_has_the_shape_of_its_input(n, side, length):
    unet = tiny_unet()
    x, t, context = inputs(np.random.default_rng(0), n, side, length=length)
    assert unet(x, t, context).shape == x.shape


def test_unet_starts_by_predicting_zero_noise():
    tm.manual_seed(0)
    unet = UNet(4, 8, channels=(8, 16), heads=2, groups=4)
    x, t, context = inputs(np.random.default_rng(0), side=8, channels=4, context_dim=8)
    assert np.all(unet(x.astype(np.float32), t, context.astype(np.float32)).data == 0)


def test_unet_prediction_depends_on_the_text_and_on_the_step():
    unet = tiny_unet()
    rng = np.random.default_rng(1)
    x, t, context = inputs(rng)
    other = rng.standard_normal(context.shape)
    eps = unet(x, t, context).data
    assert not np.allclose(eps, unet(x, t, other).data)
    assert not np.allclose(eps, unet(x, t + 1, context).data)
    np.testing.assert_array_equal(eps, unet(x, t, context).data)  # and on nothing else


def test_cross_attention_output_depends_on_the_text_only_through_attention():
    """Queries from positions, keys/values from text: a text whose tokens are permuted gives the
    same output (attention is a weighted sum over tokens), a different text a different one."""
    tm.manual_seed(0)
    block = randomise(CrossAttention(4, 3, heads=2, groups=2), 0)
    rng = np.random.default_rng(2)
    x, context = rng.standard_normal((2, 3, 3, 4)), rng.standard_normal((2, 5, 3))
    out = block(tm.Tensor(x), tm.Tensor(context)).data
    assert out.shape == x.shape
    np.testing.assert_allclose(out, block(tm.Tensor(x), tm.Tensor(context[:, ::-1])).data)
    assert not np.allclose(out, block(tm.Tensor(x), tm.Tensor(context + 1.0)).data)
    mask = np.array([[True] * 5, [True, True, False, False, False]])  # tokens 2.. of text 1 hidden
    changed = context.copy()
    changed[1, 2:] += 5.0
    np.testing.assert_allclose(
        block(tm.Tensor(x), tm.Tensor(context), mask).data,
        block(tm.Tensor(x), tm.Tensor(changed), mask).data,
    )


def test_cross_attention_weights_say_which_position_reads_which_word():
    unet = tiny_unet()
    x, t, context = inputs(np.random.default_rng(3), side=4, length=5)
    eps, weights = unet(x, t, context, return_weights=True)
    np.testing.assert_array_equal(eps.data, unet(x, t, context).data)
    assert set(weights) == {"down 0", "down 1", "middle", "up 0", "up 1"}
    assert weights["up 0"].shape == (2, 2, 4 * 4, 5)  # (N, heads, H W positions, words)
    assert weights["middle"].shape == (2, 2, 2 * 2, 5)
    np.testing.assert_allclose(weights["up 0"].sum(-1), 1.0)


def test_unet_gradcheck():
    unet = tiny_unet()
    rng = np.random.default_rng(4)
    x, t, context = inputs(rng)
    x, context = tm.Tensor(x, requires_grad=True), tm.Tensor(context, requires_grad=True)
    # every kind of layer once (each op is gradchecked on its own elsewhere; all ~6k
    # parameters element by element would take a minute)
    named = dict(unet.named_parameters())
    picked = [
        "time_mlp.fc1.weight",
        "conv_in.weight",
        "down_blocks.1.norm1.weight",
        "down_blocks.1.emb_proj.weight",
        "down_blocks.1.skip.weight",
        "downs.0.conv.weight",
        "mid_attn.attn.k_proj.weight",
        "mid_attn.pos_proj.weight",
        "mid_attn.attn.v_proj.bias",
        "up_attn_0.attn.q_proj.weight",
        "ups.0.conv.weight",
        "up_blocks.0.conv2.weight",
        "conv_out.weight",
    ]
    params = [named[name] for name in picked]
    assert gradcheck(lambda x, c, *_: unet(x, t, c), [x, context, *params])


def test_timestep_embedding_is_the_transformer_sinusoid():
    emb = timestep_embedding(np.array([0, 3, 999]), 8)
    w = 10_000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(emb[1], np.concatenate([np.cos(3 * w), np.sin(3 * w)]))
    np.testing.assert_array_equal(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
    assert len({tuple(np.round(e, 6)) for e in timestep_embedding(np.arange(1000), 32)}) == 1000
    with pytest.raises(ValueError, match="dim must be even"):
        timestep_embedding(np.array([1]), 7)


def test_coordinates_tell_each_position_its_row_and_column():
    c = coordinates(2, 3, 5)
    assert c.shape == (2, 3, 5, 2) and c.dtype == np.float32
    np.testing.assert_array_equal(c[1, :, 0, 0], [-1, 0, 1])  # rows, top to bottom
    np.testing.assert_array_equal(c[0, 0, :, 1], [-1, -0.5, 0, 0.5, 1])  # columns
    assert len({tuple(v) for v in c[0].reshape(-1, 2).tolist()}) == 15  # all different


def test_position_features_differ_for_every_position_and_reach_the_queries():
    p = position_features(4, 4, 3)
    assert p.shape == (16, 12)
    assert len({tuple(np.round(v, 9)) for v in p}) == 16
    np.testing.assert_allclose(p[0, [0, 6]], [-1, -1], atol=1e-12)  # sin(-pi/2) at the top left
    tm.manual_seed(0)
    block = randomise(CrossAttention(4, 3, heads=2, groups=2, frequencies=3), 0)
    x = np.zeros((1, 4, 4, 4))  # the same features everywhere: only the place differs
    context = np.random.default_rng(0).standard_normal((1, 5, 3))
    _, weights = block(tm.Tensor(x), tm.Tensor(context), return_weights=True)
    assert not np.allclose(weights[0, :, 0], weights[0, :, -1])  # corners read differently


def test_unet_rejects_bad_inputs():
    unet = tiny_unet()
    x, t, context = inputs(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"x must be \(N, H, W, 2\)"):
        unet(x[..., :1], t, context)
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(x[:, :3, :3], t, context)
    with pytest.raises(ValueError, match="t has 1 steps for 2 images"):
        unet(x, t[:1], context)
    with pytest.raises(ValueError, match=r"context must be \(N=2, L, 3\)"):
        unet(x, t, context[..., :2])
    with pytest.raises(ValueError, match="one flag per level"):
        UNet(2, 3, channels=(4, 8), attention=(True,))
    with pytest.raises(ValueError, match="not divisible by heads"):
        UNet(2, 3, channels=(6, 8), heads=4)


# --- MultiHeadAttention(context_dim=...) -------------------------------------------------------


def test_multi_head_attention_reads_a_context_of_another_width():
    tm.manual_seed(0)
    mha = nn.MultiHeadAttention(4, 2, context_dim=6)
    assert mha.k_proj.weight.shape[0] * mha.k_proj.weight.shape[1] == 6 * 4
    rng = np.random.default_rng(0)
    x = tm.Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    context = tm.Tensor(rng.standard_normal((2, 5, 6)), requires_grad=True)
    for p in mha.parameters():
        p.data = p.data.astype(np.float64)
    assert mha(x, context).shape == (2, 3, 4)
    assert gradcheck(lambda x, c, *_: mha(x, c), [x, context, *mha.parameters()])
    assert "context_dim=6" in repr(mha)
    tm.manual_seed(1)
    default = nn.MultiHeadAttention(4, 2)  # unchanged without it: every projection is 4 -> 4
    assert default.context_dim == 4 and "context_dim" not in repr(default)
    with pytest.raises(ValueError, match="context_dim must be >= 1"):
        nn.MultiHeadAttention(4, 2, context_dim=0)


# --- KL-autoencoder ----------------------------------------------------------------------------


def test_kl_term_equals_its_closed_form_and_a_numerical_integral():
    rng = np.random.default_rng(0)
    mean, logvar = rng.standard_normal((2, 3, 4))
    got = kl_divergence(tm.Tensor(mean), tm.Tensor(logvar)).item()
    closed = np.mean(-0.5 * logvar + (np.exp(logvar) + mean**2) / 2 - 0.5)  # log(1/s) + ...
    assert got == pytest.approx(closed, rel=1e-12)
    z = np.linspace(-30, 30, 400_001)
    kls = []
    for m, lv in zip(mean.ravel(), logvar.ravel(), strict=True):  # KL = int p log(p / q)
        s = np.exp(lv / 2)
        log_p = -0.5 * ((z - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
        log_q = -0.5 * z**2 - 0.5 * np.log(2 * np.pi)
        kls.append(np.trapezoid(np.exp(log_p) * (log_p - log_q), z))
    assert got == pytest.approx(np.mean(kls), rel=1e-6)
    assert kl_divergence(tm.Tensor(np.zeros(5)), tm.Tensor(np.zeros(5))).item() == 0


def test_autoencoder_maps_32x32x3_to_8x8x4_and_back():
    tm.manual_seed(0)
    ae = KLAutoencoder(3, 4, channels=(8, 8, 16))
    assert ae.factor == 4
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, 8, 8, 4) and mean.dtype == np.float32
    out = ae.decode(mean)
    assert out.shape == x.shape and out.data.min() > 0 and out.data.max() < 1
    with pytest.raises(ValueError, match="divisible by 4"):
        ae.encode(x[:, :30, :30])
    with pytest.raises(ValueError, match=r"z must be \(N, h, w, 4\)"):
        ae.decode(mean[..., :3])


def test_reparameterised_sample_has_the_encoders_mean_and_variance():
    tm.manual_seed(0)
    ae = KLAutoencoder(3, 4, channels=(8, 16))
    mean, logvar = tm.Tensor(np.full((20_000, 1, 1, 1), 0.5)), tm.Tensor(np.full((1,), -1.0))
    z = ae.sample(mean, logvar).data
    assert z.mean() == pytest.approx(0.5, abs=0.02)
    assert z.var() == pytest.approx(np.exp(-1.0), rel=0.05)


def test_autoencoder_gradcheck():
    tm.manual_seed(0)
    ae = randomise(KLAutoencoder(2, 2, channels=(2, 4), groups=2), 1)
    x = tm.Tensor(np.random.default_rng(5).random((2, 4, 4, 2)), requires_grad=True)

    def loss(x, *_):
        tm.manual_seed(3)  # the same reparameterisation noise on every call
        return ae.loss(x, kl_weight=0.1)[0]

    assert gradcheck(loss, [x, *ae.parameters()])
