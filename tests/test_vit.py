"""ViT: patches as the lecture defines them, the model's shapes, information flow and gradients."""

import numpy as np
import pytest

import tinymm as tm
from tinymm import functional as F
from tinymm.models import ViT
from tinymm.models.vit import attention_rollout


def images(n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, h, w, c)).astype(np.float32)


@pytest.mark.parametrize("shape, p", [((2, 8, 12, 3), 4), ((1, 6, 6, 1), 3), ((3, 16, 8, 2), 8)])
def test_patchify_unpatchify_round_trip(shape, p):
    x = images(*shape)
    patches = F.patchify(x, p)
    n, h, w, c = shape
    assert patches.shape == (n, (h // p) * (w // p), p * p * c)
    np.testing.assert_array_equal(F.unpatchify(patches, p, (h, w), c).data, x)


def test_patch_order_is_row_column_channel_and_patches_row_by_row():
    x = images(1, 6, 9, 2)  # a 2 x 3 grid of 3 x 3 patches
    patches = F.patchify(x, 3).data[0]
    # patch 4 is grid row 1, grid column 1: pixels rows 3..5, columns 3..5
    by_hand = [x[0, 3 + i, 3 + j, ch] for i in range(3) for j in range(3) for ch in range(2)]
    np.testing.assert_array_equal(patches[4], by_hand)
    # patch 2 is grid row 0, grid column 2 (numbered row by row)
    np.testing.assert_array_equal(patches[2], x[0, 0:3, 6:9].reshape(-1))


def test_patch_embedding_is_a_convolution_with_kernel_and_stride_p():
    """z_p = x_p E for every patch == conv2d with kernel = stride = P and E as (P, P, C, D)."""
    n, h, w, c, p, d = 2, 8, 12, 3, 4, 5
    x = images(n, h, w, c)
    e = np.random.default_rng(1).standard_normal((p * p * c, d)).astype(np.float32)
    tokens = (F.patchify(x, p) @ e).data  # (N, N_p, D)
    conv = F.conv2d(x, e.reshape(p, p, c, d), stride=p).data  # (N, H/P, W/P, D)
    np.testing.assert_allclose(tokens, conv.reshape(n, -1, d), rtol=1e-5, atol=1e-5)


def small_vit(image_size=(8, 12), patch_size=4, channels=3, num_classes=5, depth=2) -> ViT:
    tm.manual_seed(0)
    return ViT(
        image_size,
        patch_size,
        channels,
        dim=16,
        depth=depth,
        heads=2,
        mlp_ratio=2,
        num_classes=num_classes,
    )


def test_shapes_for_non_square_images_and_one_channel():
    model = small_vit(image_size=(8, 20), patch_size=4, channels=1)  # a 2 x 5 grid
    assert model.grid == (2, 5) and model.num_patches == 10
    assert model.pos_embedding.shape == (11, 16) and model.cls_token.shape == (1, 1, 16)
    assert model.patch_embedding.weight.shape == (4 * 4 * 1, 16)
    x = images(3, 8, 20, 1)
    tokens, weights = model.encode(x, return_weights=True)
    assert tokens.shape == (3, 11, 16)
    assert weights.shape == (2, 3, 2, 11, 11)  # (depth, N, heads, L, L)
    np.testing.assert_allclose(weights.sum(-1), 1, rtol=1e-5)
    assert model(x).shape == (3, 5)
    with pytest.raises(ValueError, match=r"8, 20, 1"):
        model.encode(images(3, 20, 8, 1))


def test_cls_and_pos_embedding_start_small():
    model = ViT(32, 4, 3, dim=64, depth=1, heads=4)
    for p in (model.cls_token, model.pos_embedding):
        assert abs(p.data.std() - 0.02) < 0.004 and abs(p.data.mean()) < 0.005


def test_every_patch_reaches_the_cls_token():
    model = small_vit()
    x = images(1, 8, 12, 3)
    with tm.no_grad():
        cls = model.encode(x).data[0, 0]
        for k in range(model.num_patches):
            changed = x.copy()
            r, c = divmod(k, model.grid[1])
            changed[0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
            assert not np.allclose(model.encode(changed).data[0, 0], cls, atol=1e-6), k


def test_images_of_a_batch_do_not_influence_each_other():
    model = small_vit().eval()
    x = images(4, 8, 12, 3)
    with tm.no_grad():
        before = model(x).data
        x2 = x.copy()
        x2[2] = images(1, 8, 12, 3, seed=7)[0]
        after = model(x2).data
        alone = model(x[1:2]).data
    np.testing.assert_allclose(after[[0, 1, 3]], before[[0, 1, 3]], rtol=1e-5, atol=1e-6)
    assert not np.allclose(after[2], before[2])
    np.testing.assert_allclose(alone[0], before[1], rtol=1e-4, atol=1e-5)


def test_loss_gradient_reaches_cls_token_pos_embedding_and_patch_embedding():
    model = small_vit()
    loss = F.cross_entropy(model(images(3, 8, 12, 3)), np.array([0, 3, 4]))
    loss.backward()
    for p in (model.cls_token, model.pos_embedding, model.patch_embedding.weight):
        assert p.grad is not None and p.grad.shape == p.shape
        assert np.all(np.isfinite(p.grad)) and np.abs(p.grad).sum() > 0
    assert np.all(np.abs(model.pos_embedding.grad).sum(-1) > 0)  # every position, [CLS] too


def test_gradients_match_finite_differences_along_random_directions():
    """<dL/dtheta, u> against (L(theta + eps u) - L(theta - eps u)) / (2 eps), in float64
    (the [CLS] token starts at |z| ~ 0.02, where LayerNorm bends sharply: float32 is too coarse)."""
    model = small_vit(depth=1)
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    x, y = images(2, 8, 12, 3).astype(np.float64), np.array([1, 2])
    F.cross_entropy(model(x), y).backward()
    rng = np.random.default_rng(3)
    for p in (model.cls_token, model.pos_embedding, model.patch_embedding.weight):
        u = rng.standard_normal(p.shape)
        base, eps, values = p.data.copy(), 1e-6, []
        with tm.no_grad():
            for sign in (1, -1):
                p.data[...] = base + sign * eps * u
                values.append(float(F.cross_entropy(model(x), y).item()))
        p.data[...] = base
        numeric = (values[0] - values[1]) / (2 * eps)
        assert numeric == pytest.approx(float((p.grad * u).sum()), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("image_size, p", [(32, 5), ((8, 12), 8), ((30, 32), 4)])
def test_patch_size_that_does_not_divide_the_image_is_an_error_at_construction(image_size, p):
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    with pytest.raises(ValueError, match=rf"patch size {p}.*{h}x{w}"):
        ViT(image_size, p, 3, dim=8, depth=1, heads=2)


def test_forward_without_a_head_is_an_error():
    model = small_vit(num_classes=None)
    assert model.encode(images(1, 8, 12, 3)).shape == (1, 7, 16)
    with pytest.raises(RuntimeError, match="num_classes"):
        model(images(1, 8, 12, 3))


def test_attention_rollout_multiplies_layers_and_keeps_rows_stochastic():
    rng = np.random.default_rng(0)
    w = rng.random((3, 2, 4, 5, 5))
    w /= w.sum(-1, keepdims=True)
    r = attention_rollout(w, residual=0.5)
    assert r.shape == (2, 5, 5)
    np.testing.assert_allclose(r.sum(-1), 1)
    a = [0.5 * np.eye(5) + 0.5 * w[layer, 1].mean(0) for layer in range(3)]
    np.testing.assert_allclose(r[1], a[2] @ a[1] @ a[0])
    # uniform attention in every layer with no residual spreads every token evenly
    flat = np.full((2, 1, 1, 5, 5), 0.2)
    np.testing.assert_allclose(attention_rollout(flat, residual=0.0), 0.2)
