"""Differentiable functions built on Tensor: activations, softmax, losses, norms, conv, attention.

`import tinymm.functional as F`. Each function is one block: its forward in NumPy and, next to it,
its backward as a function of the output gradient `g`. The composite ones (softmax, log_softmax,
cross_entropy, layer_norm, gelu, attention) have a *fused* backward: one node whose gradient is
worked out on paper, instead of a chain of small nodes. That is both faster and, written down,
clearer; tests check each against the unfused composition of Tensor ops.

Shapes follow the lecture: images (N, H, W, C), conv weights (kh, kw, C_in, C_out), sequences
(N, L, D), attention masks broadcast to (N, heads, L_q, L_k) with True = may attend.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided
from scipy.special import erf

from . import parallel
from .tensor import Tensor, default_rng, record

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


def _sum(a: np.ndarray, axis: Any) -> np.ndarray:
    """a.sum(axis, keepdims=True), as a product with a ones vector when summing the last axis
    (or the rows of a matrix): for short rows BLAS is ~5x faster than np.sum (tinymm.bench)."""
    if axis == -1 or axis == a.ndim - 1:
        return (a @ _ones(a.shape[-1], a.dtype))[..., None]  # (..., n) -> (..., 1)
    if axis == 0 and a.ndim == 2:
        return (_ones(a.shape[0], a.dtype) @ a)[None]  # (m, n) -> (1, n)
    return a.sum(axis=axis, keepdims=True)


@functools.lru_cache(maxsize=256)
def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    """A read-only ones vector, made once per length and dtype."""
    ones = np.ones(n, dtype)
    ones.flags.writeable = False
    return ones


def _mean(a: np.ndarray, axes: Any) -> np.ndarray:
    """a.mean(axes, keepdims=True), through `_sum` where it is faster."""
    if axes in (-1, (-1,)):
        return _sum(a, -1) / a.shape[-1]
    return a.mean(axis=axes, keepdims=True)


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
    """x * sigmoid(x) (a.k.a. swish); d/dx = s + x s (1 - s)."""
    x = _t(x)
    s = np.exp(-np.logaddexp(0, -x.data)).astype(x.dtype)
    return record("silu", x.data * s, (x,), lambda g: (g * s * (1 + x.data * (1 - s)),), saved=(x,))


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def gelu(x: Tensor, approximate: str = "tanh") -> Tensor:
    """Gaussian error linear unit, x * Phi(x).

    "none":  Phi(x) = (1 + erf(x / sqrt 2)) / 2,        d/dx = Phi(x) + x phi(x)
    "tanh":  Phi(x) ~ (1 + tanh(u)) / 2, u = sqrt(2/pi) (x + 0.044715 x^3)
             d/dx = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(u)
    """
    x = _t(x)
    a = x.data
    if approximate == "tanh":
        c = _SQRT_2_OVER_PI
        t, out = np.empty_like(a), np.empty_like(a)

        def forward_rows(r):  # in place, a row block at a time (parallel.rows)
            x, tanh_u, y = a[r], t[r], out[r]
            np.multiply(x, x, out=tanh_u)
            tanh_u *= 0.044715 * c
            tanh_u += c
            tanh_u *= x  # u = c (x + 0.044715 x^3)
            np.tanh(tanh_u, out=tanh_u)
            np.add(tanh_u, 1, out=y)
            y *= x
            y *= 0.5

        parallel.rows(forward_rows, a)

        def backward(g):
            d = np.empty_like(a)

            def backward_rows(r):
                x, tanh_u, dx = a[r], t[r], d[r]
                np.multiply(x, x, out=dx)
                dx *= 3 * 0.044715 * c
                dx += c
                dx *= x  # x du/dx
                dx *= 1 - tanh_u * tanh_u
                dx += tanh_u
                dx += 1
                dx *= 0.5
                dx *= g[r]

            parallel.rows(backward_rows, a)
            return (d,)

    elif approximate == "none":
        cdf = (0.5 * (1 + erf(a / math.sqrt(2)))).astype(a.dtype)
        out = a * cdf

        def backward(g):
            pdf = np.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
            return (g * (cdf + a * pdf),)

    else:
        raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")
    return record("gelu", out, (x,), backward, saved=(x,))


# ----------------------------------------------------------------------------------------------
# Softmax family (stable: subtract the max before exp)
# ----------------------------------------------------------------------------------------------


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """y_i = e^{x_i} / sum_j e^{x_j};  dx = y * (g - sum(g * y))."""
    x = _t(x)
    e = np.exp(x.data - x.data.max(axis=axis, keepdims=True))
    y = e / _sum(e, axis)
    return record("softmax", y, (x,), lambda g: (y * (g - _sum(g * y, axis)),))


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """y_i = x_i - logsumexp(x);  dx = g - softmax(x) * sum(g)."""
    x = _t(x)
    y = _log_softmax(x.data, axis)
    return record("log_softmax", y, (x,), lambda g: (g - np.exp(y) * _sum(g, axis),))


def logsumexp(x: Tensor, axis: int | None = -1, keepdims: bool = False) -> Tensor:
    """log sum_i e^{x_i} = m + log sum_i e^{x_i - m};  dx = g * softmax(x). axis=None: all."""
    x = _t(x)
    if axis is None:
        return logsumexp(x.reshape(-1), 0).reshape((1,) * x.ndim if keepdims else ())
    lse = _logsumexp(x.data, axis)
    out = lse if keepdims else np.squeeze(lse, axis=axis)

    def backward(g):
        g = g if keepdims else np.expand_dims(g, axis)
        return (g * np.exp(_log_softmax(x.data, axis)),)  # not exp(x - lse): lse is rounded

    return record("logsumexp", out, (x,), backward, saved=(x,))


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return m + np.log(_sum(np.exp(a - m), axis))


def _log_softmax(a: np.ndarray, axis: int) -> np.ndarray:
    """(x - m) - log sum e^{x - m}: x - m is exact, so this keeps its precision for |x| ~ 1e4,
    where x - logsumexp(x) would lose it (logsumexp is rounded at the scale of x)."""
    shifted = a - a.max(axis=axis, keepdims=True)
    return shifted - np.log(_sum(np.exp(shifted), axis))


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def cross_entropy(
    logits: Tensor, targets: Any, ignore_index: int = -100, label_smoothing: float = 0.0
) -> Tensor:
    """Mean over non-ignored targets of -sum_c q_c log softmax(logits)_c.

    q is the one-hot target, smoothed as q = (1 - eps) onehot + eps / C. Fused backward:
    d loss / d logits = (softmax(logits) - q) / (number of non-ignored targets).
    logits (N, C) or (N, L, C); targets (N,) or (N, L) integers.
    """
    logits = _t(logits)
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if logits.shape[:-1] != t.shape:
        raise ValueError(
            f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
            f"got {t.shape}"
        )
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"cross_entropy: targets must be integer class indices, got {t.dtype}")
    n_classes = logits.shape[-1]
    z = logits.data.reshape(-1, n_classes)
    t = t.reshape(-1)
    valid = t != ignore_index
    if np.any((t[valid] < 0) | (t[valid] >= n_classes)):
        raise IndexError(f"cross_entropy: targets must lie in [0, {n_classes}) or be ignore_index")
    count = valid.sum()
    log_p = _log_softmax(z, -1)
    safe_t = np.where(valid, t, 0)
    rows = np.arange(len(t))
    eps = label_smoothing
    per_row = -(1 - eps) * log_p[rows, safe_t] - (eps / n_classes) * log_p.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.asarray((per_row * valid).sum() / count, dtype=logits.dtype)

    def backward(g):
        grad = np.exp(log_p) - eps / n_classes
        grad[rows, safe_t] -= 1 - eps
        grad *= (valid * (g / count))[:, None]
        return (grad.reshape(logits.shape).astype(logits.dtype, copy=False),)

    return record("cross_entropy", loss, (logits,), backward)


def mse_loss(a: Tensor, b: Any) -> Tensor:
    """mean((a - b)^2)."""
    d = _t(a) - b
    return (d * d).mean()


# ----------------------------------------------------------------------------------------------
# Layers as functions
# ----------------------------------------------------------------------------------------------


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """z = x W + b, weight (in, out) as the lecture's z = x E; leading axes folded into one GEMM."""
    x, weight = _t(x), _t(weight)
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"linear: x has {x.shape[-1]} features (shape {x.shape}) but weight expects "
            f"{weight.shape[0]} (shape {weight.shape})"
        )
    lead = x.shape[:-1]
    x2 = x.data.reshape(-1, x.shape[-1])  # (N, ..., in) -> (N*..., in)
    out = parallel.matmul(x2, weight.data, None if bias is None else bias.data)
    inputs = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        g2 = g.reshape(-1, g.shape[-1])

        def weight_grads():  # dW = x^T g, db = sum of g's rows
            gw = parallel.matmul(x2.T, g2) if weight.requires_grad else None
            return gw, None if bias is None else _sum(g2, 0)[0]

        def input_grad():  # dx = g W^T
            return (g2 @ weight.data.T).reshape(x.shape)

        if not x.requires_grad:  # e.g. the first layer: only dW, split by rows
            gx, (gw, gb) = None, weight_grads()
        else:  # dx here, dW and db on the other thread: two products of the same size
            gx, (gw, gb) = parallel.both(input_grad, weight_grads, g2.size * x2.shape[1])
        return (gx, gw) if bias is None else (gx, gw, gb)

    return record("linear", out.reshape(*lead, -1), inputs, backward, saved=(x, weight))


def embedding(indices: Any, weight: Tensor) -> Tensor:
    """Rows of `weight` (V, D) picked by integer `indices` (...) -> (..., D)."""
    weight = _t(weight)
    idx = np.asarray(indices.data if isinstance(indices, Tensor) else indices)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"embedding: indices must be integers, got {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= weight.shape[0]):
        raise IndexError(
            f"embedding: indices must lie in [0, {weight.shape[0]}), got {idx.min()}..{idx.max()}"
        )

    def backward(g):
        grad = np.zeros_like(weight.data)
        np.add.at(grad, idx.reshape(-1), g.reshape(-1, weight.shape[1]))
        return (grad,)

    return record("embedding", weight.data[idx], (weight,), backward)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Normalise the last axis: xhat = (x - mean) / sqrt(var + eps); y = xhat * w + b.

    Fused backward, with gh = g * w and means over the last axis:
    dx = (gh - mean(gh) - xhat * mean(gh * xhat)) / sqrt(var + eps).
    """
    x = _t(x)
    xhat, rstd = _normalise(x.data, -1, eps)
    return _affine("layer_norm", x, xhat, rstd, weight, bias, (-1,), lambda a: a)


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
) -> Tensor:
    """GroupNorm for channels-last x (N, H, W, C): normalise each group of C/G channels over
    (H, W, C/G), then a per-channel affine. Fused backward as layer_norm's, per group."""
    x = _t(x)
    if x.ndim != 4:
        raise ValueError(f"group_norm expects x of shape (N, H, W, C), got {x.shape}")
    n, h, w, c = x.shape
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels do not split into {num_groups} groups")
    grouped = (n, h * w, num_groups, c // num_groups)  # (N, H, W, C) -> (N, HW, G, C/G)
    xhat, rstd = _normalise(x.data.reshape(grouped), (1, 3), eps)
    return _affine(
        "group_norm",
        x,
        xhat.reshape(x.shape),
        rstd,
        weight,
        bias,
        (1, 3),
        lambda a: a.reshape(grouped),
    )


def _normalise(a: np.ndarray, axes: Any, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """xhat = (a - mean) / sqrt(var + eps) and rstd = 1 / sqrt(var + eps), over `axes`.

    One thread: split over two (tinymm.parallel) a layer norm was no faster, its many short
    NumPy calls each waiting for the GIL (measured up to 2M elements)."""
    mean = _mean(a, axes)
    centred = a - mean
    rstd = 1 / np.sqrt(_mean(centred * centred, axes) + eps)
    centred *= rstd
    return centred, rstd


def _affine(op, x, xhat, rstd, weight, bias, axes, grouped) -> Tensor:
    """y = xhat * w + b, with the shared normalisation backward over `axes` of grouped(.)"""
    out = xhat * weight.data if weight is not None else xhat.copy()
    if bias is not None:
        out += bias.data
    inputs = tuple(t for t in (x, weight, bias) if t is not None)

    def backward(g):
        gh = g * weight.data if weight is not None else g
        gh_g, xh_g = grouped(gh), grouped(xhat)
        gx = xh_g * _mean(gh_g * xh_g, axes)  # gx = (gh - mean(gh) - xhat mean(gh xhat)) rstd
        np.subtract(gh_g, gx, out=gx)
        gx -= _mean(gh_g, axes)
        gx *= rstd
        grads = [gx.reshape(x.shape)]
        rows = g.reshape(-1, g.shape[-1])  # (N, ..., C) -> (rows, C): sums over rows are GEMVs
        if weight is not None:
            grads.append(_sum(rows * xhat.reshape(rows.shape), 0)[0])
        if bias is not None:
            grads.append(_sum(rows, 0)[0])
        return grads

    return record(op, out.astype(x.dtype, copy=False), inputs, backward, saved=inputs[1:])


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (identity in eval)."""
    x = _t(x)
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    keep = (default_rng().random(x.shape) >= p).astype(x.dtype) / (1 - p)
    return record("dropout", x.data * keep, (x,), lambda g: (g * keep,))


# ----------------------------------------------------------------------------------------------
# Convolution and resampling (channels-last)
# ----------------------------------------------------------------------------------------------


def _windows(a: np.ndarray, kh: int, kw: int, stride: int) -> np.ndarray:
    """A strided view (N, Ho, Wo, kh, kw, C) of every kh x kw window of a (N, H, W, C): no copy."""
    n, h, w, c = a.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    sn, sh, sw, sc = a.strides
    return as_strided(
        a, (n, ho, wo, kh, kw, c), (sn, sh * stride, sw * stride, sh, sw, sc), writeable=False
    )


def conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0
) -> Tensor:
    """2-D convolution (cross-correlation, as every DL library), channels-last.

    x (N, H, W, C_in), weight (kh, kw, C_in, C_out) -> (N, Ho, Wo, C_out),
    Ho = (H + 2 padding - kh) // stride + 1.
    Forward is im2col: every window becomes a row of kh*kw*C_in values (one strided view, one
    copy) and the convolution is one matmul with the weight reshaped to (kh*kw*C_in, C_out).
    Backward: dW = cols^T @ g; dx = for each kernel offset (i, j), g @ W[i, j]^T added into the
    shifted window positions: kh*kw matmuls, no scatter.
    """
    x, weight = _t(x), _t(weight)
    if x.ndim != 4:
        raise ValueError(f"conv2d expects x of shape (N, H, W, C_in), got {x.shape}")
    if weight.ndim != 4 or weight.shape[2] != x.shape[3]:
        raise ValueError(
            f"conv2d: weight must be (kh, kw, C_in={x.shape[3]}, C_out), got {weight.shape}"
        )
    kh, kw, c_in, c_out = weight.shape
    p = padding
    xp = np.pad(x.data, ((0, 0), (p, p), (p, p), (0, 0))) if p else x.data
    if xp.shape[1] < kh or xp.shape[2] < kw:
        raise ValueError(
            f"conv2d: kernel {kh}x{kw} is larger than the padded input {xp.shape[1:3]}"
        )
    windows = _windows(xp, kh, kw, stride)  # (N, Ho, Wo, kh, kw, C_in), a view
    n, ho, wo = windows.shape[:3]
    cols = np.empty(windows.shape, xp.dtype)
    parallel.rows(lambda r: np.copyto(cols[r], windows[r]), cols)  # the im2col copy, by images
    cols = cols.reshape(n * ho * wo, kh * kw * c_in)
    w2 = weight.data.reshape(kh * kw * c_in, c_out)
    out = parallel.matmul(cols, w2, None if bias is None else bias.data)
    inputs = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        g2 = g.reshape(-1, c_out)
        gw = parallel.matmul(cols.T, g2).reshape(weight.shape) if weight.requires_grad else None
        gx = None
        if x.requires_grad:
            gxp = np.zeros(xp.shape, dtype=xp.dtype)

            def dx_rows(r):  # for the images r (or all: ...)
                g_r, gxp_r = g[r].reshape(-1, c_out), gxp[r]
                for i in range(kh):
                    for j in range(kw):
                        rows = slice(i, i + stride * (ho - 1) + 1, stride)
                        cols_ = slice(j, j + stride * (wo - 1) + 1, stride)
                        gx_ij = g_r @ weight.data[i, j].T  # (N_r Ho Wo, C_in)
                        gxp_r[:, rows, cols_] += gx_ij.reshape(-1, ho, wo, c_in)

            parallel.rows(dx_rows, gxp)
            gx = gxp[:, p : p + x.shape[1], p : p + x.shape[2]] if p else gxp
        grads = [gx, gw]
        if bias is not None:
            grads.append(_sum(g2, 0)[0])
        return grads

    return record("conv2d", out.reshape(n, ho, wo, c_out), inputs, backward, saved=(x, weight))


def avg_pool2d(x: Tensor, kernel_size: int, stride: int | None = None) -> Tensor:
    """Mean over kernel_size x kernel_size windows of x (N, H, W, C), stride defaults to kernel."""
    x = _t(x)
    k, s = kernel_size, stride or kernel_size
    if x.ndim != 4:
        raise ValueError(f"avg_pool2d expects x of shape (N, H, W, C), got {x.shape}")
    win = _windows(x.data, k, k, s)
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


def upsample_nearest2d(x: Tensor, scale_factor: int = 2) -> Tensor:
    """Repeat every pixel of x (N, H, W, C) scale x scale times; the gradient sums each block."""
    x = _t(x)
    if x.ndim != 4:
        raise ValueError(f"upsample_nearest2d expects x of shape (N, H, W, C), got {x.shape}")
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
    if h % p or w % p:
        raise ValueError(
            f"patch size {p} does not divide the image size {h}x{w}: "
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
    """attn(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, one fused node.

    q (..., L_q, d), k (..., L_k, d), v (..., L_k, d_v) -> (..., L_q, d_v). `mask` is boolean,
    broadcastable to (..., L_q, L_k), True = may attend; `causal` lets query i see keys <= i
    when L_q = L_k. When L_q < L_k the queries are the *last* L_q positions (as when decoding
    after a prompt), so query i sees keys <= i + L_k - L_q.
    A query that may attend to nothing gets uniform weights rather than NaN.
    With P = softmax(S), S = Q K^T / sqrt(d):
        dV = P^T g,  dP = g V^T,  dS = P * (dP - sum_k(dP * P)),  dQ = dS K / sqrt(d),
        dK = dS^T Q / sqrt(d).
    With return_weights=True also returns P as a tensor without gradient, for figures.
    """
    q, k, v = _t(q), _t(k), _t(v)
    d = q.shape[-1]
    if k.shape[-1] != d or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit: need q (..., L_q, d), "
            "k (..., L_k, d), v (..., L_k, d_v)"
        )
    scale = 1.0 / math.sqrt(d)
    qd, kd, vd = q.data, k.data, v.data
    lq, lk = qd.shape[-2], kd.shape[-2]
    batch = np.broadcast_shapes(qd.shape[:-2], kd.shape[:-2], vd.shape[:-2])
    dtype = np.result_type(qd, kd, vd)
    # P is stored transposed and keys first, (L_k, ..., L_q), as a matrix p_t (L_k, batch x L_q):
    # each step of the softmax over the keys is then an operation between whole rows of p_t,
    # which NumPy does 3-7x faster than one short row of L_k numbers per query. The matmuls
    # reach it through the view s_t (..., L_k, L_q), one S^T (then P^T) per sequence.
    p_t = np.empty((lk, *batch, lq), dtype)
    s_t = np.moveaxis(p_t, 0, -2)
    parallel.matmul(kd, np.swapaxes(qd * scale, -1, -2), out=s_t)  # S^T = K Q^T / sqrt(d)
    p_t = p_t.reshape(lk, -1)
    allowed = _attention_mask(mask, causal, lq, lk)
    if allowed is not None:  # blocked entries: (..., L_q, L_k) -> (L_k, ..., L_q), as p_t
        blocked = np.moveaxis(np.broadcast_to(~allowed, (*batch, lq, lk)), -1, 0)
        np.copyto(p_t, np.finfo(dtype).min, where=blocked.reshape(p_t.shape))

    def softmax_over_keys(r):  # P^T = softmax of S^T over its rows (the keys); r: some queries
        pt = p_t[:, r]
        pt -= pt.max(axis=0)
        np.exp(pt, out=pt)
        pt /= _sum(pt, 0)

    parallel.rows(softmax_over_keys, p_t.T)
    out = parallel.matmul(np.swapaxes(s_t, -1, -2), vd)  # P V

    def backward(g):
        gv = parallel.matmul(s_t, g)  # dV = P^T g
        ds_t = np.empty_like(p_t)  # dP^T = V g^T, then dS^T = P^T * (dP^T - sum_k(dP^T P^T))
        ds_seq = parallel.matmul(
            vd, np.swapaxes(g, -1, -2), out=np.moveaxis(ds_t.reshape(lk, *batch, lq), 0, -2)
        )

        def softmax_backward(r):
            ds, pt = ds_t[:, r], p_t[:, r]
            ds -= _sum(ds * pt, 0)
            ds *= pt

        parallel.rows(softmax_backward, p_t.T)
        gq = parallel.matmul(np.swapaxes(ds_seq, -1, -2), kd)  # dQ = dS K / sqrt(d)
        gq *= scale
        gk = parallel.matmul(ds_seq, qd)  # dK = dS^T Q / sqrt(d)
        gk *= scale
        return gq, gk, gv

    out = record("attention", out, (q, k, v), backward, saved=(q, k, v))
    if return_weights:  # P as (..., L_q, L_k), for figures
        return out, Tensor(np.ascontiguousarray(np.swapaxes(s_t, -1, -2)))
    return out


def _attention_mask(mask: Any, causal: bool, lq: int, lk: int) -> np.ndarray | None:
    allowed = None
    if mask is not None:
        allowed = np.asarray(mask.data if isinstance(mask, Tensor) else mask)
        if allowed.dtype != bool:
            raise TypeError(
                f"attention mask must be boolean (True = may attend), got {allowed.dtype}"
            )
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
