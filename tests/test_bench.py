"""python -m tinymm.bench: the analytic FLOP count, the timing helpers, and the result contract."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinymm.bench import (
    TINY_VIT,
    VLM,
    ViT,
    _images,
    conv_flops,
    decode_inputs,
    summarise,
    time_blocks,
    torch_state,
    torch_unet,
    torch_vit,
    torch_vlm,
    vit_flops,
)
from tinymm.models.unet import UNet
from tinymm.tensor import Tensor, manual_seed, tensor

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(
    image_size=4, patch_size=2, channels=1, dim=8, depth=1, heads=2, mlp_ratio=2, num_classes=3
)


def test_vit_flops_by_hand_for_a_tiny_config():
    # 4x4x1 image, patch 2: 4 patches of 2*2*1 = 4 values, + [CLS] = 5 tokens; D = 8, H = 16.
    patch_embedding = 4 * 4 * 8  # N_p x (P^2 C) x D                    = 128
    qkv = 3 * 5 * 8 * 8  # three (5, 8) @ (8, 8)                          = 960
    out_projection = 5 * 8 * 8  #                                         = 320
    scores = 2 * (5 * 4 * 5)  # 2 heads x (5, 4) @ (4, 5)                = 200
    weighted_sum = 2 * (5 * 5 * 4)  # 2 heads x (5, 5) @ (5, 4)          = 200
    mlp = 5 * 8 * 16 + 5 * 16 * 8  #                                     = 1280
    head = 8 * 8 + 8 * 3  # MLP(8, 8, 3) on the [CLS] token              = 88
    macs = patch_embedding + qkv + out_projection + scores + weighted_sum + mlp + head
    assert macs == 3176
    assert vit_flops(batch=1, **TINY) == 2 * 3176
    # linear in the batch; blocks add 2960 MACs each, the rest (216) once per image
    assert vit_flops(batch=3, **{**TINY, "depth": 2}) == 2 * 3 * (216 + 2 * 2960)
    # heads split D: they move no FLOPs
    assert vit_flops(batch=1, **{**TINY, "heads": 8}) == 2 * 3176


def test_vit_flops_of_the_reference_step():
    reference = dict(
        image_size=32, patch_size=4, channels=3, dim=64, depth=4, heads=4, mlp_ratio=2,
        num_classes=10,
    )  # fmt: skip
    per_block = 64 * 65 * (4 * 64 * 64 + 2 * 65 * 64 + 2 * 64 * 128)
    macs = 64 * 64 * 48 * 64 + 4 * per_block + 64 * (64 * 64 + 64 * 10)
    assert macs == 696_590_336
    assert vit_flops(batch=64, **reference) == 2 * macs


def test_conv_flops():
    # 2 x 4x4 output pixels x 3x3 x 5 in x 7 out MACs, forward + dx + dW
    assert conv_flops(batch=2, size=4, c_in=5, c_out=7, kernel=3, padding=1) == 3 * 2 * (
        2 * 16 * 9 * 5 * 7
    )


def test_time_blocks_takes_turns_after_warm_up():
    calls = []
    fns = {"tinymm": lambda: calls.append("a"), "torch": lambda: calls.append("b")}
    times = time_blocks(fns, blocks=3, block_seconds=0.0, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(t) for t in times.values()] == [3, 3]
    assert all(t > 0 for ts in times.values() for t in ts)


def test_ratio_is_the_median_of_paired_ratios():
    times = {"tinymm": [1.0, 4.0, 3.0], "torch": [2.0, 2.0, 6.0]}
    out = summarise(times, "vit_step_ms", 1e3)
    assert out["vit_step_ms"] == pytest.approx(3000)
    assert out["torch_vit_step_ms"] == pytest.approx(2000)
    # ratios 0.5, 2, 0.5: median 0.5, not 3000 / 2000 (the blocks side by side share a load)
    assert out["ratio_vit_step"] == pytest.approx(0.5)
    assert summarise({"tinymm": [1.0]}, "node_us", 1e6) == {"node_us": pytest.approx(1e6)}


def test_torch_vit_is_the_same_model():
    """With tinymm's weights (Linear weights transposed) the bench's torch ViT gives the same
    logits: the comparison times the same computation on both sides."""
    torch = pytest.importorskip("torch")
    model, twin = ViT(**TINY_VIT), torch_vit(torch, **TINY_VIT)
    weights = model.state_dict()
    assert set(weights) == set(twin.state_dict())
    twin.load_state_dict(
        {
            name: torch.from_numpy(w.T.copy() if w.ndim == 2 and name.endswith("weight") else w)
            for name, w in weights.items()
        }
    )
    images, _ = _images(TINY_VIT, 3)
    expected = model(images).data
    with torch.no_grad():
        logits = twin(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)

    # torch's nn.MultiheadAttention packs W^Q, W^K, W^V into one in-projection: the same function
    packed = torch_vit(torch, **TINY_VIT, attention="mha")
    state = {k: v for k, v in twin.state_dict().items() if ".attn." not in k}
    for i in range(TINY_VIT["depth"]):
        attn = f"blocks.{i}.attn."
        qkv = [twin.state_dict()[f"{attn}{p}_proj.{w}"] for p in "qkv" for w in ("weight", "bias")]
        state[f"{attn}mha.in_proj_weight"] = torch.cat(qkv[0::2])
        state[f"{attn}mha.in_proj_bias"] = torch.cat(qkv[1::2])
        for w in ("weight", "bias"):
            state[f"{attn}mha.out_proj.{w}"] = twin.state_dict()[f"{attn}out_proj.{w}"]
    packed.load_state_dict(state)
    with torch.no_grad():
        logits = packed(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_torch_unet_is_the_same_model():
    """A small U-Net of the lesson's design with random weights everywhere: the bench's torch
    twin, given its weights, predicts the same noise and gets the same weight gradients."""
    torch = pytest.importorskip("torch")
    config = dict(in_channels=3, context_dim=8, channels=(8, 16), attention=(True, True), heads=2)
    manual_seed(0)
    model = UNet(**config)
    model.conv_out.weight.data[...] = 0.1  # (it starts at zero: no gradient below it)
    twin = torch_unet(torch, **config)
    twin.load_state_dict(torch_state(torch, model.state_dict()))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 3), dtype=np.float32)
    t, context = np.array([3, 700]), rng.standard_normal((2, 5, 8), dtype=np.float32)
    eps = model(x, t, Tensor(context))
    (eps * eps).sum().backward()
    out = twin(torch.from_numpy(x), t, torch.from_numpy(context))
    (out * out).sum().backward()
    np.testing.assert_allclose(out.detach().numpy(), eps.data, rtol=1e-4, atol=1e-5)
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        expected = torch_state(torch, {name: p.grad})[name].numpy()
        np.testing.assert_allclose(grads[name].grad.numpy(), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_torch_vlm_decodes_the_same_tokens(activation):
    """The bench's torch decoder with its own KV cache writes the same greedy tokens as
    VLM.generate, batch 1 and batch 3; its MLPs compute the decoder's GELU (the same tokens
    alone would not tell a tanh GELU from the exact one)."""
    torch = pytest.importorskip("torch")
    manual_seed(0)
    vision = ViT(8, 4, 3, 16, 1, 2)
    model = VLM(vision, 50, 16, 2, 2, max_len=16, vision_ids=(1, 2))
    for block in model.blocks:
        block.mlp.activation = activation
    twin = torch_vlm(torch, model)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32) * 3
    with torch.no_grad():
        twin_mlp = twin.blocks[0].mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(twin_mlp, model.blocks[0].mlp(tensor(x)).data, rtol=0, atol=1e-5)
    for batch in (1, 3):
        images = np.random.default_rng(batch).standard_normal((batch, 8, 8, 3), dtype=np.float32)
        prompts = np.random.default_rng(batch).integers(3, 50, (batch, 4))
        expected = model.generate(images, prompts, 10)
        np.testing.assert_array_equal(twin.generate(images, prompts, 10), expected)
    with pytest.raises(ValueError, match="fusion"):
        torch_vlm(torch, VLM(vision, 50, 16, 1, 2, fusion="prefix", vision_ids=(1, 2)))


def test_decode_inputs_are_ordinary_tokens():
    images, prompts = decode_inputs(4, 10)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
    assert prompts.shape == (4, 10) and prompts.min() >= 3  # no special (vision) ids


KEYS = (
    "blas_gflops_256 blas_gflops_512 blas_gflops_1024 blas_peak_gflops node_us tiny_step_ms "
    "vit_step_ms vit_wide_step_ms vit_gflops vit_peak_fraction vit_graph_nodes conv_ms "
    "conv_gflops attention_ms unet_step_ms decode_tokens_per_s decode_b1_tokens_per_s "
    "blas_threads tinymm_threads seconds"
).split()


def test_quick_run_prints_a_table_and_one_result_line(tmp_path):
    path = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tinymm.bench", "--quick", "--json", str(path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "CI": "true"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert sum(line.startswith("result: ") for line in lines) == 1
    assert lines[-1].startswith("result: "), lines[-5:]
    assert any("ViT training step" in line for line in lines), "no table"
    assert any("U-Net training step" in line for line in lines), "no U-Net row"
    assert any("greedy decoding" in line for line in lines), "no decoding row"
    result = json.loads(lines[-1][len("result: ") :])
    for key in KEYS:
        assert key in result, key
        assert isinstance(result[key], int | float), (key, result[key])
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert 0 < result["vit_peak_fraction"] < 10  # a unit slip (ms vs s) would be 1000x
    assert result["blas_peak_gflops"] == max(result[f"blas_gflops_{n}"] for n in (256, 512, 1024))
    assert result["quick"] == 1
    assert not any(key.startswith(("torch_", "ratio_")) for key in result), "torch without --torch"
    assert json.loads(path.read_text()) == result
