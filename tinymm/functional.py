"""Differentiable functions, each written as the lecture writes it.

`import tinymm.functional as F`. Every composite op here (softmax, log_softmax, logsumexp,
cross_entropy, layer_norm, group_norm, gelu, silu, linear, conv2d, attention) reads as its
formula: a short composition of Tensor ops that the engine differentiates node by node. That is
the *reference* reading. The first line of each dispatches to the op's *fused kernel* in
`tinymm/kernels.py` (one graph node, its backward derived by hand, faster), which is the default;
`tinymm.reference_mode()` or `TINYMM_REFERENCE=1` runs the compositions below instead. The tests
check that both readings agree, values and gradients. Arguments are checked before the dispatch,
so both readings refuse the same mistakes with the same message.

The other functions (relu, sigmoid, embedding, dropout, pooling, patchify, ...) are single ops:
one forward in NumPy and its backward beside it, as in tensor.py.

Shapes follow the lecture: images (N, H, W, C), conv weights (kh, kw, C_in, C_out), sequences
(N, L, D), attention masks broadcast to (N, heads, L_q, L_k) with True = may attend.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import kernels
from .modes import is_reference_mode
from .tensor import Tensor, _broadcast_shape, default_rng, pad, record, where

__all__ = [
    "avg_pool2d",
    "clip_loss",
    "conv2d",
    "cross_entropy",
    "dropout",
    "embedding",
    "gelu",
    "group_norm",
    "layer_norm",
    "linear",
    "log_softmax",
    "logsumexp",
    "mse_loss",
    "multi_head_attention",
    "patchify",
    "relu",
    "scaled_dot_product_attention",
    "sigmoid",
    "silu",
    "softmax",
    "unpatchify",
    "upsample_nearest2d",
]


def _t(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def _fused() -> bool:
    """Run the fused kernel (the default), or the composition below it (reference mode)?"""
    return not is_reference_mode()


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------


def relu(x: Tensor) -> Tensor:
    """max(x, 0); the gradient at exactly 0 is taken as 0."""
    x = _t(x)
    positive = x.data > 0
    return record("relu", x.data * positive, (x,), lambda g: (g * positive,))


def sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + e^-x), computed without overflow; d/dx = s (1 - s)."""
    x = _t(x)
    s = np.exp(-np.logaddexp(0, -x.data)).astype(x.dtype)
    return record("sigmoid", s, (x,), lambda g: (g * s * (1 - s),))


def silu(x: Tensor) -> Tensor:
    """SiLU (swish): x * sigmoid(x)."""
    x = _t(x)
    if _fused():
        return kernels.silu(x)
    return x * sigmoid(x)


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """Gaussian error linear unit, x Phi(x), Phi the standard normal CDF (PyTorch's default).

    approximate="none":  Phi(x) = (1 + erf(x / sqrt 2)) / 2                       (exact)
    approximate="tanh":  Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2  (GPT-2, BERT)
    """
    x = _t(x)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    if _fused():
        return kernels.gelu_erf(x) if approximate == "none" else kernels.gelu_tanh(x)
    if approximate == "none":
        return x * 0.5 * (1 + (x * (1 / math.sqrt(2))).erf())
    return 0.5 * x * (1 + (_SQRT_2_OVER_PI * (x + 0.044715 * x**3)).tanh())


# ----------------------------------------------------------------------------------------------
# Softmax family. exp(x - m) with m = max(x): the same ratios as exp(x), and no overflow. m is a
# constant shift (the output does not depend on it), so it is detached from the graph.
# ----------------------------------------------------------------------------------------------


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """softmax(x)_i = e^{x_i} / sum_j e^{x_j}, over `axis`.

    A row that is entirely -inf (every entry masked out) has no answer (0/0; PyTorch gives NaN):
    tinymm gives uniform weights 1/n there and a zero gradient, as attention does for a query
    that may attend to nothing."""
    x = _t(x)
    axis = _axis("softmax", x, axis)
    if _fused():
        return kernels.softmax(x, axis)
    x, _ = _without_empty_rows(x, axis)
    exp_shifted = (x - x.max(axis=axis, keepdims=True).detach()).exp()
    return exp_shifted / exp_shifted.sum(axis=axis, keepdims=True)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """log softmax(x)_i = x_i - log sum_j e^{x_j}, over `axis`.

    A row that is entirely -inf gives log(1/n) and a zero gradient (see softmax)."""
    x = _t(x)
    axis = _axis("log_softmax", x, axis)
    if _fused():
        return kernels.log_softmax(x, axis)
    x, _ = _without_empty_rows(x, axis)
    shifted = x - x.max(axis=axis, keepdims=True).detach()
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()


def logsumexp(x: Tensor, axis: int | None = -1, keepdims: bool = False) -> Tensor:
    """log sum_i e^{x_i} = m + log sum_i e^{x_i - m}, m = max(x). axis=None: over all.

    A row that is entirely -inf gives -inf (log 0, as PyTorch) and a zero gradient."""
    x = _t(x)
    if axis is None:
        return logsumexp(x.reshape(-1), 0).reshape((1,) * x.ndim if keepdims else ())
    axis = _axis("logsumexp", x, axis)
    if _fused():
        return kernels.logsumexp(x, axis, keepdims)
    x, empty = _without_empty_rows(x, axis)
    m = x.max(axis=axis, keepdims=True).detach()
    out = m + (x - m).exp().sum(axis=axis, keepdims=True).log()
    if empty is not None:
        out = where(empty, -np.inf, out)  # log 0
    return out if keepdims else out.squeeze(axis)


def _without_empty_rows(x: Tensor, axis: int) -> tuple[Tensor, np.ndarray | None]:
    """Rows along `axis` that are entirely -inf (x - max(x) would be -inf - (-inf) = NaN) set to
    0, with no gradient (where() sends none to the branch not taken), and their mask (keepdims);
    x itself and None when there is no such row."""
    empty = np.isneginf(x.data.max(axis=axis, keepdims=True))
    if not empty.any():
        return x, None
    return where(empty, 0.0, x), empty


def _axis(op: str, x: Tensor, axis: Any) -> int:
    """`axis` as a non-negative int, checked: an int in [-ndim, ndim) of a non-empty axis."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"{op}: axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise IndexError(
            f"{op}: axis {axis} is out of range for a tensor of shape {x.shape} "
            f"(expected an axis in [{-x.ndim}, {x.ndim - 1}])"
        )
    axis = int(axis) % x.ndim
    if x.shape[axis] == 0:
        raise ValueError(f"{op}: axis {axis} of shape {x.shape} is empty (length 0)")
    return axis


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def cross_entropy(
    logits: Tensor, targets: Any, ignore_index: int = -100, label_smoothing: float = 0.0
) -> Tensor:
    """Mean over the kept targets of -sum_c q_c log softmax(logits)_c (the lecture's
    L = -sum_i y_i log y~_i), with q the one-hot target, smoothed as (1 - eps) onehot + eps / C.

    Targets equal to ignore_index are left out of the mean (e.g. the prompt tokens of a chat,
    padding). With none kept the loss is 0 and so is its gradient, not 0/0.
    logits (N, C) or (N, L, C); targets (N,) or (N, L) integers.
    """
    logits = _t(logits)
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"cross_entropy: logits must be (..., C) with at least one class C, got {logits.shape}"
        )
    if logits.shape[:-1] != t.shape:
        raise ValueError(
            f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
            f"got {t.shape}"
        )
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"cross_entropy: targets must be integer class indices, got {t.dtype}")
    n_classes = logits.shape[-1]
    kept = t != ignore_index
    if np.any((t[kept] < 0) | (t[kept] >= n_classes)):
        raise IndexError(f"cross_entropy: targets must lie in [0, {n_classes}) or be ignore_index")
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if _fused():
        return kernels.cross_entropy(logits, t, ignore_index, label_smoothing)
    eps = label_smoothing
    log_p = log_softmax(logits.reshape(-1, n_classes), axis=-1)  # (rows, C)
    t, kept = t.reshape(-1), kept.reshape(-1)
    log_p_target = log_p[np.arange(len(t)), np.where(kept, t, 0)]  # log p of the true class
    per_row = -(1 - eps) * log_p_target
    if eps:  # (not 0 * sum: a logit of -inf makes that sum -inf, and 0 * -inf is NaN)
        per_row = per_row - (eps / n_classes) * log_p.sum(axis=-1)
    return (per_row * kept.astype(logits.dtype)).sum() / max(int(kept.sum()), 1)


def mse_loss(a: Tensor, b: Any) -> Tensor:
    """mean((a - b)^2) over all elements; a and b must have the same shape (a broadcast would
    silently average a matrix of every pair)."""
    a, b = _t(a), _t(b)
    if a.shape != b.shape:
        raise ValueError(
            f"mse_loss: a (input) and b (target) must have the same shape, got {a.shape} and "
            f"{b.shape}"
        )
    d = a - b
    return (d * d).mean()


# ----------------------------------------------------------------------------------------------
# Layers as functions
# ----------------------------------------------------------------------------------------------


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """z = x W + b, weight (in, out) as the lecture's z = x E."""
    x, weight = _t(x), _t(weight)
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"linear: x has {x.shape[-1] if x.ndim else 'no'} features (shape {x.shape}) but "
            f"weight expects {weight.shape[0] if weight.ndim else '?'} (shape {weight.shape}); "
            "weight must be (in_features, out_features)"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[1],):
        raise ValueError(f"linear: bias must have shape ({weight.shape[1]},), got {bias.shape}")
    if _fused():
        return kernels.linear(x, weight, bias)
    return x @ weight if bias is None else x @ weight + bias


def embedding(indices: Any, weight: Tensor) -> Tensor:
    """Rows of `weight` (V, D) picked by integer `indices` (...) -> (..., D)."""
    weight = _t(weight)
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must be a (V, D) table, got shape {weight.shape}")
    idx = np.asarray(indices.data if isinstance(indices, Tensor) else indices)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"embedding: indices must be integers (ids), got {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= weight.shape[0]):
        raise IndexError(
            f"embedding: indices must lie in [0, {weight.shape[0]}), got {idx.min()}..{idx.max()}"
        )

    def backward(g):  # np.add.at, not getitem's faster add_rows: lessons measured with it
        grad = np.zeros_like(weight.data)
        np.add.at(grad, idx.reshape(-1), g.reshape(idx.size, weight.shape[1]))
        return (grad,)

    return record("embedding", weight.data[idx], (weight,), backward)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Normalise the last axis: xhat = (x - mean) / sqrt(var + eps); y = xhat * w + b."""
    x = _t(x)
    if x.ndim < 1:
        raise ValueError(f"layer_norm: x needs at least one axis to normalise, got shape {x.shape}")
    _check_affine("layer_norm", x.shape[-1:], weight, bias)
    _check_eps("layer_norm", eps)
    if _fused():
        return kernels.layer_norm(x, weight, bias, eps)
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    xhat = centred / (var + eps).sqrt()
    return _scale_shift(xhat, weight, bias)


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
) -> Tensor:
    """GroupNorm for channels-last x (N, H, W, C): normalise each group of C/G channels over
    (H, W, C/G), as layer_norm does a row, then a per-channel affine y = xhat * w + b."""
    x = _t(x)
    if x.ndim != 4:
        raise ValueError(f"group_norm expects x of shape (N, H, W, C), got {x.shape}")
    n, h, w, c = x.shape
    if not isinstance(num_groups, int | np.integer) or num_groups < 1 or c % num_groups:
        raise ValueError(
            f"group_norm: {c} channels do not split into {num_groups!r} groups (num_groups must "
            "be a positive divisor of the channel count C)"
        )
    _check_affine("group_norm", (c,), weight, bias)
    _check_eps("group_norm", eps)
    if _fused():
        return kernels.group_norm(x, num_groups, weight, bias, eps)
    groups = x.reshape(n, h * w, num_groups, c // num_groups)  # (N, H, W, C) -> (N, HW, G, C/G)
    mean = groups.mean(axis=(1, 3), keepdims=True)
    centred = groups - mean
    var = (centred * centred).mean(axis=(1, 3), keepdims=True)
    xhat = (centred / (var + eps).sqrt()).reshape(n, h, w, c)
    return _scale_shift(xhat, weight, bias)


def _scale_shift(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    y = xhat * weight if weight is not None else xhat
    return y + bias if bias is not None else y


def _check_eps(op: str, eps: Any) -> None:
    """eps > 0: with eps = 0 a constant row is 0 / 0 = NaN (and PyTorch gives NaN there)."""
    if not isinstance(eps, int | float | np.floating) or not eps > 0:
        raise ValueError(f"{op}: eps must be a number > 0, got {eps!r}")


def _check_affine(op: str, shape: tuple, weight: Any, bias: Any) -> None:
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(p.shape)}")


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (identity in eval)."""
    x = _t(x)
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p (the probability) must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    keep = (default_rng().random(x.shape) >= p).astype(x.dtype) / (1 - p)
    return record("dropout", x.data * keep, (x,), lambda g: (g * keep,))


# ----------------------------------------------------------------------------------------------
# Convolution and resampling (channels-last)
# ----------------------------------------------------------------------------------------------


def conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0
) -> Tensor:
    """2-D convolution (cross-correlation, as every DL library), channels-last.

        out[n, y, x, :] = sum_{i, j} x_pad[n, y s + i, x s + j, :] @ W[i, j] + b

    x (N, H, W, C_in), weight (kh, kw, C_in, C_out) -> (N, Ho, Wo, C_out),
    Ho = (H + 2 padding - kh) // stride + 1. As written: one shifted, strided slice of the
    padded input per kernel offset (i, j), times that offset's (C_in, C_out) matrix, summed.
    """
    x, weight = _t(x), _t(weight)
    if x.ndim != 4:
        raise ValueError(f"conv2d expects x of shape (N, H, W, C_in), got {x.shape}")
    if weight.ndim != 4 or weight.shape[2] != x.shape[3]:
        raise ValueError(
            f"conv2d: weight must be (kh, kw, C_in={x.shape[3]}, C_out), got {weight.shape}"
        )
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0)):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"conv2d: {name} must be an integer >= {low}, got {value!r}")
    kh, kw, c_in, c_out = weight.shape
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"conv2d: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    p = padding
    height, width = x.shape[1] + 2 * p, x.shape[2] + 2 * p
    if height < kh or width < kw:
        raise ValueError(
            f"conv2d: kernel {kh}x{kw} is larger than the padded input {(height, width)} "
            f"(weight {weight.shape}, x {x.shape}, padding={p})"
        )
    if _fused():
        return kernels.conv2d(x, weight, bias, stride, padding)
    x_padded = pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
    ho, wo = (height - kh) // stride + 1, (width - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + stride * (ho - 1) + 1, stride)
            columns = slice(j, j + stride * (wo - 1) + 1, stride)
            term = x_padded[:, rows, columns] @ weight[i, j]  # (N, Ho, Wo, C_in) @ (C_in, C_out)
            out = term if out is None else out + term
    return out if bias is None else out + bias


def avg_pool2d(x: Tensor, kernel_size: int, stride: int | None = None) -> Tensor:
    """Mean over kernel_size x kernel_size windows of x (N, H, W, C), stride defaults to kernel."""
    x = _t(x)
    k, s = kernel_size, kernel_size if stride is None else stride
    if x.ndim != 4:
        raise ValueError(f"avg_pool2d expects x of shape (N, H, W, C), got {x.shape}")
    _check_positive("avg_pool2d", kernel_size=k, stride=s)
    if k > x.shape[1] or k > x.shape[2]:
        raise ValueError(
            f"avg_pool2d: kernel_size={k} is larger than the input x {x.shape} "
            f"(H={x.shape[1]}, W={x.shape[2]})"
        )
    win = kernels.windows(x.data, k, k, s)
    n, ho, wo = win.shape[:3]
    out = win.mean(axis=(3, 4))

    def backward(g):
        gx = np.zeros(x.shape, dtype=x.dtype)
        share = g / (k * k)
        for i in range(k):
            for j in range(k):
                gx[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s] += share
        return (gx,)

    return record("avg_pool2d", out.astype(x.dtype, copy=False), (x,), backward)


def _check_positive(op: str, **arguments: Any) -> None:
    """Each argument (a size, a stride, a factor) must be an integer >= 1."""
    for name, value in arguments.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{op}: {name} must be an integer >= 1, got {value!r}")


def upsample_nearest2d(x: Tensor, scale_factor: int = 2) -> Tensor:
    """Repeat every pixel of x (N, H, W, C) scale x scale times; the gradient sums each block."""
    x = _t(x)
    if x.ndim != 4:
        raise ValueError(f"upsample_nearest2d expects x of shape (N, H, W, C), got {x.shape}")
    _check_positive("upsample_nearest2d", scale_factor=scale_factor)
    s = scale_factor
    n, h, w, c = x.shape
    out = np.broadcast_to(x.data[:, :, None, :, None, :], (n, h, s, w, s, c))
    return record(
        "upsample_nearest2d",
        out.reshape(n, h * s, w * s, c),
        (x,),
        lambda g: (g.reshape(n, h, s, w, s, c).sum(axis=(2, 4)),),
    )


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Split images (N, H, W, C) into non-overlapping P x P patches, each flattened to P*P*C
    values in (row, column, channel) order, as the ViT paper: -> (N, (H/P)*(W/P), P*P*C).
    Patches are numbered row by row. A pure rearrangement (reshape + transpose)."""
    images = _t(images)
    if images.ndim != 4:
        raise ValueError(f"patchify expects images of shape (N, H, W, C), got {images.shape}")
    n, h, w, c = images.shape
    p = patch_size
    _check_positive("patchify", patch_size=p)
    if h % p or w % p:
        raise ValueError(
            f"patch size {p} does not divide the image size {h}x{w} (patch_size must divide "
            f"the H and W of images): "
            f"{h} % {p} = {h % p}, {w} % {p} = {w % p}"
        )
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)  # (N, gh, gw, P, P, C) -> (N, Np, P*P*C)


def unpatchify(
    patches: Tensor, patch_size: int, image_size: tuple[int, int], channels: int
) -> Tensor:
    """Inverse of patchify: (N, (H/P)*(W/P), P*P*C) -> (N, H, W, C)."""
    patches = _t(patches)
    h, w = image_size
    p = patch_size
    _check_positive("unpatchify", patch_size=p, channels=channels)
    if h % p or w % p:
        raise ValueError(f"unpatchify: patch_size={p} does not divide image_size={image_size}")
    expected = ((h // p) * (w // p), p * p * channels)
    if patches.ndim != 3 or patches.shape[1:] != expected:
        raise ValueError(
            f"unpatchify: patches of shape {patches.shape} are not (N, {expected[0]}, "
            f"{expected[1]}), the patches of {h}x{w} images of {channels} channels with "
            f"patch_size={p}"
        )
    n = patches.shape[0]
    x = patches.reshape(n, h // p, w // p, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h, w, channels)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Any = None,
    causal: bool = False,
    return_weights: bool = False,
) -> Any:
    """attn(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V.

    q (..., L_q, d), k (..., L_k, d), v (..., L_k, d_v) -> (..., L_q, d_v). `mask` is boolean,
    broadcastable to (..., L_q, L_k), True = may attend; `causal` lets query i see keys <= i
    when L_q = L_k. When L_q < L_k the queries are the *last* L_q positions (as when decoding
    after a prompt), so query i sees keys <= i + L_k - L_q. A blocked key's score becomes the
    lowest float (as -inf, without inf - inf = NaN): a query that may attend to nothing gets
    uniform weights rather than NaN (PyTorch gives NaN there).
    With return_weights=True also returns P = softmax(...) (..., L_q, L_k) without gradient,
    for figures.
    """
    q, k, v = _t(q), _t(k), _t(v)
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ValueError(
            f"attention: q, k and v need at least 2 axes (..., L, d), got {q.shape}, {k.shape}, "
            f"{v.shape}"
        )
    d = q.shape[-1]
    if k.shape[-1] != d or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit: need q (..., L_q, d), "
            "k (..., L_k, d), v (..., L_k, d_v)"
        )
    try:
        batch = _broadcast_shape(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(
            f"attention: the batch axes of q {q.shape}, k {k.shape}, v {v.shape} do not "
            "broadcast together"
        ) from None
    allowed = _attention_mask(mask, causal, q.shape[-2], k.shape[-2], batch)
    if _fused():
        out, weights_seq = kernels.attention(q, k, v, allowed)
        if return_weights:  # P^T per sequence (..., L_k, L_q) -> P (..., L_q, L_k)
            return out, Tensor(np.ascontiguousarray(np.swapaxes(weights_seq, -1, -2)))
        return out
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(d)  # S = Q K^T / sqrt(d_k)   (..., L_q, L_k)
    if allowed is not None:
        scores = where(allowed, scores, np.finfo(scores.dtype).min)  # blocked: "-inf"
    weights = softmax(scores, axis=-1)  # P: each query's weights over the keys sum to 1
    out = weights @ v  # (..., L_q, L_k) @ (..., L_k, d_v)
    return (out, weights.detach()) if return_weights else out


def multi_head_attention(
    qkv: Tensor, heads: int, mask: Any = None, causal: bool = False, return_weights: bool = False
) -> Any:
    """Multi-head self-attention on the packed projections qkv = [X W^Q | X W^K | X W^V]
    (N, L, 3D) -> (N, L, D), before the output projection W^O:

        head_h = attn(Q_h, K_h, V_h),   Q_h = columns h d..(h+1) d of Q  (d = D / heads)
        out = [head_1 | ... | head_heads]

    Each head reads its own d columns of Q, K and V. mask, causal and return_weights as in
    scaled_dot_product_attention, over (N, heads, L, L)."""
    qkv = _t(qkv)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise ValueError(f"multi_head_attention: heads must be a positive int, got {heads!r}")
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(
            f"multi_head_attention: qkv must be (N, L, 3 D) with D divisible by heads={heads}, "
            f"got shape {qkv.shape}"
        )
    n, length, width = qkv.shape
    if _fused():
        allowed = _attention_mask(mask, causal, length, length, (n, heads))
        out, weights_seq = kernels.multi_head_attention(qkv, heads, allowed)
        if return_weights:  # P^T per sequence (N, heads, L_k, L_q) -> P (N, heads, L_q, L_k)
            return out, Tensor(np.ascontiguousarray(np.swapaxes(weights_seq, -1, -2)))
        return out
    dim = width // 3
    q, k, v = (  # (N, L, D) each -> (N, heads, L, d)
        qkv[:, :, i * dim : (i + 1) * dim].reshape(n, length, heads, -1).transpose(0, 2, 1, 3)
        for i in range(3)
    )
    out = scaled_dot_product_attention(q, k, v, mask, causal, return_weights)
    out, weights = out if return_weights else (out, None)
    out = out.transpose(0, 2, 1, 3).reshape(n, length, dim)  # the heads side by side
    return (out, weights) if return_weights else out


def _attention_mask(mask: Any, causal: bool, lq: int, lk: int, batch: tuple) -> np.ndarray | None:
    """The keys each query may see, (..., L_q, L_k) bool, from `mask` and `causal`; None: all."""
    allowed = None
    if mask is not None:
        allowed = np.asarray(mask.data if isinstance(mask, Tensor) else mask)
        if allowed.dtype != bool:
            raise TypeError(
                f"attention mask must be boolean (True = may attend), got {allowed.dtype}"
            )
        try:
            fits = np.broadcast_shapes(allowed.shape, (*batch, lq, lk)) == (*batch, lq, lk)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"attention mask of shape {allowed.shape} does not broadcast to the scores' "
                f"shape {(*batch, lq, lk)} (batch..., L_q, L_k)"
            ) from None
    if causal:
        tri = np.tril(np.ones((lq, lk), dtype=bool), k=lk - lq)
        allowed = tri if allowed is None else allowed & tri
    return allowed


# ----------------------------------------------------------------------------------------------
# Contrastive loss (CLIP)
# ----------------------------------------------------------------------------------------------


def clip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Any) -> Tensor:
    """CLIP's symmetric contrastive loss over a batch of N matching (image, text) pairs.

    With unit-norm rows v_i (images) and t_j (texts), S_ij = v_i . t_j and 1/tau = exp(s):
        logits = exp(s) S                                       (N, N)
        L_image->text = CE(logits, 0..N-1)       row i: which text belongs to image i
        L_text->image = CE(logits^T, 0..N-1)     column j: which image belongs to text j
        L = (L_image->text + L_text->image) / 2
    Pair i is the positive of row i and of column i; every other entry is a negative.
    image_embeds, text_embeds (N, D); logit_scale: scalar tensor s (learned) or float.
    """
    image_embeds, text_embeds = _t(image_embeds), _t(text_embeds)
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "clip_loss: image_embeds and text_embeds must both be (N, D) with the same N and D, "
            f"got {image_embeds.shape} and {text_embeds.shape}"
        )
    scale = logit_scale.exp() if isinstance(logit_scale, Tensor) else math.exp(logit_scale)
    logits = (image_embeds @ text_embeds.T) * scale  # (N, N): S / tau
    labels = np.arange(len(logits.data))
    return (cross_entropy(logits, labels) + cross_entropy(logits.T, labels)) * 0.5
