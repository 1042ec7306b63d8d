"""A text transformer: token + learned position embeddings, causal pre-norm blocks, final norm.

The text tower of CLIP and the decoder of a small language model are this same stack:

    Z_text = E_tok[ids] + E_pos[:L]                  (N, L) -> (N, L, D)
    Z = block_l(Z, causal)  for l = 1..depth         token i may attend only to tokens <= i
    Z = LayerNorm(Z)

With causal=False every token attends to the whole text (an encoder, as BERT or the XLM-R text
encoder of Kandinsky 2): a word's state then also knows the words after it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import nn
from ..nn.attention import run_blocks
from ..tensor import DEFAULT_DTYPE, Tensor, default_rng

MLP_ACTIVATION = "gelu_tanh"  # GELU, tanh approximation (as GPT-2): faster here; see nn.MLP


class TextTransformer(nn.Module):
    """Causal (default) or bidirectional transformer over token ids (N, L) -> token states
    (N, L, dim).

    embedding_std: the token embeddings start as N(0, embedding_std^2); 0.02 as GPT-2 and CLIP,
    whose losses train the embeddings directly. An encoder trained only through another
    model's attention (lesson 05's, through the U-Net) needs words that stand out from what
    the blocks add at the start: 1.0 there (PyTorch's nn.Embedding default)."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4,
        causal: bool = True,
        embedding_std: float = 0.02,
    ):
        super().__init__()
        self.vocab_size, self.max_len, self.dim, self.causal = vocab_size, max_len, dim, causal
        self.token_embedding = nn.Embedding(vocab_size, dim)
        if not embedding_std > 0:
            raise ValueError(f"embedding_std must be > 0, got {embedding_std}")
        self.token_embedding.weight.data[...] = embedding_std * default_rng().standard_normal(
            (vocab_size, dim)
        )
        self.pos_embedding = nn.Parameter(
            (0.02 * default_rng().standard_normal((max_len, dim))).astype(DEFAULT_DTYPE)
        )
        self.blocks = nn.ModuleList(
            nn.TransformerBlock(dim, heads, mlp_ratio, activation=MLP_ACTIVATION)
            for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(dim)

    def encode(self, ids: np.ndarray, return_weights: bool = False, mask: Any = None) -> Any:
        """Every token's final state (N, L, dim); with return_weights also the attention
        weights of every block, stacked (depth, N, heads, L, L). mask (N, L) bool, True = a real
        token: padding is then never attended (a causal text needs none when padded on the
        right, as its real tokens never look right)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be (N, L) token ids, got shape {ids.shape}")
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of length {length} is longer than max_len {self.max_len}")
        x = self.token_embedding(ids) + self.pos_embedding[:length]
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != ids.shape:
                raise ValueError(f"mask must have the shape of ids {ids.shape}, got {mask.shape}")
            mask = mask[:, None, None, :]  # (N, 1, 1, L): every query, every head
        x = run_blocks(self.blocks, x, causal=self.causal, return_weights=return_weights, mask=mask)
        x, weights = x if return_weights else (x, None)
        x = self.ln_final(x)
        return (x, weights) if return_weights else x

    def forward(self, ids: np.ndarray, eos_positions: np.ndarray) -> Tensor:
        """The state at each sequence's [EOS] token (N, dim): causal attention makes it a
        summary of the whole text before it, as CLIP's text tower."""
        states = self.encode(ids)
        n, length = states.shape[:2]
        eos = np.asarray(eos_positions)
        if eos.shape != (n,) or not np.issubdtype(eos.dtype, np.integer):
            raise ValueError(
                f"eos_positions must be (N,) = ({n},) integer positions, got shape {eos.shape} "
                f"of {eos.dtype}"
            )
        if eos.size and (eos.min() < 0 or eos.max() >= length):  # (-1 would wrap around)
            raise IndexError(
                f"eos_positions must lie in [0, {length}) for ids of length {length}, got "
                f"{eos.min()}..{eos.max()}"
            )
        return states[np.arange(n), eos]
