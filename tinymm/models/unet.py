"""The denoiser of text-to-image diffusion: a small U-Net with text cross-attention.

The lecture: "U-net convolves and then up-samples the images (to make one denoising step). Some
layers may include Attention. For example, consider layer output as Queries and take text token
Keys and Values to 'condition' images on text." One call of the U-Net is one denoising step: it
reads the noisy picture x_t, the step t and the text, and predicts the noise eps in x_t.

    x_t (N, H, W, C_in) + (row, column)                                    eps (N, H, W, C_in)
      |                                                                      ^
    conv_in                                                               conv_out
      |                                                                      |
    [ResBlock, CrossAttn]  -------------- concat (skip) ------------->  [ResBlock, CrossAttn]
      |  H x W                                                               ^  H x W
    down: conv 3x3 stride 2                                   up: nearest x2, conv 3x3
      v                                                                      |
    [ResBlock, CrossAttn]  -------------- concat (skip) ------------->  [ResBlock, CrossAttn]
      |  H/2 x W/2                                                           ^  H/2 x W/2
      +----------->  middle: ResBlock, CrossAttn, ResBlock  -----------------+
                                        (one row per entry of `channels`; CrossAttn where
                                         `attention` says so, at the low resolutions)

- Timestep: t -> sinusoid (as a transformer's positions) -> MLP -> emb (N, E)
      sin/cos(t / 10000^(2i / d))                                      timestep_embedding
- ResBlock ("convolves"): h = conv(SiLU(GN(x))); h += Linear(SiLU(emb)) per channel (the step
  enters every block); h = conv(SiLU(GN(h))); out = skip(x) + h                       ResBlock
- CrossAttention ("layer output as Queries, text token Keys and Values"): the H*W positions
  are tokens, Q = (GN(h) + P W^P) W^Q with P the Fourier features of each position's place,
  K = text W^K, V = text W^V, softmax(QK^T/sqrt(d)) V, residual:
      h <- h + reshape(attn(Q, K, V))                                          CrossAttention
- Where am I: convolutions see only a neighbourhood and attention has no order, so "in the
  top left" would have nothing to attach to. Two input channels hold each pixel's (row, column)
  in [-1, 1] (CoordConv, `coordinates`), and every cross-attention query adds its place
  (`position_features`). (Lesson 05 measured that these alone did not make position follow
  the caption: its text encoder's words had to start larger; see the lesson's docstring.)
- Down-sampling: a stride-2 3x3 convolution; up-sampling ("then up-samples"): nearest x2 then a
  3x3 convolution; the skips carry the fine detail across the U by concatenation.

Shapes: x (N, H, W, C_in) channels-last, H and W divisible by 2^(levels - 1); t (N,) ints;
context (N, L, context_dim) text token states; context_mask (N, L) bool, True = a real token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import functional as F
from .. import nn
from ..tensor import Tensor, concatenate


def timestep_embedding(t: Any, dim: int, max_period: float = 10_000.0) -> np.ndarray:
    """Sinusoidal embedding of integer steps t (N,) -> (N, dim) float64:
    [cos(t w_0) .. cos(t w_{d/2-1}), sin(t w_0) .. sin(t w_{d/2-1})], w_i = max_period^(-2i/d)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"timestep_embedding: dim must be even and >= 2, got {dim}")
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    freqs = max_period ** (-np.arange(dim // 2) / (dim // 2))  # (d/2,)
    angles = t[:, None] * freqs[None, :]  # (N, d/2)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1)


class ResBlock(nn.Module):
    """x (N, H, W, C_in), emb (N, E) -> (N, H, W, C_out): two GN-SiLU-conv with the step
    embedding added in between, plus a (1x1-conv) skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(groups, out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, None, None, :]  # (N, C) -> (N, 1, 1, C)
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class CrossAttention(nn.Module):
    """Image features read the text: queries from the H*W positions, keys and values from the
    text tokens, residual. x (N, H, W, C), context (N, L, D_text) -> (N, H, W, C).

    Each query also carries where it is (a learned projection of `position_features`, as a
    ViT's position embedding), so a position can look for the words that name its place."""

    def __init__(
        self, channels: int, context_dim: int, heads: int, groups: int, frequencies: int = 4
    ):
        super().__init__()
        self.frequencies = frequencies
        self.norm = nn.GroupNorm(_groups(groups, channels), channels)
        self.pos_proj = nn.Linear(4 * frequencies, channels)  # where each query sits
        self.attn = nn.MultiHeadAttention(channels, heads, context_dim=context_dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        context_mask: np.ndarray | None = None,
        return_weights: bool = False,
    ) -> Any:
        n, h, w, c = x.shape
        queries = self.norm(x).reshape(n, h * w, c)  # (N, H, W, C) -> (N, HW, C): positions
        where = position_features(h, w, self.frequencies).astype(x.dtype)  # (HW, 4F)
        queries = queries + self.pos_proj(Tensor(where))  # (HW, C), the same for every image
        mask = None if context_mask is None else np.asarray(context_mask)[:, None, None, :]
        out = self.attn(queries, context, mask=mask, return_weights=return_weights)
        out, weights = out if return_weights else (out, None)  # weights (N, heads, HW, L)
        x = x + out.reshape(n, h, w, c)
        return (x, weights) if return_weights else x


class Downsample(nn.Module):
    """A 3x3 convolution with stride 2: (N, H, W, C) -> (N, H/2, W/2, C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution: (N, H, W, C) -> (N, 2H, 2W, C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.upsample_nearest2d(x, 2))


class UNet(nn.Module):
    """eps_theta(x_t, t, text): the noise in x_t, same shape as x_t.

    channels: width per resolution level, e.g. (64, 128) for H x W and H/2 x W/2.
    attention: per level, whether its blocks cross-attend to the text (the middle always does).
    """

    def __init__(
        self,
        in_channels: int,
        context_dim: int,
        channels: Sequence[int] = (64, 128),
        attention: Sequence[bool] = (True, True),
        heads: int = 4,
        groups: int = 8,
        emb_dim: int | None = None,
    ):
        super().__init__()
        channels, attention = tuple(channels), tuple(attention)
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"UNet: channels must be positive widths, got {channels}")
        if len(attention) != len(channels):
            raise ValueError(
                f"UNet: attention needs one flag per level ({len(channels)}), got {attention}"
            )
        for c in channels:
            if c % heads:
                raise ValueError(f"UNet: width {c} is not divisible by heads {heads}")
        self.in_channels, self.context_dim = in_channels, context_dim
        self.channels, self.attention = channels, attention
        self.emb_dim = emb_dim or 4 * channels[0]
        self.time_mlp = nn.MLP(channels[0], self.emb_dim, self.emb_dim, activation="silu")
        self.conv_in = nn.Conv2d(in_channels + 2, channels[0], 3, padding=1)  # + (row, column)

        def attn(c: int, on: bool) -> nn.Module | None:
            return CrossAttention(c, context_dim, heads, groups) if on else None

        widths = (channels[0],) + channels  # the width entering level l is widths[l]
        self.down_blocks = nn.ModuleList(
            ResBlock(widths[i], c, self.emb_dim, groups) for i, c in enumerate(channels)
        )
        self.down_attn = [attn(c, on) for c, on in zip(channels, attention, strict=True)]
        self.downs = nn.ModuleList(Downsample(c) for c in channels[:-1])
        mid = channels[-1]
        self.mid_block1 = ResBlock(mid, mid, self.emb_dim, groups)
        self.mid_attn = CrossAttention(mid, context_dim, heads, groups)
        self.mid_block2 = ResBlock(mid, mid, self.emb_dim, groups)
        # going up, level l reads [h (width of level l+1, or mid), skip (width of level l)]
        ins = [
            (channels[i + 1] if i + 1 < len(channels) else mid) + c for i, c in enumerate(channels)
        ]
        self.up_blocks = nn.ModuleList(
            ResBlock(ins[i], c, self.emb_dim, groups) for i, c in enumerate(channels)
        )
        self.up_attn = [attn(c, on) for c, on in zip(channels, attention, strict=True)]
        self.ups = nn.ModuleList(Upsample(c) for c in channels[1:])  # level l+1 -> level l
        self.norm_out = nn.GroupNorm(_groups(groups, channels[0]), channels[0])
        self.conv_out = nn.Conv2d(channels[0], in_channels, 3, padding=1)
        self.conv_out.weight.data[...] = 0  # starts by predicting eps = 0
        self.conv_out.bias.data[...] = 0
        for i, (d, u) in enumerate(zip(self.down_attn, self.up_attn, strict=True)):
            if d is not None:  # registered under readable names; None levels have none
                setattr(self, f"down_attn_{i}", d)
                setattr(self, f"up_attn_{i}", u)

    def forward(
        self,
        x: Any,
        t: Any,
        context: Any,
        context_mask: np.ndarray | None = None,
        return_weights: bool = False,
    ) -> Any:
        """eps (N, H, W, C_in); with return_weights also {name: cross-attention weights
        (N, heads, H_l W_l, L)} of every cross-attention block."""
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
        n, height, width, _ = x.shape
        if x.ndim != 4 or x.shape[3] != self.in_channels:
            raise ValueError(f"UNet: x must be (N, H, W, {self.in_channels}), got {x.shape}")
        side = 2 ** (len(self.channels) - 1)
        if height % side or width % side:
            raise ValueError(f"UNet: H and W must be divisible by {side}, got {height}x{width}")
        t = np.asarray(t).reshape(-1)
        if len(t) != n:
            raise ValueError(f"UNet: t has {len(t)} steps for {n} images")
        context = context if isinstance(context, Tensor) else Tensor(np.asarray(context))
        if context.ndim != 3 or context.shape[0] != n or context.shape[2] != self.context_dim:
            raise ValueError(
                f"UNet: context must be (N={n}, L, {self.context_dim}), got {context.shape}"
            )
        weights: dict[str, np.ndarray] = {}

        def cross(block: CrossAttention | None, h: Tensor, name: str) -> Tensor:
            if block is None:
                return h
            out = block(h, context, context_mask, return_weights=return_weights)
            if return_weights:
                out, w = out
                weights[name] = w.data
            return out

        sinusoid = timestep_embedding(t, self.channels[0]).astype(x.dtype)
        emb = self.time_mlp(Tensor(sinusoid))  # (N, E)
        h = self.conv_in(concatenate([x, Tensor(coordinates(n, height, width, x.dtype))], -1))
        skips = []
        for level, block in enumerate(self.down_blocks):
            h = cross(self.down_attn[level], block(h, emb), f"down {level}")
            skips.append(h)
            if level < len(self.downs):
                h = self.downs[level](h)
        h = self.mid_block1(h, emb)
        h = cross(self.mid_attn, h, "middle")
        h = self.mid_block2(h, emb)
        for level in reversed(range(len(self.channels))):
            h = concatenate([h, skips[level]], axis=-1)  # the skip connection
            h = cross(self.up_attn[level], self.up_blocks[level](h, emb), f"up {level}")
            if level > 0:
                h = self.ups[level - 1](h)
        eps = self.conv_out(F.silu(self.norm_out(h)))
        return (eps, weights) if return_weights else eps

    def extra_repr(self) -> str:
        return f"channels={self.channels}, attention={self.attention}"


def coordinates(n: int, height: int, width: int, dtype: Any = np.float32) -> np.ndarray:
    """Each pixel's (row, column) in [-1, 1], (N, H, W, 2): the input channels that tell every
    position where it is (CoordConv), so that "top left" can be drawn at the top left."""
    rows, cols = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    return np.broadcast_to(np.stack([rows, cols], -1), (n, height, width, 2)).astype(dtype)


def position_features(height: int, width: int, frequencies: int = 4) -> np.ndarray:
    """Fourier features of each position's (row, column) r, c in [-1, 1], row by row:
    [sin(pi/2 k r), cos(pi/2 k r) for k = 1..F, then the same of c] -> (H W, 4F) float64."""
    grid = coordinates(1, height, width, np.float64)[0].reshape(-1, 2)  # (HW, 2)
    # pi/2 k, not pi k: at pi k the rows r = -1 and r = 1 would get the same features
    angles = np.pi / 2 * grid[:, :, None] * np.arange(1, frequencies + 1)  # (HW, 2, F)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=2).reshape(len(grid), -1)


def _groups(groups: int, channels: int) -> int:
    """The largest group count <= groups that divides channels (GroupNorm needs one)."""
    return math.gcd(groups, channels)
