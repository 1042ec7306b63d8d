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
6. With `--torch` (PyTorch is optional and imported only then): the same items 2-5 in PyTorch
   CPU as `torch_*`, and `ratio_*` = tinymm time / torch time, the median over pairs of
   neighbouring blocks. **ratio < 1: tinymm is faster; ratio > 1: tinymm is slower.**
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
from .models import ViT
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
    num_classes: int,
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
            self.head = MLP(dim, dim, num_classes)

        def forward(self, images: Any) -> Any:
            n, h, w, c = images.shape  # (N, H, W, C) -> (N, N_p, P*P*C), as F.patchify
            p = patch_size
            x = images.reshape(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
            z = self.patch_embedding(x.reshape(n, -1, p * p * c))
            z = torch.cat([self.cls_token.expand(n, 1, dim), z], dim=1) + self.pos_embedding
            for block in self.blocks:
                z = block(z)
            return self.head(self.ln_final(z)[:, 0])

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
        f"({blas.get('arch') or '?'}), {blas['threads']} threads, "
        f"OPENBLAS_NUM_THREADS={info['openblas_num_threads']}; tinymm.parallel: "
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
    if has_torch:
        lines.append("tinymm/torch: median of paired block ratios; < 1 means tinymm is faster")
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
