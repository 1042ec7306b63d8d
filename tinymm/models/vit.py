"""Vision Transformer (ViT): an image becomes a sequence of patch tokens, then a transformer.

Following the lecture, for an image X in R^{H x W x C} and a patch size P:

1. Split X into N = (H/P) (W/P) patches x_p of P x P pixels, numbered row by row.
2. Flatten each patch to a vector x_p in R^{P^2 C}, in (row, column, channel) order
   (as the ViT paper):                                                   F.patchify
3. Linear projection of every patch to a token:
       z_p = x_p E,   E in R^{(P^2 C) x D}                               patch_embedding
   (the same as a convolution with kernel = stride = P: each output pixel is one patch).
4. Prepend a learnable [CLS] token:  Z = [z_cls; z_1; z_2; ...; z_N]     cls_token
5. Add a learnable positional embedding, one vector per position:
       Z = Z + E_pos,   E_pos in R^{(N+1) x D}                           pos_embedding
   Attention itself ignores order; E_pos is the only thing that tells the model where a
   patch was. It starts random and has to *learn* the 2-D grid.
6-7. L pre-norm transformer blocks; in each, Q = Z W^Q, K = Z W^K, V = Z W^V and
       attn(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V                     nn.TransformerBlock
   every token (the [CLS] among them) attends to every token; then a final LayerNorm.
M. Classify from the [CLS] token's last state:  y~ = MLP(z_cls^L)       head
M+1. Cross entropy against the label (F.cross_entropy, in the lesson).

Shapes: images (N, H, W, C) -> patches (N, N_p, P^2 C) -> tokens (N, 1 + N_p, D) -> logits
(N, num_classes). `encode` returns all tokens: CLIP (lesson 03) uses the [CLS] token, a VLM
(lesson 04) the patch tokens; the audio lesson feeds a spectrogram as a 1-channel image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import functional as F
from .. import nn
from ..nn.attention import run_blocks
from ..tensor import DEFAULT_DTYPE, Tensor, concatenate, default_rng

MLP_ACTIVATION = "gelu_tanh"  # GELU, tanh approximation (as GPT-2): faster here; see nn.MLP


class ViT(nn.Module):
    """Vision Transformer over channels-last images (N, H, W, C).

    image_size: H = W, or (H, W) for non-square inputs such as spectrograms (n_mels, frames).
    patch_size: P, which must divide both H and W. num_classes=None: no head (encoder only).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        patch_size: int,
        channels: int = 3,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4,
        num_classes: int | None = None,
    ):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        p = patch_size
        if p < 1 or h % p or w % p:
            raise ValueError(
                f"ViT: patch size {p} does not divide the image size {h}x{w} "
                f"({h} % {p} = {h % p if p else '-'}, {w} % {p} = {w % p if p else '-'})"
            )
        self.image_size, self.patch_size, self.channels, self.dim = (h, w), p, channels, dim
        self.grid = (h // p, w // p)  # patches per column, per row
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embedding = nn.Linear(p * p * channels, dim)  # E: (P^2 C) x D
        self.cls_token = nn.Parameter(_normal((1, 1, dim)))  # z_cls
        self.pos_embedding = nn.Parameter(_normal((self.num_patches + 1, dim)))  # E_pos
        self.blocks = nn.ModuleList(
            nn.TransformerBlock(dim, heads, mlp_ratio, activation=MLP_ACTIVATION)
            for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(dim)
        self.head = nn.MLP(dim, dim, num_classes, MLP_ACTIVATION) if num_classes else None
        self.num_classes = num_classes

    def encode(self, images: Any, return_weights: bool = False) -> Any:
        """All token states after the final norm (N, 1 + N_p, D); token 0 is [CLS], then the
        patches row by row. With return_weights also every block's attention weights,
        stacked (depth, N, heads, 1 + N_p, 1 + N_p), for figures."""
        images = images if isinstance(images, Tensor) else Tensor(images)
        expected = (*self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"ViT expects images of shape (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images.shape)}"
            )
        patches = F.patchify(images, self.patch_size)  # (N, H, W, C) -> (N, N_p, P^2 C)
        z = self.patch_embedding(patches)  # (N, N_p, D): z_p = x_p E
        n = z.shape[0]
        cls = self.cls_token.broadcast_to((n, 1, self.dim))
        z = concatenate([cls, z], axis=1) + self.pos_embedding  # (N, 1 + N_p, D)
        z = run_blocks(self.blocks, z, return_weights=return_weights)
        z, weights = z if return_weights else (z, None)
        z = self.ln_final(z)
        return (z, weights) if return_weights else z

    def forward(self, images: Any) -> Tensor:
        """Class logits (N, num_classes) from the [CLS] token: y~ = MLP(z_cls^L)."""
        if self.head is None:
            raise RuntimeError("ViT was built with num_classes=None: use encode() for tokens")
        return self.head(self.encode(images)[:, 0])

    def extra_repr(self) -> str:
        h, w = self.image_size
        return (
            f"image {h}x{w}x{self.channels}, patch {self.patch_size} -> "
            f"{self.grid[0]}x{self.grid[1]} = {self.num_patches} patches, dim={self.dim}"
        )


def _normal(shape: tuple[int, ...], std: float = 0.02) -> np.ndarray:
    """N(0, std^2) initial values, as the ViT paper's [CLS] token and position embeddings."""
    return (std * default_rng().standard_normal(shape)).astype(DEFAULT_DTYPE)


def attention_rollout(weights: np.ndarray, residual: float = 0.5) -> np.ndarray:
    """How much each input token flows into each output token through all layers
    (Abnar & Zuidema, 2020): average the heads, add the residual path, multiply the layers.

        A_l = residual * I + (1 - residual) * mean_heads(W_l),  rows renormalised to sum to 1
        R = A_L ... A_2 A_1

    weights (depth, N, heads, L, L) as `ViT.encode(..., return_weights=True)` gives ->
    R (N, L, L), rows summing to 1; R[:, 0, 1:] is the [CLS] token's view of the patches.
    """
    w = np.asarray(weights, dtype=np.float64).mean(axis=2)  # (depth, N, L, L)
    eye = np.eye(w.shape[-1])
    rollout = np.broadcast_to(eye, w.shape[1:]).copy()
    for layer in w:
        a = residual * eye + (1 - residual) * layer
        a /= a.sum(axis=-1, keepdims=True)
        rollout = a @ rollout
    return rollout
