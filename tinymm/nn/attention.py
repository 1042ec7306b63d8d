"""Multi-head attention and the pre-norm transformer block.

Each token has three representations, as a query, a key and a value (the lecture's recap):

    Q = X W^Q,  K = C W^K,  V = C W^V        (C = X for self-attention, the context otherwise)
    attn(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V        per head, d_k = dim / heads

Cross-attention (queries from x, keys and values from a context) is how a VLM's text looks at
image tokens and how a diffusion U-Net looks at the text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import functional as F
from ..tensor import Tensor, concatenate
from .layers import MLP, Dropout, LayerNorm, Linear, check_sizes
from .module import Module


class MultiHeadAttention(Module):
    """Self- or cross-attention with `heads` heads over sequences (N, L, dim).

    As PyTorch's nn.MultiheadAttention with batch_first=True (PyTorch's default is (L, N, dim));
    a boolean mask means True = may attend, the opposite of PyTorch's attn_mask convention for
    booleans (where True = masked out); `causal=True` is its is_causal.

    context_dim: the width of a cross-attention context when it differs from dim (e.g. text
    tokens of width 64 read by image features of width 128); k_proj and v_proj map it to dim.

    Self-attention takes Q, K and V from one product, X [W^Q | W^K | W^V], and hands the heads
    to F.multi_head_attention (PyTorch packs them the same way, in in_proj_weight); the three
    projections stay separate parameters (q_proj, k_proj, v_proj), as cross-attention uses them.
    """

    def __init__(self, dim: int, heads: int, bias: bool = True, context_dim: int | None = None):
        super().__init__()
        check_sizes("MultiHeadAttention", dim=dim, heads=heads)
        if dim % heads:
            raise ValueError(f"MultiHeadAttention: dim {dim} is not divisible by heads {heads}")
        if context_dim is not None and context_dim < 1:
            raise ValueError(f"MultiHeadAttention: context_dim must be >= 1, got {context_dim}")
        self.dim, self.heads = dim, heads
        self.context_dim = dim if context_dim is None else context_dim
        self.q_proj = Linear(dim, dim, bias)
        self.k_proj = Linear(self.context_dim, dim, bias)
        self.v_proj = Linear(self.context_dim, dim, bias)
        self.out_proj = Linear(dim, dim, bias)

    def _split(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape  # (N, L, D) -> (N, heads, L, D/heads)
        return x.reshape(n, length, self.heads, self.dim // self.heads).transpose(0, 2, 1, 3)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Any = None,
        causal: bool = False,
        return_weights: bool = False,
    ) -> Any:
        """x (N, L_q, dim), context (N, L_k, context_dim) or None, mask broadcastable to
        (N, heads, L_q, L_k) with True = may attend. Returns (N, L_q, dim), and with
        return_weights the attention weights (N, heads, L_q, L_k)."""
        source = x if context is None else context
        for name, t, width in (("x", x, self.dim), ("context", source, self.context_dim)):
            shape = np.shape(t)
            if context is None and name == "context":
                continue  # self-attention: the context is x
            if len(shape) != 3 or shape[-1] != width:
                raise ValueError(
                    f"MultiHeadAttention(dim={self.dim}, context_dim={self.context_dim}): "
                    f"{name} must be (N, L, {width}), got shape {shape}"
                )
        if context is None:  # self-attention: Q, K, V from one product X [W^Q | W^K | W^V]
            qkv = F.linear(x, *self._packed_projections())
            out = F.multi_head_attention(qkv, self.heads, mask, causal, return_weights)
            out, weights = out if return_weights else (out, None)
        else:
            q = self._split(self.q_proj(x))
            k = self._split(self.k_proj(source))
            v = self._split(self.v_proj(source))
            out = F.scaled_dot_product_attention(
                q, k, v, mask=mask, causal=causal, return_weights=return_weights
            )
            out, weights = out if return_weights else (out, None)
            n, _, length, _ = out.shape  # (N, heads, L, D/heads) -> (N, L, D)
            out = out.transpose(0, 2, 1, 3).reshape(n, length, self.dim)
        out = self.out_proj(out)
        return (out, weights) if return_weights else out

    def _packed_projections(self) -> tuple[Tensor, Tensor | None]:
        """[W^Q | W^K | W^V] (dim, 3 dim) and the three biases side by side: the same three
        projections as one product (one GEMM for the three, and one gradient back to x)."""
        layers = (self.q_proj, self.k_proj, self.v_proj)
        weight = concatenate([layer.weight for layer in layers], axis=1)
        if self.q_proj.bias is None:
            return weight, None
        return weight, concatenate([layer.bias for layer in layers], axis=0)

    def extra_repr(self) -> str:
        extra = f", context_dim={self.context_dim}" if self.context_dim != self.dim else ""
        return f"dim={self.dim}, heads={self.heads}{extra}"


class TransformerBlock(Module):
    """Pre-norm block: x = x + attn(ln1(x)); x = x + mlp(ln2(x)).

    activation: the MLP's ("gelu", exact, by default; "gelu_tanh" is the faster approximation
    GPT-2 uses, and what tinymm's ViT and text transformer use)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
        activation: str = "gelu",
    ):
        super().__init__()
        self.ln1 = LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.ln2 = LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), activation=activation)
        self.dropout = Dropout(dropout)

    def forward(
        self, x: Tensor, mask: Any = None, causal: bool = False, return_weights: bool = False
    ) -> Any:
        """x (N, L, dim) -> (N, L, dim); with return_weights also the attention weights."""
        h = self.attn(self.ln1(x), mask=mask, causal=causal, return_weights=return_weights)
        h, weights = h if return_weights else (h, None)
        x = x + self.dropout(h)
        x = x + self.dropout(self.mlp(self.ln2(x)))
        return (x, weights) if return_weights else x


def run_blocks(
    blocks: Any, x: Tensor, causal: bool = False, return_weights: bool = False, mask: Any = None
) -> Any:
    """x through each transformer block in turn: (N, L, dim) -> (N, L, dim); mask (broadcast to
    (N, heads, L, L), True = may attend) as the blocks take it. With return_weights also every
    block's attention weights, stacked (depth, N, heads, L, L), for figures."""
    weights = []
    for block in blocks:
        x = block(x, mask=mask, causal=causal, return_weights=return_weights)
        if return_weights:
            x, w = x
            weights.append(w.data)
    return (x, np.stack(weights)) if return_weights else x
