"""A Qwen-VL style vision-language model: an image and a question go in, text comes out.

Following the lecture (image-to-text models, Qwen-VL):

1. Patch embeddings of the image from a ViT, projected to the decoder's width D, plus fixed
   2-D sin-cos codes of the patches' places (as Qwen-VL's adapter adds; `sincos_2d`):
       Z_img = ViT(X)[patches] W_proj + P_2d in R^{N x D},  N = number of patches  image_tokens
   (with `vision_ids`, bracketed by the <|vision_start|> / <|vision_end|> token embeddings).
2. Text tokens mapped to embeddings, plus learned positions:
       Z_text = E_tok[ids] + E_pos in R^{L x D}                                 text_tokens
3. Cross-modal fusion, in every decoder block:
       Z_joint = [Z_img, Z_text]
       Q = LN(Z_text) W^Q,  K = LN(Z_joint) W^K,  V = LN(Z_joint) W^V
       Z_text <- Z_text + softmax(Q K^T / sqrt(d_k) + mask) V W^O,  then the block's MLP
   Queries come from the text tokens only, so text tokens "look at" the image (every image key
   is visible) and at the text before them (text keys are causal) while new text is
   generated.                                                                   lecture_fusion
   Only the text states are updated and carried to the next block; Z_img is the same in every
   block (each block has its own W^K, W^V, so it reads the image its own way).
4. The last text states, normalised, give next-token logits: LN(z_t) W_vocab.  forward

The three fusions (`fusion=`), and what each costs per generated token (D wide, depth blocks,
N_p patches, t text tokens so far):

- "lecture": the formula above. The image keys/values of each block are computed once per
  image and cached; a new token attends over N_p + t keys. Image states never go through the
  decoder's MLPs: the cheapest to train.
- "prefix" (LLaVA, nanoVLM): the image tokens join one causal sequence [Z_img, Z_text], and
  every block updates image and text states alike (image tokens see only the image tokens
  before them). Same N_p + t keys per generated token once cached, but training and the first
  (prefill) pass carry N_p more states through every block's attention and MLP, and the image
  states can change from block to block: it differs from the lecture in that the image is also
  a query.
- "resampler" (Qwen-VL's actual adapter): one cross-attention layer in which M learned queries
  read the N_p patch tokens (2-D sin-cos positions added to the queries and to the keys, not to
  the values) and compress them to M tokens, which then enter as a prefix as above. A new token
  attends over M + t keys instead of N_p + t: the point when N_p is large (Qwen-VL: 1024
  patches -> 256 queries). It differs from the lecture in the extra layer and in the prefix.

Decoding (`generate`): with the KV cache each block keeps the keys and values of everything it
has seen, the image's computed once; a new token computes only its own q, k, v and attends over
the cache: O(t) work per token instead of re-running the whole sequence, O(t^2).
Prompts of different lengths are left-padded; padded keys are masked and positions count only
real tokens, so a padded prompt gives the same logits as the prompt alone.

Shapes: images (N, H, W, C), ids (N, L), mask (N, L) bool (True = a real token) ->
logits (N, L, vocab).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import erf

from .. import functional as F
from .. import nn, parallel
from ..kernels import _normal_cdf_and_density, _ones
from ..modes import is_reference_mode
from ..tensor import DEFAULT_DTYPE, Tensor, concatenate, default_rng, no_grad
from .vit import ViT

FUSIONS = ("lecture", "prefix", "resampler")
MLP_ACTIVATION = "gelu_tanh"  # the decoder's GELU: the tanh approximation (GPT-2), half the cost
KVCache = list[tuple[Tensor, Tensor]]  # per block: keys, values (N, heads, L_seen, D/heads)


def joint_mask(n_image: int, text_mask: np.ndarray) -> np.ndarray:
    """Who may attend to whom in the lecture fusion: (N, 1, L, n_image + L) bool.

    Row i is text query i; columns are [image keys | text keys]. Image keys are always
    visible; text key j is visible to query i when j <= i (causal) and j is a real token.
    """
    n, length = text_mask.shape
    causal = np.tril(np.ones((length, length), dtype=bool))  # (L, L)
    text_keys = causal[None] & text_mask[:, None, :]  # (N, L, L)
    image_keys = np.ones((n, length, n_image), dtype=bool)  # (N, L, n_image)
    return np.concatenate([image_keys, text_keys], axis=-1)[:, None]


def lecture_fusion(
    block: nn.TransformerBlock,
    z_img: Tensor,
    z_text: Tensor,
    text_mask: np.ndarray,
    return_weights: bool = False,
) -> Any:
    """The lecture's fusion in one block's attention: Z_joint = [Z_img, Z_text], queries from
    the text only. z_img (N, N_img, D), z_text (N, L, D) -> the update of z_text (N, L, D);
    with return_weights also the weights (N, heads, L, N_img + L)."""
    z_joint = concatenate([z_img, z_text], axis=1)  # (N, N_img + L, D)
    mask = joint_mask(z_img.shape[1], text_mask)
    return block.attn(
        block.ln1(z_text), context=block.ln1(z_joint), mask=mask, return_weights=return_weights
    )


def prefix_mask(n_image: int, text_mask: np.ndarray) -> np.ndarray:
    """Causal mask over one sequence [image tokens, text tokens] with padded text keys hidden:
    (N, 1, n_image + L, n_image + L) bool."""
    n = text_mask.shape[0]
    valid = np.concatenate([np.ones((n, n_image), dtype=bool), text_mask], axis=1)
    total = valid.shape[1]
    return (np.tril(np.ones((total, total), dtype=bool))[None] & valid[:, None, :])[:, None]


def sincos_2d(rows: int, cols: int, dim: int, extent: tuple[float, float]) -> np.ndarray:
    """2-D sin-cos position codes of a rows x cols grid of cell centres spread over `extent`
    (height, width) in patch units, as MAE / Qwen-VL: half the channels code y, half x,
        code(p)_{2i} = sin(p w_i),  code(p)_{2i+1} = cos(p w_i),  w_i = 10000^(-i / (dim / 4)).
    Returns (rows * cols, dim), cells row by row. dim must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    y = (np.arange(rows) + 0.5) * extent[0] / rows
    x = (np.arange(cols) + 0.5) * extent[1] / cols
    yy, xx = (a.reshape(-1) for a in np.meshgrid(y, x, indexing="ij"))
    omega = 10000.0 ** (-np.arange(dim // 4) / (dim // 4))  # (dim / 4,)

    def code(p: np.ndarray) -> np.ndarray:  # (K,) -> (K, dim / 2), sin and cos interleaved
        angle = p[:, None] * omega[None]
        return np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(len(p), -1)

    return np.concatenate([code(yy), code(xx)], axis=1).astype(DEFAULT_DTYPE)


_GELUS = ("gelu", "gelu_tanh")  # the MLP activations `_gelu` computes


def _gelu(x: np.ndarray, mlp: nn.MLP) -> np.ndarray:
    """The MLP's GELU on arrays, as F.gelu: exact x Phi(x), or the tanh approximation.
    Phi = (1 + erf(x / sqrt 2)) / 2 by SciPy's erf for small arrays (one call; a batch of a few
    sequences), as the fused kernel computes it for large ones (in float32 its vectorised
    A&S 7.1.26, faster than SciPy's scalar loop from ~10^4 values on)."""
    if mlp.activation == "gelu" and (x.size <= 8192 or x.dtype != np.float32):
        return x * (0.5 * (1 + erf(x * (1 / math.sqrt(2)))))
    if mlp.activation == "gelu":
        return x * _normal_cdf_and_density(x)[0]
    u = x * x  # x/2 (1 + tanh(c x (1 + 0.044715 x^2))), in place (x**3 is a slow pow())
    u *= math.sqrt(2 / math.pi) * 0.044715
    u += math.sqrt(2 / math.pi)
    u *= x
    np.tanh(u, out=u)
    u += 1
    u *= x
    u *= 0.5
    return u


@functools.lru_cache(maxsize=16)
def _centring(d: int, dtype: np.dtype) -> np.ndarray:
    """C = I - 11^T / d, read-only: x C = x - mean(x) for each row x, in one product."""
    c = np.eye(d, dtype=dtype) - np.asarray(1 / d, dtype)
    c.flags.writeable = False
    return c


def _standardise(x: np.ndarray, eps: float) -> np.ndarray:
    """xhat = (x - mean) / sqrt(var + eps) over the last axis of x (N, D): a layer norm before
    its scale and shift (folded into the product after it). Centring is one product with
    C = I - 11^T / D, the variance a product with a vector of 1/D (faster than np.mean over
    short rows): six NumPy calls, as few as the decoding step of a single sequence can afford
    (each costs ~1 us there)."""
    average = _ones(x.shape[-1], x.dtype, 1 / x.shape[-1])
    centred = x @ _centring(x.shape[-1], x.dtype)
    var = (centred * centred) @ average
    var += eps
    centred /= np.sqrt(var, out=var)[:, None]
    return centred


def _bias(layer: nn.Linear) -> np.ndarray:
    """A linear layer's bias, zeros if it has none."""
    out = layer.weight.shape[1]
    return np.zeros(out, layer.weight.dtype) if layer.bias is None else layer.bias.data


def _room(states: np.ndarray, extra: int) -> np.ndarray:
    """Cached keys or values (N, heads, L, d) copied into a buffer with `extra` more places."""
    n, heads, length, d = states.shape
    buffer = np.empty((n, heads, length + extra, d), states.dtype)
    buffer[:, :, :length] = states
    return buffer


def _heads(x: Tensor, heads: int) -> Tensor:
    n, length, dim = x.shape  # (N, L, D) -> (N, heads, L, D/heads)
    return x.reshape(n, length, heads, dim // heads).transpose(0, 2, 1, 3)


def _merge(x: Tensor) -> Tensor:
    n, heads, length, d = x.shape  # (N, heads, L, D/heads) -> (N, L, D)
    return x.transpose(0, 2, 1, 3).reshape(n, length, heads * d)


class Resampler(nn.Module):
    """Qwen-VL's adapter: M learned queries cross-attend to the patch tokens once.

        Q = (LN(queries) + pos_q) W^Q,  K = (LN(Z_p) + pos_k) W^K,  V = LN(Z_p) W^V
        out = LN(softmax(Q K^T / sqrt(d_k)) V W^O)                 (N, N_p, D) -> (N, M, D)

    pos_q / pos_k: 2-D sin-cos codes of the queries' sqrt(M) x sqrt(M) grid and of the patch
    grid, in the same coordinates (patch units), so query m starts out looking near its cell.
    """

    def __init__(self, dim: int, heads: int, num_queries: int, grid: tuple[int, int]):
        super().__init__()
        side = math.isqrt(num_queries)
        if num_queries < 1 or side * side != num_queries:
            raise ValueError(f"Resampler: num_queries must be a square number, got {num_queries}")
        self.num_queries = num_queries
        rng = default_rng()
        self.queries = nn.Parameter(
            (0.02 * rng.standard_normal((num_queries, dim))).astype(DEFAULT_DTYPE)
        )
        self.ln_q, self.ln_kv, self.ln_post = (
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
        )
        self.attn = nn.MultiHeadAttention(dim, heads)
        self.pos_q = sincos_2d(side, side, dim, grid)  # (M, D), constant
        self.pos_k = sincos_2d(*grid, dim, grid)  # (N_p, D), constant

    def forward(self, patches: Tensor, return_weights: bool = False) -> Any:
        """patches (N, N_p, D) -> (N, M, D); with return_weights also (N, heads, M, N_p)."""
        n = patches.shape[0]
        kv = self.ln_kv(patches)
        q = (self.ln_q(self.queries) + self.pos_q.astype(kv.dtype)).broadcast_to(
            (n, self.num_queries, kv.shape[-1])
        )
        a, heads = self.attn, self.attn.heads
        out = F.scaled_dot_product_attention(
            _heads(a.q_proj(q), heads),
            _heads(a.k_proj(kv + self.pos_k.astype(kv.dtype)), heads),
            _heads(a.v_proj(kv), heads),
            return_weights=return_weights,
        )
        out, weights = out if return_weights else (out, None)
        out = self.ln_post(a.out_proj(_merge(out)))
        return (out, weights) if return_weights else out


class VLM(nn.Module):
    """Vision tower (a ViT, its patch tokens) + projection + a causal text decoder that fuses
    the image by `fusion` ("lecture", "prefix" or "resampler"; see the module docstring)."""

    def __init__(
        self,
        vision: ViT,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        fusion: str = "lecture",
        max_len: int = 64,
        mlp_ratio: float = 4,
        num_queries: int = 9,
        vision_ids: tuple[int, int] | None = None,
    ):
        super().__init__()
        if not isinstance(vision, ViT):
            raise TypeError(f"VLM: vision must be a ViT, got {type(vision).__name__}")
        if fusion not in FUSIONS:
            raise ValueError(f"VLM: fusion must be one of {FUSIONS}, got {fusion!r}")
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VLM: {name} must be a positive int, got {value!r}")
        if vision_ids is not None and not all(0 <= i < vocab_size for i in vision_ids):
            raise ValueError(f"VLM: vision_ids {vision_ids} must be token ids below {vocab_size}")
        self.vocab_size, self.dim, self.heads, self.fusion = vocab_size, dim, heads, fusion
        self.max_len, self.vision_ids = max_len, vision_ids
        self.vision = vision
        self.image_projection = nn.Linear(vision.dim, dim)  # W_proj
        self.image_positions = sincos_2d(*vision.grid, dim, vision.grid)  # (N_p, D), constant
        rng = default_rng()
        self.token_embedding = nn.Embedding(vocab_size, dim)  # E_tok
        self.token_embedding.weight.data[...] = 0.02 * rng.standard_normal((vocab_size, dim))
        self.pos_embedding = nn.Parameter(
            (0.02 * rng.standard_normal((max_len, dim))).astype(DEFAULT_DTYPE)
        )
        self.resampler = (
            Resampler(dim, heads, num_queries, vision.grid) if fusion == "resampler" else None
        )
        self.blocks = nn.ModuleList(
            nn.TransformerBlock(dim, heads, mlp_ratio, activation=MLP_ACTIVATION)
            for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)  # W_vocab

    # --- the two kinds of tokens -----------------------------------------------------------------
    def image_tokens(self, images: Any, return_weights: bool = False) -> Any:
        """Z_img (N, N_img, D): projected patch tokens (resampled to M with fusion="resampler"),
        between the vision start/end embeddings when vision_ids are set. With return_weights
        also the resampler's weights (N, heads, M, N_p), or None."""
        patches = self.image_projection(self.vision.encode(images)[:, 1:])  # (N, N_p, D)
        patches = patches + self.image_positions.astype(patches.dtype)  # fixed 2-D positions
        weights = None
        if self.resampler is not None:
            patches = self.resampler(patches, return_weights=return_weights)
            if return_weights:
                patches, weights = patches
        if self.vision_ids is not None:
            n = patches.shape[0]
            start, end = (
                self.token_embedding(np.full((n, 1), i)).astype(patches.dtype)
                for i in self.vision_ids
            )
            patches = concatenate([start, patches, end], axis=1)
        return (patches, weights) if return_weights else patches

    def text_tokens(self, ids: np.ndarray, mask: np.ndarray) -> Tensor:
        """Z_text = E_tok[ids] + E_pos[position] (N, L, D); a token's position counts the real
        tokens before it, so left padding does not shift the text."""
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        return self.token_embedding(ids) + self.pos_embedding[positions]

    # --- the forward pass over whole sequences ---------------------------------------------------
    def forward(
        self,
        images: Any,
        ids: np.ndarray,
        mask: np.ndarray | None = None,
        return_weights: bool = False,
    ) -> Any:
        """Next-token logits (N, L, vocab) for text ids (N, L) about images (N, H, W, C).
        mask (N, L) bool, True = a real token (default: all). With return_weights also every
        block's attention weights of the text queries, (depth, N, heads, L, N_img + L)."""
        return self.decode(self.image_tokens(images), ids, mask, return_weights)

    def decode(
        self,
        z_img: Tensor,
        ids: np.ndarray,
        mask: np.ndarray | None = None,
        return_weights: bool = False,
    ) -> Any:
        """The decoder alone, given Z_img (N, N_img, D): logits (N, L, vocab)."""
        ids, mask = self._check_text(ids, mask, len(z_img.data))
        x = self.text_tokens(ids, mask)
        n_img, weights = z_img.shape[1], []
        if self.fusion == "lecture":
            for block in self.blocks:
                h = lecture_fusion(block, z_img, x, mask, return_weights)
                if return_weights:
                    h, w = h
                    weights.append(w.data)
                x = x + h  # only the text states are updated
                x = x + block.mlp(block.ln2(x))
        else:  # prefix / resampler: one causal sequence [Z_img, Z_text]
            x = concatenate([z_img, x], axis=1)
            m = prefix_mask(n_img, mask)
            for block in self.blocks:
                x = block(x, mask=m, return_weights=return_weights)
                if return_weights:
                    x, w = x
                    weights.append(w.data[:, :, n_img:])  # the text queries' rows
            x = x[:, n_img:]
        logits = self.lm_head(self.ln_final(x))
        return (logits, np.stack(weights)) if return_weights else logits

    def _check_text(self, ids: Any, mask: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"VLM: ids must be integer token ids (N, L), got {ids.dtype} {ids.shape}"
            )
        if ids.shape[0] != n:
            raise ValueError(f"VLM: {n} images but {ids.shape[0]} token sequences")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"VLM: {ids.shape[1]} text tokens, more than max_len={self.max_len}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise IndexError(
                f"VLM: token ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}"
            )
        mask = np.ones(ids.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != ids.shape:
            raise ValueError(f"VLM: mask {mask.shape} must have the shape of ids {ids.shape}")
        return ids, mask

    # --- decoding with a KV cache ----------------------------------------------------------------
    def _extend(
        self, x: Tensor, cache: KVCache | None, key_valid: np.ndarray
    ) -> tuple[Tensor, KVCache]:
        """Run new states x (N, T, D) through every block, attending over the cached keys and
        values plus their own (causally). key_valid (N, L_seen + T) marks the real keys.
        Returns the new last states (N, T, D) and the grown cache."""
        t = x.shape[1]
        seen = key_valid.shape[1] - t
        causal = np.arange(seen + t)[None, :] <= seen + np.arange(t)[:, None]  # (T, L_seen + T)
        allowed = (causal[None] & key_valid[:, None, :])[:, None]  # (N, 1, T, L_seen + T)
        grown = []
        for b, block in enumerate(self.blocks):
            a, h = block.attn, block.ln1(x)
            k, v = _heads(a.k_proj(h), self.heads), _heads(a.v_proj(h), self.heads)
            if cache is not None:  # append to what this block has seen
                k = concatenate([cache[b][0], k], axis=2)
                v = concatenate([cache[b][1], v], axis=2)
            out = F.scaled_dot_product_attention(
                _heads(a.q_proj(h), self.heads), k, v, mask=allowed
            )
            x = x + a.out_proj(_merge(out))
            x = x + block.mlp(block.ln2(x))
            grown.append((k, v))
        return x, grown

    def _decode_step(
        self,
        x: np.ndarray,
        cache: list[tuple[np.ndarray, np.ndarray]],
        t: int,
        blocked: np.ndarray | None,
        folded,
    ) -> np.ndarray:
        """`_extend` for one new token per sequence, on NumPy arrays: the fast reading of the
        decoding step (reference mode runs `_extend`; the tests check that both agree).

        x (N, D): the new tokens' input states. cache: per block, keys and values allocated
        once for the whole generation, (N, heads, L_max, d), filled below position t, where
        this token's k and v are written (no copy of the cache per token, as concatenate
        makes). blocked (N, 1, L_max): the padded keys (None: none is). folded:
        `_folded_weights()`.
        Returns the new states (N, D). Per block, as _extend with T = 1 (a lone query: nothing
        later to hide):
            h = LN1(x);  q, k, v = h W^Q, h W^K, h W^V;  p = softmax(q K^T / sqrt(d)) over the
            real keys;  x <- x + (p V) W^O;  x <- x + W_2 GELU(LN2(x) W_1)
        One product over all heads per step (np.matmul over (N, heads)) and no graph: decoding
        was ~75 graph nodes per token, overhead-bound at small batches (tinymm.bench item 7).
        The sequences are independent: a large batch is split over the threads
        (tinymm.parallel), each running the whole step on its share."""
        out = np.empty_like(x)

        def sequences(r):  # the step for the sequences r (r = ...: all, nothing to slice)
            part = cache if r is ... else [(k[r], v[r]) for k, v in cache]
            padded = None if blocked is None else blocked[r]
            out[r] = self._decode_rows(x[r], part, t, padded, folded)

        parallel.rows(sequences, cache[0][0])  # split by the size of the cache it reads
        return out

    def _decode_rows(self, x, cache, t, blocked, folded) -> np.ndarray:
        n, heads = x.shape[0], self.heads
        blocked = None if blocked is None else blocked[..., : t + 1]  # (N, 1, t + 1)
        lowest = np.finfo(x.dtype).min
        for block, (keys, values), (w_qkv, b_qkv, w_o, b_o, w_1, b_1, w_2, b_2) in zip(
            self.blocks, cache, folded, strict=True
        ):
            qkv = _standardise(x, block.ln1.eps) @ w_qkv  # [q/sqrt(d), k, v] = LN1(x) W_qkv
            qkv += b_qkv
            qkv = qkv.reshape(n, 3, heads, -1)
            q, keys[:, :, t], values[:, :, t] = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (N, heads, d)
            scores = np.matmul(keys[:, :, : t + 1], q[..., None])[..., 0]  # K q / sqrt(d)
            if blocked is not None:  # (N, heads, t + 1)
                np.copyto(scores, lowest, where=blocked)
            scores -= scores.max(axis=-1, keepdims=True)  # softmax over the keys
            weights = np.exp(scores, out=scores)
            weights /= (weights @ _ones(t + 1, x.dtype))[..., None]
            out = np.matmul(weights[:, :, None, :], values[:, :, : t + 1])  # (N, heads, 1, d)
            out = out.reshape(n, -1) @ w_o
            out += b_o
            x = x + out
            hidden = _standardise(x, block.ln2.eps) @ w_1  # LN2(x) W_1
            hidden += b_1
            out = _gelu(hidden, block.mlp) @ w_2
            out += b_2
            x += out
        return x

    def _folded_weights(self) -> list[tuple[np.ndarray, ...]]:
        """Per block, the matrices of `_decode_rows`, with W^Q, W^K, W^V side by side (one
        product) and each layer norm's scale w and shift b folded into the product after it:
            LN(x) W + c = xhat (w[:, None] W) + (b W + c),   xhat = (x - mean) / sqrt(var + eps)
        and attention's 1/sqrt(d) folded into W^Q and its bias (the same function; made once
        per `generate`, they save 5 NumPy calls per block and token).
        Returns [(W_qkv, b_qkv, W^O, b^O, W_1, b_1, W_2, b_2)] and the folded head (W, b)."""

        def fold(ln: nn.LayerNorm, layers: list[nn.Linear]) -> tuple[np.ndarray, np.ndarray]:
            w = np.concatenate([layer.weight.data for layer in layers], axis=1)
            bias = np.concatenate([_bias(layer) for layer in layers])
            return ln.weight.data[:, None] * w, ln.bias.data @ w + bias

        folded = []
        for block in self.blocks:
            a, mlp = block.attn, block.mlp
            w_qkv, b_qkv = fold(block.ln1, [a.q_proj, a.k_proj, a.v_proj])
            scale = 1 / math.sqrt(self.dim // self.heads)  # q / sqrt(d)
            w_qkv[:, : self.dim] *= scale
            b_qkv[: self.dim] *= scale
            w_o, w_2 = a.out_proj.weight.data, mlp.fc2.weight.data
            folded.append(
                (w_qkv, b_qkv, w_o, _bias(a.out_proj),
                 *fold(block.ln2, [mlp.fc1]), w_2, _bias(mlp.fc2))
            )  # fmt: skip
        return folded, fold(self.ln_final, [self.lm_head])

    def _fast_decoding(self) -> bool:
        """May `generate` decode with `_decode_step`? Fused mode (not reference mode), GELU
        MLPs, and no dropout that would act (eval mode or p = 0)."""
        return not is_reference_mode() and all(
            b.mlp.activation in _GELUS and (not self.training or b.dropout.p == 0)
            for b in self.blocks
        )

    def _prefill(
        self, z_img: Tensor, ids: np.ndarray, mask: np.ndarray
    ) -> tuple[Tensor, KVCache, np.ndarray]:
        """The cache after reading the image and the prompt; returns the last position's logits
        (N, vocab), the cache and which cached keys are real."""
        n, n_img = z_img.shape[0], z_img.shape[1]
        x = self.text_tokens(ids, mask)
        valid = np.concatenate([np.ones((n, n_img), dtype=bool), mask], axis=1)
        if self.fusion == "lecture":  # image keys/values computed once per block, never updated
            cache = []
            for block in self.blocks:
                h = block.ln1(z_img)
                a = block.attn
                cache.append((_heads(a.k_proj(h), self.heads), _heads(a.v_proj(h), self.heads)))
            x, cache = self._extend(x, cache, valid)
        else:  # the image is the start of the sequence
            x, cache = self._extend(concatenate([z_img, x], axis=1), None, valid)
        return self.lm_head(self.ln_final(x[:, -1:]))[:, 0], cache, valid

    def generate(
        self,
        images: Any,
        prompt_ids: Sequence[Sequence[int]] | np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        *,
        eos_id: int | None = None,
        pad_id: int = 0,
        use_cache: bool = True,
        seed: int | None = None,
        return_logits: bool = False,
    ) -> Any:
        """Continue each prompt (a list of ids per image) by up to max_new_tokens tokens.

        temperature 0: greedy (argmax). Otherwise sample from softmax(logits / temperature),
        restricted to the top_k most likely tokens if top_k is set, with a generator seeded by
        `seed` (default: tinymm's, set by tm.manual_seed). After a sequence writes eos_id it
        is filled with pad_id; decoding stops once every sequence has. use_cache=False re-runs
        the whole sequence for every token (the reference the cache is tested against).
        Returns ids (N, T) int64, T <= max_new_tokens; with return_logits also the logits each
        token was chosen from, (N, T, vocab).
        """
        prompts = [list(map(int, p)) for p in prompt_ids]
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(
                f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}"
            )
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.vocab_size:
            raise ValueError(f"generate: top_k must be in [1, {self.vocab_size}], got {top_k}")
        if not prompts or min(len(p) for p in prompts) < 1:
            raise ValueError("generate: every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_len:
            raise ValueError(
                f"generate: a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds "
                f"max_len={self.max_len}"
            )
        n = len(prompts)
        ids = np.full((n, longest), pad_id, dtype=np.int64)  # left-padded
        mask = np.zeros((n, longest), dtype=bool)
        for row, p in enumerate(prompts):
            ids[row, longest - len(p) :], mask[row, longest - len(p) :] = p, True
        rng = np.random.default_rng(seed) if seed is not None else default_rng()
        done = np.zeros(n, dtype=bool)
        out, chosen_from = [], []
        with no_grad():
            z_img = self.image_tokens(images)
            if len(z_img.data) != n:
                raise ValueError(f"generate: {len(z_img.data)} images but {n} prompts")
            self._check_text(ids, mask, n)
            fast = use_cache and self._fast_decoding()
            if use_cache:
                logits, cache, valid = self._prefill(z_img, ids, mask)
                if fast:  # the cache as arrays with room for every new token
                    cache = [(_room(k.data, max_new_tokens), _room(v.data, max_new_tokens))
                             for k, v in cache]  # fmt: skip
                    folded, (w_head, b_head) = self._folded_weights()
                    seen = valid.shape[1]  # keys in the cache; every new one is real:
                    blocked = None  # the prompts' padding, (N, 1, L_max), if there is any
                    if not valid.all():
                        blocked = np.pad(~valid, ((0, 0), (0, max_new_tokens)))[:, None]
            else:
                logits = self.decode(z_img, ids, mask)[:, -1]
            logits = logits.data
            position = mask.sum(axis=1)  # real text tokens so far: the next token's position
            for step in range(max_new_tokens):
                # float64 to sample from and to return; the argmax of float32 logits is the same
                scores = logits.astype(np.float64) if return_logits or temperature else logits
                chosen_from.append(scores)
                token = self._pick(scores, temperature, top_k, rng)
                if eos_id is not None:
                    token = np.where(done, pad_id, token)
                    done |= token == eos_id
                out.append(token)
                if step == max_new_tokens - 1 or (eos_id is not None and done.all()):
                    break
                if not use_cache:  # the whole sequence again, one token longer
                    ids = np.concatenate([ids, token[:, None]], axis=1)
                    mask = np.concatenate([mask, np.ones((n, 1), dtype=bool)], axis=1)
                elif not fast:  # _extend's real keys: one more
                    valid = np.concatenate([valid, np.ones((n, 1), dtype=bool)], axis=1)
                if fast:
                    x = self.token_embedding.weight.data[token] + self.pos_embedding.data[position]
                    x = x.astype(z_img.dtype, copy=False)
                    x = self._decode_step(x, cache, seen + step, blocked, folded)
                    logits = parallel.matmul(_standardise(x, self.ln_final.eps), w_head, b_head)
                elif use_cache:
                    x = self.token_embedding(token[:, None]) + self.pos_embedding[position[:, None]]
                    x, cache = self._extend(x, cache, valid)
                    logits = self.lm_head(self.ln_final(x))[:, 0].data
                else:
                    logits = self.decode(z_img, ids, mask)[:, -1].data
                position += 1
        tokens = np.stack(out, axis=1)
        return (tokens, np.stack(chosen_from, axis=1)) if return_logits else tokens

    @staticmethod
    def _pick(scores: np.ndarray, temperature: float, top_k: int | None, rng: Any) -> np.ndarray:
        """Greedy argmax, or a sample from softmax(scores / temperature) over the top_k."""
        if temperature == 0:
            return scores.argmax(axis=-1)
        z = scores / temperature
        if top_k is not None:
            kth = np.sort(z, axis=-1)[:, -top_k][:, None]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        return np.array([rng.choice(len(row), p=row) for row in p], dtype=np.int64)

    def extra_repr(self) -> str:
        return f"fusion={self.fusion}, dim={self.dim}, heads={self.heads}, vocab={self.vocab_size}"
