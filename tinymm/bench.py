"""How fast is tinymm on this machine? `python -m tinymm.bench [--quick] [--torch] [--json PATH]`

Every number is measured here and now, on the machine that runs the bench, and is read against
that machine's own matrix-multiply speed. The table ends with one line `result: {json}` (flat,
snake_case keys, numbers only); `--json PATH` also writes that dict to a file.

What each number means:

1. BLAS peak, `blas_gflops_{256,512,1024}`: float32 `a @ b` of two square n x n matrices in
   NumPy, 2 n^3 / seconds / 1e9. `blas_peak_gflops` is the best of the three: the most a GEMM-bound
   step could reach. The table also names the BLAS library and its thread count.
2. Engine overhead. `node_us`: microseconds per graph node, forward + backward, on a chain of
   1,000 elementwise ops (`* 1.0001`, `+ 0.5`) on a (4,) tensor, where the arithmetic is nothing
   and everything is bookkeeping. `tiny_step_ms`: one whole training step (forward, cross entropy,
   backward, AdamW) of a tiny ViT (8x8x3 images, patch 4, dim 8, 2 blocks, 2 heads, batch 2).
3. The reference training step, `vit_step_ms`: ViT, batch 64, 32x32x3, patch 4 (64 patches + [CLS]
   = 65 tokens), dim 64, 4 heads, 4 pre-norm blocks, MLP ratio 2, tanh-GELU, 10 classes, AdamW.
   `vit_gflops` = analytic FLOPs of the step (`vit_flops`, 3 x forward) / seconds;
   `vit_peak_fraction` = vit_gflops / blas_peak_gflops: 1.0 would be every FLOP at GEMM speed.
   `vit_graph_nodes` is how many nodes its forward graph has (fewer = less Python per step).
4. `conv_ms`, `conv_gflops`: conv2d on (32, 32, 32, 32) NHWC images, 3x3, 32 -> 32 channels,
   padding 1, forward + backward (dx and dW), FLOPs = 3 x 2 x N Ho Wo k^2 C_in C_out.
5. `attention_ms`: F.scaled_dot_product_attention forward + backward, q, k, v (64, 4, 65, 16).
6. `unet_step_ms`: one training step (forward, mean squared error against fixed noise,
   backward, AdamW) of lesson 05's denoiser, UNet(4, 64, (48, 96), (True, True), 4), on
   (64, 8, 8, 4) latents with fixed (64, 10, 64) text states (batch 16 with --quick).
7. `decode_tokens_per_s`: greedy decoding of 32 tokens with the KV cache (`VLM.generate`) by
   lesson 04's VLM (lecture fusion, ViT(32, 8, 3, 64, 4, 4), decoder width 64, 3 blocks, 4
   heads, vocabulary 400) after a 10-token prompt, at batch 256 (the lesson answers its
   questions 256 at a time) and at batch 1 (`decode_b1_*`): generated tokens per second, the
   image encoding and the prompt included (8 tokens, batches 16 and 1, with --quick).
8. With `--torch` (PyTorch is optional and imported only then): the same items 2-7 in PyTorch
   CPU as `torch_*`, and `ratio_*` = tinymm time / torch time, the median over pairs of
   neighbouring blocks. **ratio < 1: tinymm is faster; ratio > 1: tinymm is slower**, except
   the decoding rates: `ratio_decode_*_tokens_per_s` = tinymm tokens/s / torch tokens/s.
   - tinymm and torch take turns block by block (tinymm, torch, tinymm, ...) in one process,
     so both see the same load; a ratio is steadier than either time on a busy machine.
   - torch keeps its default number of threads for the whole run (changing it between blocks
     slows torch's next blocks and flatters tinymm); tinymm uses its own (`tinymm.parallel`).
   - The torch ViT below is the same model: the same patch order, separate q/k/v projections,
     pre-norm blocks, tanh-GELU, learned position embedding, [CLS], head MLP(dim, dim, classes),
     torch.optim.AdamW with its defaults for CPU tensors; and again with torch's own
     nn.MultiheadAttention (`ratio_vit_step_mha`). Both at batch 64, width 64 and at batch 32,
     width 96 (`vit_wide_step_*`).
   - conv uses torch's channels_last memory format: the NCHW tensor torch sees is a view of the
     same NHWC bytes (`permute(0, 3, 1, 2)`), so neither side converts the layout.
   - attention uses torch.nn.functional.scaled_dot_product_attention.
   - The torch U-Net and VLM are the same networks with the tinymm model's weights
     (`torch_state`), the U-Net in NCHW (torch's default layout; the permutes at its input
     and output are part of its step). `unet_loss_diff` is the loss difference of the first
     step (the bench stops if it exceeds 1e-4); `decode_same_tokens` the fraction of greedy
     tokens both write alike. The torch decoder keeps its own cache, grown by torch.cat per
     token as VLM.generate grows tinymm's, under torch.inference_mode().

Times are wall-clock medians over blocks of calls, after warm-up. By default tinymm works on two
threads (`tinymm/parallel.py`, one per core) with one OpenBLAS thread (`runtime.tune()`), and
torch on its default threads; `TINYMM_THREADS=1 python -m tinymm.bench` puts tinymm on one.
tinymm's workers sleep between jobs, so on a busy machine (the table shows the load average)
they cost little; torch's OpenMP threads spin, wait for cores and slow down many times over.
Absolute times under load are inflated; the ratios, measured side by side, hold up better.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import functional as F
from . import nn, optim, parallel, runtime
from .models import VLM, ViT
from .models.unet import UNet, coordinates, position_features, timestep_embedding
from .tensor import Tensor, manual_seed

# (image_size, patch_size, channels, dim, depth, heads, mlp_ratio, num_classes), batch
REFERENCE_VIT = dict(
    image_size=32, patch_size=4, channels=3, dim=64, depth=4, heads=4, mlp_ratio=2, num_classes=10
)
REFERENCE_BATCH = 64
WIDE_VIT = {**REFERENCE_VIT, "dim": 96}  # the second configuration: batch 32, width 96
WIDE_BATCH = 32
TINY_VIT = dict(
    image_size=8, patch_size=4, channels=3, dim=8, depth=2, heads=2, mlp_ratio=2, num_classes=10
)
TINY_BATCH = 2
CONV = dict(batch=32, size=32, c_in=32, c_out=32, kernel=3, padding=1)
ATTENTION_SHAPE = (64, 4, 65, 16)  # (N, heads, L, d_head)
CHAIN_LENGTH = 1000
# lesson 05's denoiser, UNet(4, 64, (48, 96), (True, True), 4), on (N, 8, 8, 4) latents read with
# (N, 10, 64) text states; batch 64 as the lesson trains (16 in --quick)
UNET = dict(in_channels=4, context_dim=64, channels=(48, 96), attention=(True, True), heads=4)
UNET_INPUT = dict(size=8, text_length=10)
UNET_BATCH, QUICK_UNET_BATCH = 64, 16
# lesson 04's VLM (lecture fusion): ViT(32, 8, 3, 64, 4, 4), decoder width 64, 3 blocks, 4 heads,
# a 400-token vocabulary; max_len 48 instead of the lesson's 32 so that a 10-token prompt and 32
# new tokens fit (a longer position table; nothing else changes)
VLM_VISION = dict(image_size=32, patch_size=8, channels=3, dim=64, depth=4, heads=4, mlp_ratio=4)
VLM_DECODER = dict(vocab_size=400, dim=64, depth=3, heads=4, max_len=48, vision_ids=(1, 2))
DECODE = dict(prompt=10, new_tokens=32, batches=(256, 1))  # the lesson answers 256 at a time
QUICK_DECODE = dict(prompt=10, new_tokens=8, batches=(16, 1))

FULL = dict(blocks=9, block_seconds=0.3, warmup=2)
QUICK = dict(blocks=3, block_seconds=0.05, warmup=1)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def time_blocks(
    fns: dict[str, Callable[[], Any]], blocks: int, block_seconds: float, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each fn, one value per block of calls.

    Each fn is called `warmup` times first. Then the fns take turns block by block (a, b, a, b,
    ...), so that all of them see the same machine load; a block calls its fn again and again
    until `block_seconds` have passed (at least once), and yields elapsed / calls.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            gc.collect()
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= block_seconds:
                    break
            times[name].append(elapsed / calls)
    return times


def summarise(times: dict[str, list[float]], key: str, scale: float) -> dict[str, float]:
    """{key: median tinymm time * scale} and, if torch ran, torch_{key} and ratio_{name}: the
    median over blocks of tinymm time / torch time (neighbouring blocks, same load)."""
    out = {key: statistics.median(times["tinymm"]) * scale}
    if "torch" in times:
        out[f"torch_{key}"] = statistics.median(times["torch"]) * scale
        ratios = [a / b for a, b in zip(times["tinymm"], times["torch"], strict=True)]
        out["ratio_" + key.rsplit("_", 1)[0]] = statistics.median(ratios)
    return out


# ----------------------------------------------------------------------------------------------
# FLOP counts (multiply-adds of the matmuls; elementwise ops, norms and softmax are not counted)
# ----------------------------------------------------------------------------------------------


def vit_flops(
    batch: int,
    image_size: int,
    patch_size: int,
    channels: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_ratio: float,
    num_classes: int,
) -> float:
    """FLOPs of one ViT *forward* pass, 2 x multiply-adds (MACs) of its matrix products.

    With N = batch, N_p = (image_size / P)^2 patches, L = N_p + 1 tokens, D = dim,
    H = dim * mlp_ratio:
        patch embedding   N N_p (P^2 C) D          (N, N_p, P^2 C) @ (P^2 C, D)
        per block:
          q, k, v         3 N L D D                three (N L, D) @ (D, D)
          out projection  N L D D
          scores Q K^T    N L L D                  heads x (L, D/heads) @ (D/heads, L)
          weighted sum PV N L L D                  heads x (L, L) @ (L, D/heads)
          MLP             2 N L D H                (N L, D) @ (D, H) and (N L, H) @ (H, D)
        head              N (D D + D classes)      MLP(D, D, classes) on the [CLS] token
    `heads` does not change the count: the heads split D. A training step (forward, backward
    with a gradient for both operands of every product) is about 3 x this.
    """
    n, p, d = batch, patch_size, dim
    patches = (image_size // p) ** 2
    tokens = patches + 1
    hidden = int(dim * mlp_ratio)
    patch_embedding = n * patches * (p * p * channels) * d
    qkv = 3 * n * tokens * d * d
    out_projection = n * tokens * d * d
    scores = n * tokens * tokens * d
    weighted_sum = n * tokens * tokens * d
    mlp = 2 * n * tokens * d * hidden
    head = n * (d * d + d * num_classes)
    macs = patch_embedding + depth * (qkv + out_projection + scores + weighted_sum + mlp) + head
    return 2.0 * macs


def conv_flops(batch: int, size: int, c_in: int, c_out: int, kernel: int, padding: int) -> float:
    """FLOPs of conv2d forward + backward (dx, dW), stride 1: 3 x 2 x N Ho Wo k^2 C_in C_out."""
    out = size + 2 * padding - kernel + 1
    return 3 * 2.0 * batch * out * out * kernel * kernel * c_in * c_out


# ----------------------------------------------------------------------------------------------
# 1. The machine: BLAS
# ----------------------------------------------------------------------------------------------


def blas_info() -> dict[str, Any]:
    """Which BLAS NumPy calls and with how many threads (threadpoolctl if installed)."""
    info: dict[str, Any] = {"name": "?", "version": "?", "threads": None}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info.update(name=blas.get("name", "?"), version=blas.get("version", "?"))
    except Exception:  # older NumPy: no dict mode
        pass
    try:
        from threadpoolctl import threadpool_info

        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        pools.sort(key=lambda p: "numpy" not in p.get("filepath", ""))  # NumPy's own first
        if pools:
            pool = pools[0]
            info.update(
                name=pool["internal_api"], version=pool["version"], threads=pool["num_threads"]
            )
            info["arch"] = pool.get("architecture")
    except ImportError:
        pass
    if not info.get("arch"):  # without threadpoolctl: ask OpenBLAS which kernels it runs
        info["arch"] = runtime.blas_core()
    if info["threads"] is None:  # without threadpoolctl: ask OpenBLAS, or read the settings
        info["threads"] = runtime.blas_threads()
    if info["threads"] is None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if os.environ.get(var, "").isdigit():
                info["threads"] = int(os.environ[var])
                break
        else:
            info["threads"] = os.cpu_count() or 1
    return info


def bench_blas(cfg: dict) -> dict[str, float]:
    """float32 GEMM GFLOP/s at n = 256, 512, 1024 (2 n^3 FLOPs per product)."""
    rng = np.random.default_rng(0)
    out = {}
    for n in (256, 512, 1024):
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        times = time_blocks({"tinymm": lambda a=a, b=b: a @ b}, **cfg)
        out[f"blas_gflops_{n}"] = 2.0 * n**3 / statistics.median(times["tinymm"]) / 1e9
    out["blas_peak_gflops"] = max(out[f"blas_gflops_{n}"] for n in (256, 512, 1024))
    return out


# ----------------------------------------------------------------------------------------------
# 2-5. tinymm workloads: each returns a function that does one unit of work
# ----------------------------------------------------------------------------------------------


def tinymm_chain() -> Callable[[], None]:
    """CHAIN_LENGTH elementwise nodes (alternately * and +) on a (4,) tensor, then backward."""
    x = Tensor(np.ones(4, dtype=np.float32), requires_grad=True)

    def run() -> None:
        x.grad = None
        y = x
        for _ in range(CHAIN_LENGTH // 2):
            y = y * 1.0001
            y = y + 0.5
        y.backward(np.ones(4, dtype=np.float32))

    return run


def tinymm_train_step(config: dict, batch: int) -> tuple[Callable[[], None], Callable[[], Tensor]]:
    """One AdamW training step of a ViT on fixed random images and labels; and its loss alone
    (to count graph nodes)."""
    manual_seed(0)
    model = ViT(**config)
    opt = optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = _images(config, batch)

    def loss() -> Tensor:
        return F.cross_entropy(model(images), labels)

    def step() -> None:
        opt.zero_grad()
        loss().backward()
        opt.step()

    return step, loss


def tinymm_conv() -> Callable[[], None]:
    """conv2d forward + backward with a fixed output gradient (no loss node in the way)."""
    c = CONV
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((c["batch"], c["size"], c["size"], c["c_in"]), np.float32), True)
    conv = nn.Conv2d(c["c_in"], c["c_out"], c["kernel"], padding=c["padding"])
    out_shape = (c["batch"], c["size"], c["size"], c["c_out"])
    grad = rng.standard_normal(out_shape, dtype=np.float32)

    def run() -> None:
        x.grad = conv.weight.grad = conv.bias.grad = None
        conv(x).backward(grad)

    return run


def tinymm_attention() -> Callable[[], None]:
    """Fused attention forward + backward with a fixed output gradient."""
    rng = np.random.default_rng(0)
    q, k, v = (Tensor(rng.standard_normal(ATTENTION_SHAPE, np.float32), True) for _ in range(3))
    grad = rng.standard_normal(ATTENTION_SHAPE, dtype=np.float32)

    def run() -> None:
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v).backward(grad)

    return run


def unet_inputs(batch: int) -> dict[str, np.ndarray]:
    """Fixed noisy latents, steps, text states and target noise for the U-Net step."""
    rng = np.random.default_rng(0)
    size, length = UNET_INPUT["size"], UNET_INPUT["text_length"]
    return {
        "x": rng.standard_normal((batch, size, size, UNET["in_channels"]), dtype=np.float32),
        "t": rng.integers(0, 1000, batch),
        "context": rng.standard_normal((batch, length, UNET["context_dim"]), dtype=np.float32),
        "eps": rng.standard_normal((batch, size, size, UNET["in_channels"]), dtype=np.float32),
    }


def tinymm_unet_step(batch: int) -> tuple[Callable[[], float], Any]:
    """One AdamW step of lesson 05's U-Net: eps_hat = unet(x_t, t, text), L = mean (eps_hat -
    eps)^2, backward, update. Returns the step (it returns the loss) and the model."""
    manual_seed(0)
    model = UNet(**UNET)
    rng = np.random.default_rng(1)  # the lesson's conv_out starts at 0 (eps_hat = 0, and no
    for p in (model.conv_out.weight, model.conv_out.bias):  # gradient below it): random here
        p.data[...] = 0.02 * rng.standard_normal(p.shape)
    opt = optim.AdamW(model.parameters(), lr=1e-3)
    inputs = unet_inputs(batch)
    context = Tensor(inputs["context"])

    def step() -> float:
        opt.zero_grad()
        loss = F.mse_loss(model(inputs["x"], inputs["t"], context), inputs["eps"])
        loss.backward()
        opt.step()
        return float(loss.data)

    return step, model


def tinymm_vlm() -> VLM:
    """Lesson 04's VLM (lecture fusion) with random weights."""
    manual_seed(0)
    return VLM(ViT(**VLM_VISION), **VLM_DECODER)


def decode_inputs(batch: int, prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """Random images (N, 32, 32, 3) and prompts (N, prompt) of ordinary token ids."""
    rng = np.random.default_rng(0)
    size = VLM_VISION["image_size"]
    images = rng.standard_normal((batch, size, size, VLM_VISION["channels"]), dtype=np.float32)
    return images, rng.integers(3, VLM_DECODER["vocab_size"], (batch, prompt))


def tinymm_decode(model: VLM, batch: int, prompt: int, new_tokens: int) -> Callable[[], Any]:
    """Greedy decoding of new_tokens tokens with the KV cache (VLM.generate); returns them."""
    images, prompts = decode_inputs(batch, prompt)
    return lambda: model.generate(images, prompts, new_tokens)


def _images(config: dict, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    s, c = config["image_size"], config["channels"]
    images = rng.standard_normal((batch, s, s, c), dtype=np.float32)
    return images, np.arange(batch) % config["num_classes"]


def graph_nodes(loss: Tensor) -> int:
    """How many op nodes the graph behind `loss` has."""
    seen, stack, count = {id(loss)}, [loss], 0
    while stack:
        node = stack.pop()._node
        if node is None:
            continue
        count += 1
        for t in node.inputs:
            if id(t) not in seen:
                seen.add(id(t))
                stack.append(t)
    return count


# ----------------------------------------------------------------------------------------------
# 6. The same workloads in PyTorch (only with --torch; `torch` is passed in, never imported here)
# ----------------------------------------------------------------------------------------------


def torch_chain(torch: Any) -> Callable[[], None]:
    x = torch.ones(4, requires_grad=True)
    grad = torch.ones(4)

    def run() -> None:
        x.grad = None
        y = x
        for _ in range(CHAIN_LENGTH // 2):
            y = y * 1.0001
            y = y + 0.5
        y.backward(grad)

    return run


def torch_vit(
    torch: Any,
    image_size: int,
    patch_size: int,
    channels: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_ratio: float,
    num_classes: int | None,
    attention: str = "sdpa",
) -> Any:
    """tinymm.models.ViT in PyTorch: the same layers under the same state_dict names (torch's
    Linear weights are (out, in), the transpose of tinymm's), the same patch order and shapes.
    attention="sdpa": separate q/k/v projections and F.scaled_dot_product_attention (the same
    state_dict as tinymm's); "mha": torch.nn.MultiheadAttention(batch_first=True), the module a
    PyTorch user would reach for (one packed in-projection; the same function)."""
    tnn, tF = torch.nn, torch.nn.functional

    class MLP(tnn.Module):  # fc2(gelu_tanh(fc1(x))), as tinymm.nn.MLP
        def __init__(self, dim: int, hidden: int, out: int) -> None:
            super().__init__()
            self.fc1, self.fc2 = tnn.Linear(dim, hidden), tnn.Linear(hidden, out)

        def forward(self, x: Any) -> Any:
            return self.fc2(tF.gelu(self.fc1(x), approximate="tanh"))

    class Attention(tnn.Module):  # separate q, k, v projections, as tinymm.nn.MultiHeadAttention
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
                tnn.Linear(dim, dim) for _ in range(4)
            )

        def forward(self, x: Any) -> Any:
            n, length, _ = x.shape  # (N, L, D) -> (N, heads, L, D/heads) and back
            q, k, v = (
                proj(x).view(n, length, heads, dim // heads).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
            out = tF.scaled_dot_product_attention(q, k, v)
            return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))

    class PackedAttention(tnn.Module):  # torch's own module
        def __init__(self) -> None:
            super().__init__()
            self.mha = tnn.MultiheadAttention(dim, heads, batch_first=True)

        def forward(self, x: Any) -> Any:
            return self.mha(x, x, x, need_weights=False)[0]

    if attention not in ("sdpa", "mha"):
        raise ValueError(f"torch_vit: attention must be 'sdpa' or 'mha', got {attention!r}")

    class Block(tnn.Module):  # pre-norm: x + attn(ln1(x)), then x + mlp(ln2(x))
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = tnn.LayerNorm(dim)
            self.attn = Attention() if attention == "sdpa" else PackedAttention()
            self.ln2, self.mlp = tnn.LayerNorm(dim), MLP(dim, int(dim * mlp_ratio), dim)

        def forward(self, x: Any) -> Any:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class TorchViT(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            patches = (image_size // patch_size) ** 2
            self.cls_token = tnn.Parameter(0.02 * torch.randn(1, 1, dim))
            self.pos_embedding = tnn.Parameter(0.02 * torch.randn(patches + 1, dim))
            self.patch_embedding = tnn.Linear(patch_size * patch_size * channels, dim)
            self.blocks = tnn.ModuleList(Block() for _ in range(depth))
            self.ln_final = tnn.LayerNorm(dim)
            self.head = MLP(dim, dim, num_classes) if num_classes else None

        def encode(self, images: Any) -> Any:  # every token state after the final norm
            n, h, w, c = images.shape  # (N, H, W, C) -> (N, N_p, P*P*C), as F.patchify
            p = patch_size
            x = images.reshape(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
            z = self.patch_embedding(x.reshape(n, -1, p * p * c))
            z = torch.cat([self.cls_token.expand(n, 1, dim), z], dim=1) + self.pos_embedding
            for block in self.blocks:
                z = block(z)
            return self.ln_final(z)

        def forward(self, images: Any) -> Any:
            return self.head(self.encode(images)[:, 0])

    return TorchViT()


def torch_train_step(
    torch: Any, config: dict, batch: int, attention: str = "sdpa"
) -> Callable[[], None]:
    torch.manual_seed(0)
    model = torch_vit(torch, **config, attention=attention)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = (torch.from_numpy(a) for a in _images(config, batch))

    def run() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()

    return run


def torch_conv(torch: Any) -> Callable[[], None]:
    """Channels-last conv: the NCHW tensor torch sees is a permuted view of NHWC memory."""
    c = CONV
    rng = np.random.default_rng(0)
    x = rng.standard_normal((c["batch"], c["size"], c["size"], c["c_in"]), np.float32)
    grad = rng.standard_normal((c["batch"], c["size"], c["size"], c["c_out"]), dtype=np.float32)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()  # (N, C, H, W) view of NHWC
    grad = torch.from_numpy(grad).permute(0, 3, 1, 2)
    conv = torch.nn.Conv2d(c["c_in"], c["c_out"], c["kernel"], padding=c["padding"])
    conv = conv.to(memory_format=torch.channels_last)

    def run() -> None:
        x.grad = conv.weight.grad = conv.bias.grad = None
        conv(x).backward(grad)

    return run


def torch_attention(torch: Any) -> Callable[[], None]:
    rng = np.random.default_rng(0)
    q, k, v = (
        torch.from_numpy(rng.standard_normal(ATTENTION_SHAPE, np.float32)).requires_grad_()
        for _ in range(3)
    )
    grad = torch.from_numpy(rng.standard_normal(ATTENTION_SHAPE, dtype=np.float32))

    def run() -> None:
        q.grad = k.grad = v.grad = None
        torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)

    return run


def torch_state(torch: Any, state: dict[str, np.ndarray]) -> dict[str, Any]:
    """A tinymm state_dict as torch tensors for the same names: Linear weights transposed
    ((in, out) -> torch's (out, in)), conv weights (kh, kw, C_in, C_out) -> (C_out, C_in, kh, kw),
    token embeddings and everything else as they are."""
    out = {}
    for name, w in state.items():
        if w.ndim == 4:
            w = w.transpose(3, 2, 0, 1)
        elif w.ndim == 2 and name.endswith("weight") and "token_embedding" not in name:
            w = w.T
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def torch_unet(
    torch: Any,
    in_channels: int,
    context_dim: int,
    channels: tuple[int, ...],
    attention: tuple[bool, ...],
    heads: int,
    groups: int = 8,
) -> Any:
    """tinymm.models.unet.UNet in PyTorch, NCHW: the same layers under the same state_dict names
    (weights through `torch_state`), the same order of concatenations, the same constant inputs
    (timestep sinusoid, coordinate channels, query position features, computed by tinymm's
    NumPy functions)."""
    tnn, tF = torch.nn, torch.nn.functional
    emb_dim = 4 * channels[0]

    def norm(c: int) -> Any:  # GroupNorm over channel blocks, as tinymm's (N, HW, G, C/G)
        return tnn.GroupNorm(math.gcd(groups, c), c)

    class MLP(tnn.Module):  # fc2(silu(fc1(x)))
        def __init__(self, dim: int, hidden: int, out: int) -> None:
            super().__init__()
            self.fc1, self.fc2 = tnn.Linear(dim, hidden), tnn.Linear(hidden, out)

        def forward(self, x: Any) -> Any:
            return self.fc2(tF.silu(self.fc1(x)))

    class ResBlock(tnn.Module):
        def __init__(self, c_in: int, c_out: int) -> None:
            super().__init__()
            self.norm1, self.conv1 = norm(c_in), tnn.Conv2d(c_in, c_out, 3, padding=1)
            self.emb_proj = tnn.Linear(emb_dim, c_out)
            self.norm2, self.conv2 = norm(c_out), tnn.Conv2d(c_out, c_out, 3, padding=1)
            self.skip = tnn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

        def forward(self, x: Any, emb: Any) -> Any:
            h = self.conv1(tF.silu(self.norm1(x)))
            h = h + self.emb_proj(tF.silu(emb))[:, :, None, None]  # (N, C) -> (N, C, 1, 1)
            h = self.conv2(tF.silu(self.norm2(h)))
            return (x if self.skip is None else self.skip(x)) + h

    class Attention(tnn.Module):  # separate q, k, v projections, as tinymm.nn.MultiHeadAttention
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.q_proj, self.out_proj = tnn.Linear(dim, dim), tnn.Linear(dim, dim)
            self.k_proj, self.v_proj = tnn.Linear(context_dim, dim), tnn.Linear(context_dim, dim)

        def forward(self, x: Any, context: Any) -> Any:
            def split(z: Any) -> Any:  # (N, L, D) -> (N, heads, L, D/heads)
                return z.view(z.shape[0], z.shape[1], heads, -1).transpose(1, 2)

            q, k, v = (
                split(self.q_proj(x)),
                split(self.k_proj(context)),
                split(self.v_proj(context)),
            )
            out = tF.scaled_dot_product_attention(q, k, v).transpose(1, 2)
            return self.out_proj(out.reshape(x.shape))

    class CrossAttention(tnn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.norm, self.pos_proj, self.attn = norm(c), tnn.Linear(16, c), Attention(c)

        def forward(self, x: Any, context: Any) -> Any:
            n, c, h, w = x.shape
            queries = self.norm(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, HW, C)
            where = torch.from_numpy(position_features(h, w).astype(np.float32))
            out = self.attn(queries + self.pos_proj(where), context)
            return x + out.transpose(1, 2).reshape(n, c, h, w)

    class Conv(tnn.Module):  # Downsample / Upsample hold their conv as .conv
        def __init__(self, c: int, stride: int, up: bool) -> None:
            super().__init__()
            self.conv, self.up = tnn.Conv2d(c, c, 3, stride=stride, padding=1), up

        def forward(self, x: Any) -> Any:
            return self.conv(tF.interpolate(x, scale_factor=2) if self.up else x)

    class TorchUNet(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.time_mlp = MLP(channels[0], emb_dim, emb_dim)
            self.conv_in = tnn.Conv2d(in_channels + 2, channels[0], 3, padding=1)
            widths = (channels[0],) + channels
            self.down_blocks = tnn.ModuleList(
                ResBlock(widths[i], c) for i, c in enumerate(channels)
            )
            self.downs = tnn.ModuleList(Conv(c, 2, False) for c in channels[:-1])
            mid = channels[-1]
            self.mid_block1, self.mid_attn = ResBlock(mid, mid), CrossAttention(mid)
            self.mid_block2 = ResBlock(mid, mid)
            ins = [
                (channels[i + 1] if i + 1 < len(channels) else mid) + c
                for i, c in enumerate(channels)
            ]
            self.up_blocks = tnn.ModuleList(ResBlock(ins[i], c) for i, c in enumerate(channels))
            self.ups = tnn.ModuleList(Conv(c, 1, True) for c in channels[1:])
            self.norm_out = norm(channels[0])
            self.conv_out = tnn.Conv2d(channels[0], in_channels, 3, padding=1)
            for i, on in enumerate(attention):
                if on:
                    setattr(self, f"down_attn_{i}", CrossAttention(channels[i]))
                    setattr(self, f"up_attn_{i}", CrossAttention(channels[i]))

        def cross(self, name: str, h: Any, context: Any) -> Any:
            return getattr(self, name)(h, context) if hasattr(self, name) else h

        def forward(self, x: Any, t: np.ndarray, context: Any) -> Any:
            n, height, width, _ = x.shape  # x (N, H, W, C) -> NCHW, and back at the end
            sinusoid = torch.from_numpy(timestep_embedding(t, channels[0]).astype(np.float32))
            emb = self.time_mlp(sinusoid)
            where = torch.from_numpy(coordinates(n, height, width)).permute(0, 3, 1, 2)
            h = self.conv_in(torch.cat([x.permute(0, 3, 1, 2), where], 1))
            skips = []
            for level, block in enumerate(self.down_blocks):
                h = self.cross(f"down_attn_{level}", block(h, emb), context)
                skips.append(h)
                if level < len(self.downs):
                    h = self.downs[level](h)
            h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb), context), emb)
            for level in reversed(range(len(channels))):
                h = self.up_blocks[level](torch.cat([h, skips[level]], 1), emb)
                h = self.cross(f"up_attn_{level}", h, context)
                if level > 0:
                    h = self.ups[level - 1](h)
            return self.conv_out(tF.silu(self.norm_out(h))).permute(0, 2, 3, 1)

    return TorchUNet()


def torch_unet_step(torch: Any, model: Any, batch: int) -> Callable[[], float]:
    """The U-Net step in PyTorch with the tinymm model's weights (its state before any step)."""
    twin = torch_unet(torch, **UNET)
    twin.load_state_dict(torch_state(torch, model.state_dict()))
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    inputs = unet_inputs(batch)
    x, context, eps = (torch.from_numpy(inputs[k]) for k in ("x", "context", "eps"))

    def step() -> float:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(twin(x, inputs["t"], context), eps)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def torch_vlm(torch: Any, model: VLM) -> Any:
    """A VLM with fusion="lecture" and vision_ids (as lesson 04's) in PyTorch with `model`'s
    weights, and its greedy decoding with its own KV cache: `generate(images, prompts,
    new_tokens)`, as VLM.generate for prompts of one length (no padding)."""
    if model.fusion != "lecture" or model.vision_ids is None:
        raise ValueError(
            f"torch_vlm: needs fusion='lecture' with vision_ids, got fusion={model.fusion!r}, "
            f"vision_ids={model.vision_ids}"
        )
    tnn, tF = torch.nn, torch.nn.functional
    dim, heads, depth = model.dim, model.heads, len(model.blocks)
    hidden = model.blocks[0].mlp.fc1.weight.shape[1]

    # fc2(gelu(fc1(x))) with the decoder's GELU: "gelu_tanh" (the VLM's) or the exact "gelu"
    approximate = {"gelu_tanh": "tanh", "gelu": "none"}[model.blocks[0].mlp.activation]

    class MLP(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = tnn.Linear(dim, hidden), tnn.Linear(hidden, dim)

        def forward(self, x: Any) -> Any:
            return self.fc2(tF.gelu(self.fc1(x), approximate=approximate))

    class Attention(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
                tnn.Linear(dim, dim) for _ in range(4)
            )

    class Block(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.attn, self.ln2, self.mlp = (
                tnn.LayerNorm(dim),
                Attention(),
                tnn.LayerNorm(dim),
                MLP(),
            )

    def split(z: Any) -> Any:  # (N, L, D) -> (N, heads, L, D/heads)
        return z.view(z.shape[0], z.shape[1], heads, -1).transpose(1, 2)

    class TorchVLM(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            v = model.vision
            self.vision = torch_vit(
                torch, v.image_size[0], v.patch_size, v.channels, v.dim, len(v.blocks),
                v.blocks[0].attn.heads, v.blocks[0].mlp.fc1.weight.shape[1] / v.dim, None,
            )  # fmt: skip
            self.image_projection = tnn.Linear(model.vision.dim, dim)
            self.token_embedding = tnn.Embedding(model.vocab_size, dim)
            self.pos_embedding = tnn.Parameter(torch.zeros(model.max_len, dim))
            self.blocks = tnn.ModuleList(Block() for _ in range(depth))
            self.ln_final = tnn.LayerNorm(dim)
            self.lm_head = tnn.Linear(dim, model.vocab_size, bias=False)
            self.image_positions = torch.from_numpy(model.image_positions)  # constant
            self.vision_ids = torch.tensor(model.vision_ids)

        def image_tokens(self, images: Any) -> Any:
            patches = self.image_projection(self.vision.encode(images)[:, 1:])
            patches = patches + self.image_positions
            start, end = self.token_embedding(self.vision_ids).unbind(0)  # (D,) each
            n = patches.shape[0]
            return torch.cat([start.expand(n, 1, dim), patches, end.expand(n, 1, dim)], 1)

        def extend(self, x: Any, cache: list, mask: Any) -> Any:
            """New states x (N, T, D) through every block, attending over the cache + their own
            keys (mask None: all of them); the cache grows in place (torch.cat)."""
            for b, block in enumerate(self.blocks):
                a, h = block.attn, block.ln1(x)
                k = torch.cat([cache[b][0], split(a.k_proj(h))], 2)
                v = torch.cat([cache[b][1], split(a.v_proj(h))], 2)
                cache[b] = (k, v)
                out = tF.scaled_dot_product_attention(split(a.q_proj(h)), k, v, attn_mask=mask)
                x = x + a.out_proj(out.transpose(1, 2).reshape(x.shape))
                x = x + block.mlp(block.ln2(x))
            return x

        def generate(self, images: np.ndarray, prompts: np.ndarray, new_tokens: int) -> Any:
            with torch.inference_mode():
                z_img = self.image_tokens(torch.from_numpy(images))
                cache = []
                for block in self.blocks:  # the image's keys and values, once
                    h = block.ln1(z_img)
                    cache.append((split(block.attn.k_proj(h)), split(block.attn.v_proj(h))))
                ids = torch.from_numpy(prompts)
                length, n_img = ids.shape[1], z_img.shape[1]
                keys = torch.arange(n_img + length)  # every image key, the text causally
                mask = keys[None, :] <= n_img + torch.arange(length)[:, None]
                x = self.token_embedding(ids) + self.pos_embedding[:length]
                x = self.extend(x, cache, mask)
                logits = self.lm_head(self.ln_final(x[:, -1]))
                out = []
                for step in range(new_tokens):
                    token = logits.argmax(-1)
                    out.append(token)
                    if step == new_tokens - 1:
                        break
                    x = self.token_embedding(token[:, None]) + self.pos_embedding[length + step]
                    logits = self.lm_head(self.ln_final(self.extend(x, cache, None)[:, 0]))
                return torch.stack(out, 1).numpy()

    twin = TorchVLM()
    twin.load_state_dict(torch_state(torch, model.state_dict()))
    return twin


# ----------------------------------------------------------------------------------------------
# One function per item: tinymm alone, or tinymm and torch taking turns
# ----------------------------------------------------------------------------------------------


def bench_overhead(cfg: dict, torch: Any = None) -> dict[str, float]:
    """node_us: us per node of a CHAIN_LENGTH chain; tiny_step_ms: a tiny ViT training step."""
    fns = {"tinymm": tinymm_chain()}
    if torch is not None:
        fns["torch"] = torch_chain(torch)
    out = summarise(time_blocks(fns, **cfg), "node_us", 1e6 / CHAIN_LENGTH)
    fns = {"tinymm": tinymm_train_step(TINY_VIT, TINY_BATCH)[0]}
    if torch is not None:
        fns["torch"] = torch_train_step(torch, TINY_VIT, TINY_BATCH)
    return out | summarise(time_blocks(fns, **cfg), "tiny_step_ms", 1e3)


def bench_vit(cfg: dict, peak_gflops: float, torch: Any = None) -> dict[str, float]:
    """vit_step_ms, vit_gflops (analytic, 3 x forward) and vit_peak_fraction; with torch, its
    step with F.scaled_dot_product_attention (torch_vit_step_ms, ratio_vit_step) and with
    nn.MultiheadAttention (torch_vit_step_mha_ms, ratio_vit_step_mha); the same for the second
    configuration, batch 32 and width 96 (vit_wide_step_ms, ratio_vit_wide_step, ..._mha)."""
    out: dict[str, float] = {}
    for key, config, batch in (
        ("vit_step", REFERENCE_VIT, REFERENCE_BATCH),
        ("vit_wide_step", WIDE_VIT, WIDE_BATCH),
    ):
        step, loss = tinymm_train_step(config, batch)
        fns = {"tinymm": step}
        if torch is not None:
            fns["torch"] = torch_train_step(torch, config, batch)
            fns["torch_mha"] = torch_train_step(torch, config, batch, attention="mha")
        times = time_blocks(fns, **cfg)
        mha = times.pop("torch_mha", None)
        out |= summarise(times, f"{key}_ms", 1e3)
        if mha is not None:
            out |= {
                k.replace(key, f"{key}_mha"): v
                for k, v in summarise({**times, "torch": mha}, f"{key}_ms", 1e3).items()
                if k.startswith(("torch_", "ratio_"))
            }
        if key == "vit_step":
            out["vit_graph_nodes"] = graph_nodes(loss())
    step_gflop = 3 * vit_flops(REFERENCE_BATCH, **REFERENCE_VIT) / 1e9
    out["vit_step_gflop"] = step_gflop
    out["vit_gflops"] = step_gflop / (out["vit_step_ms"] / 1e3)
    out["vit_peak_fraction"] = out["vit_gflops"] / peak_gflops
    if torch is not None:
        out["torch_vit_gflops"] = step_gflop / (out["torch_vit_step_ms"] / 1e3)
    return out


def bench_conv(cfg: dict, torch: Any = None) -> dict[str, float]:
    """conv_ms and conv_gflops: conv2d forward + backward."""
    fns = {"tinymm": tinymm_conv()}
    if torch is not None:
        fns["torch"] = torch_conv(torch)
    out = summarise(time_blocks(fns, **cfg), "conv_ms", 1e3)
    gflop = conv_flops(**CONV) / 1e9
    out["conv_gflops"] = gflop / (out["conv_ms"] / 1e3)
    if torch is not None:
        out["torch_conv_gflops"] = gflop / (out["torch_conv_ms"] / 1e3)
    return out


def bench_attention(cfg: dict, torch: Any = None) -> dict[str, float]:
    """attention_ms: scaled_dot_product_attention forward + backward."""
    fns = {"tinymm": tinymm_attention()}
    if torch is not None:
        fns["torch"] = torch_attention(torch)
    return summarise(time_blocks(fns, **cfg), "attention_ms", 1e3)


def bench_unet(cfg: dict, quick: bool, torch: Any = None) -> dict[str, float]:
    """unet_step_ms: one training step of lesson 05's U-Net; with torch the same network in
    PyTorch from the same weights (unet_loss_diff: |loss difference| of the first step)."""
    step, model = tinymm_unet_step(QUICK_UNET_BATCH if quick else UNET_BATCH)
    fns: dict[str, Callable[[], Any]] = {"tinymm": step}
    out: dict[str, float] = {}
    if torch is not None:
        fns["torch"] = torch_unet_step(torch, model, QUICK_UNET_BATCH if quick else UNET_BATCH)
        out["unet_loss_diff"] = abs(fns["tinymm"]() - fns["torch"]())  # the first step
        if out["unet_loss_diff"] > 1e-4:
            raise AssertionError(f"bench: the two U-Nets disagree: {out['unet_loss_diff']}")
    return out | summarise(time_blocks(fns, **cfg), "unet_step_ms", 1e3)


def bench_decode(cfg: dict, quick: bool, torch: Any = None) -> dict[str, float]:
    """decode_tokens_per_s: greedy KV-cached decoding with lesson 04's VLM, generated tokens per
    second (image encoding and prompt included), at the lesson's evaluation batch and at batch
    1 (decode_b1_*). With torch: ratio_* = tinymm tokens/s / torch tokens/s (> 1: tinymm is
    faster), and decode_same_tokens, the fraction of greedy tokens on which both agree."""
    setup = QUICK_DECODE if quick else DECODE
    model = tinymm_vlm()
    twin = torch_vlm(torch, model) if torch is not None else None
    out: dict[str, float] = {}
    for batch, key in zip(setup["batches"], ("decode", "decode_b1"), strict=True):
        tokens = batch * setup["new_tokens"]
        fns = {"tinymm": tinymm_decode(model, batch, setup["prompt"], setup["new_tokens"])}
        if twin is not None:
            images, prompts = decode_inputs(batch, setup["prompt"])
            fns["torch"] = lambda i=images, p=prompts: twin.generate(i, p, setup["new_tokens"])
            same = fns["tinymm"]() == fns["torch"]()
            out[f"{key}_same_tokens"] = float(same.mean())
        times = time_blocks(fns, **cfg)
        out[f"{key}_tokens_per_s"] = tokens / statistics.median(times["tinymm"])
        if twin is not None:
            out[f"torch_{key}_tokens_per_s"] = tokens / statistics.median(times["torch"])
            ratios = [b / a for a, b in zip(times["tinymm"], times["torch"], strict=True)]
            out[f"ratio_{key}_tokens_per_s"] = statistics.median(ratios)
    return out


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU, cores, load average, NumPy and BLAS: what the numbers depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 1,
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "blas": blas_info(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "unset"),
        "tinymm_threads": parallel.threads(),
    }


def _threads_used(info: dict[str, Any]) -> int:
    """How many threads tinymm computes on: its own split, or BLAS's, whichever is more."""
    return max(info["tinymm_threads"], info["blas"]["threads"] or 1)


def table(r: dict[str, float], info: dict[str, Any]) -> str:
    """The results as a readable table: tinymm, torch (if run) and tinymm/torch per item."""
    blas = info["blas"]
    lines = [
        f"tinymm bench ({info['mode']}), {info['seconds']:.0f} s",
        f"machine: {info['cpu']}, {info['cores']} cores, load average (1 min) "
        f"{info['load']:.1f} at start, {info['load_end']:.1f} at end",
        f"numpy {info['numpy']}, python {info['python']}, BLAS {blas['name']} {blas['version']} "
        f"({blas.get('arch') or '?'} kernels), {blas['threads']} threads, "
        f"OPENBLAS_NUM_THREADS={info['openblas_num_threads']}, "
        f"OPENBLAS_CORETYPE={info['openblas_coretype']}; tinymm.parallel: "
        f"{info['tinymm_threads']} threads",
    ]
    if "torch" in info:
        lines.append(f"torch {info['torch']}, its default {info['torch_threads']} threads")
    if max(info["load"], info["load_end"]) > info["cores"] and _threads_used(info) > 1:
        lines.append(
            "note: the machine is busy (load > cores): threads wait for cores (torch's and BLAS's "
            "more than tinymm's); compare with TINYMM_THREADS=1"
        )
    has_torch = "ratio_vit_step" in r
    header = f"{'':44}{'tinymm':>14}" + (f"{'torch':>14}{'tinymm/torch':>14}" if has_torch else "")
    lines += ["", header, "-" * len(header)]

    def row(
        label: str,
        key: str,
        unit: str,
        fmt: str = ".1f",
        ratio: str | None = None,
        torch_key: str | None = None,
    ) -> None:
        cell = lambda value: f"{value:{fmt}} {unit}".strip().rjust(14)  # noqa: E731
        torch_key = torch_key or f"torch_{key}"
        text = f"{label:44}{cell(r[key]) if torch_key == f'torch_{key}' else ' ' * 14}"
        if has_torch and torch_key in r:
            text += cell(r[torch_key])
            if ratio:
                text += f"{r[ratio]:>14.2f}"
        lines.append(text)

    for n in (256, 512, 1024):
        row(f"1. BLAS float32 GEMM {n}x{n}", f"blas_gflops_{n}", "GFLOP/s")
    row("   BLAS peak (best of the three)", "blas_peak_gflops", "GFLOP/s")
    row(
        f"2. overhead per node, fwd+bwd ({CHAIN_LENGTH} nodes)",
        "node_us",
        "us",
        ".2f",
        "ratio_node",
    )
    row(
        "   tiny ViT training step (dim 8, batch 2)", "tiny_step_ms", "ms", ".2f", "ratio_tiny_step"
    )
    row("3. ViT training step (batch 64, dim 64)", "vit_step_ms", "ms", ".1f", "ratio_vit_step")
    mha = "   (torch with nn.MultiheadAttention)"
    row(mha, "vit_step_ms", "ms", ".1f", "ratio_vit_step_mha", "torch_vit_step_mha_ms")
    row("   batch 32, dim 96", "vit_wide_step_ms", "ms", ".1f", "ratio_vit_wide_step")
    row(
        mha,
        "vit_wide_step_ms",
        "ms",
        ".1f",
        "ratio_vit_wide_step_mha",
        "torch_vit_wide_step_mha_ms",
    )
    row(f"   achieved, of {r['vit_step_gflop']:.2f} GFLOP/step", "vit_gflops", "GFLOP/s")
    row("   fraction of BLAS peak", "vit_peak_fraction", "", ".3f")
    row("   graph nodes (forward + loss)", "vit_graph_nodes", "", ".0f")
    row("4. conv2d 3x3 32->32, 32x32, batch 32, f+b", "conv_ms", "ms", ".1f", "ratio_conv")
    row("   achieved", "conv_gflops", "GFLOP/s")
    row("5. attention f+b, (64, 4, 65, 16)", "attention_ms", "ms", ".2f", "ratio_attention")
    unet_batch = QUICK_UNET_BATCH if r["quick"] else UNET_BATCH
    row(f"6. U-Net training step (lesson 05, batch {unet_batch})", "unet_step_ms", "ms", ".1f",
        "ratio_unet_step")  # fmt: skip
    if has_torch:
        lines.append(f"   |loss difference|, first step{r['unet_loss_diff']:>28.1e}")
    setup = QUICK_DECODE if r["quick"] else DECODE
    for batch, key in zip(setup["batches"], ("decode", "decode_b1"), strict=True):
        label = f"7. greedy decoding, {setup['new_tokens']} tokens, batch {batch}"
        row(label if key == "decode" else f"   batch {batch}", f"{key}_tokens_per_s", "tok/s",
            ".0f", f"ratio_{key}_tokens_per_s")  # fmt: skip
    if has_torch:
        same = min(r["decode_same_tokens"], r["decode_b1_same_tokens"])
        lines.append(f"   same greedy tokens in both (fraction){same:>21.3f}")
        lines.append("tinymm/torch: median of paired block ratios; < 1 means tinymm is faster,")
        lines.append("except for tokens/s (7.), where > 1 means tinymm is faster")
    return "\n".join(lines)


def run(quick: bool = False, torch: Any = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Measure every item; returns (result dict, machine info)."""
    start = time.perf_counter()
    cfg = QUICK if quick else FULL
    info = machine()
    info["mode"] = "quick" if quick else "full"
    if torch is not None:  # torch keeps its own default threads, for the whole run
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    r = bench_blas(cfg)
    r |= bench_overhead(cfg, torch)
    r |= bench_vit(cfg, r["blas_peak_gflops"], torch)
    r |= bench_conv(cfg, torch)
    r |= bench_attention(cfg, torch)
    r |= bench_unet(cfg, quick, torch)
    r |= bench_decode(cfg, quick, torch)
    info["load_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info["seconds"] = time.perf_counter() - start
    r |= {
        "blas_threads": info["blas"]["threads"],
        "tinymm_threads": info["tinymm_threads"],
        "cores": info["cores"],
        "load_avg_start": info["load"],
        "load_avg_end": info["load_end"],
        "quick": int(quick),
        "seconds": info["seconds"],
    }
    return r, info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tinymm.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter blocks (< 1 minute)")
    parser.add_argument("--torch", action="store_true", help="also time PyTorch CPU, alternately")
    parser.add_argument("--json", metavar="PATH", help="also write the result dict to PATH")
    args = parser.parse_args(argv)
    changed = runtime.tune()  # the settings a training run uses (tinymm/runtime.py)
    if changed:
        print(f"runtime.tune(): {runtime.describe(changed)}")
    torch = None
    if args.torch:
        try:
            import torch
        except ImportError:
            print("--torch: PyTorch is not importable; measuring tinymm alone", file=sys.stderr)
    results, info = run(args.quick, torch)
    print(table(results, info))
    results = {key: round(value, 6) for key, value in results.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("result: " + json.dumps(results))


if __name__ == "__main__":
    main()
