"""Fused kernels: the fast reading of functional.py's composite ops, one graph node each.

`tinymm.functional` writes every composite op as the lecture's formula, a plain composition of
Tensor ops (the reference). Here is the same function as *one* node: the forward in NumPy, and
the backward worked out on paper, written next to its derivation. One node instead of five to
fifteen means fewer Python calls, fewer temporaries kept for backward, and gradients that cancel
algebraically before they are computed (softmax's Jacobian is never built). functional.py calls
these by default; `tinymm.reference_mode()` runs the compositions instead, and the tests check
that both readings agree in values and gradients.

Conventions: `g` is the gradient of the loss with respect to the op's output; a backward returns
one gradient (or None) per input. Sums over the last axis go through `_sum`, a product with a
ones vector (for short rows BLAS is ~5x faster than np.sum: PERF_NOTES / tinymm.bench). Big
matmuls and row-wise work are split over two threads by `tinymm.parallel` (one thread under a
debugger).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided
from scipy.special import erf

from . import parallel
from .tensor import Tensor, _broadcast_shape, _rows, record

# ----------------------------------------------------------------------------------------------
# Sums as products with a ones vector
# ----------------------------------------------------------------------------------------------


def _sum(a: np.ndarray, axis: Any) -> np.ndarray:
    """a.sum(axis, keepdims=True), as a product with a ones vector when summing the last axis
    (or the rows of a matrix): for short rows BLAS is ~5x faster than np.sum (tinymm.bench)."""
    if axis == -1 or axis == a.ndim - 1:
        return (a @ _ones(a.shape[-1], a.dtype))[..., None]  # (..., n) -> (..., 1)
    if axis == 0 and a.ndim == 2:
        return (_ones(a.shape[0], a.dtype) @ a)[None]  # (m, n) -> (1, n)
    return a.sum(axis=axis, keepdims=True)


@functools.lru_cache(maxsize=256)
def _ones(n: int, dtype: np.dtype, value: float = 1.0) -> np.ndarray:
    """A read-only vector of n ones (or of n `value`s: 1/n makes a @ it a mean), made once."""
    ones = np.full(n, value, dtype)
    ones.flags.writeable = False
    return ones


def _mean(a: np.ndarray, axes: Any) -> np.ndarray:
    """a.mean(axes, keepdims=True), through `_sum` where it is faster; over axes (1, 3) of
    group norm's (N, HW, G, C/G) as a product with a ones vector over the HW positions, then
    a sum of each group's few channels: 7-30x faster than a.mean(axis=(1, 3)) at lesson 05's
    sizes (NumPy's reduction over two strided axes is slow)."""
    if axes in (-1, (-1,)):
        return _sum(a, -1) / a.shape[-1]
    if axes == (1, 3) and a.ndim == 4:
        n, positions, groups, width = a.shape
        sums = _ones(positions, a.dtype) @ a.reshape(n, positions, groups * width)  # (N, C)
        sums = sums.reshape(n, 1, groups, width).sum(axis=3, keepdims=True)  # (N, 1, G, 1)
        return sums / (positions * width)
    return a.mean(axis=axes, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_CUBIC = 0.044715


def gelu_tanh(x: Tensor) -> Tensor:
    """y = x/2 (1 + tanh u),  u = c (x + 0.044715 x^3),  c = sqrt(2/pi).

    dy/dx = (1 + t)/2 + x/2 (1 - t^2) du/dx,  t = tanh u,  du/dx = c (1 + 3 * 0.044715 x^2).
    Saved for backward: x and t. Each buffer is built in place (one pass per step, no
    temporaries: this op touches the widest activations of a transformer), by row blocks on
    two threads when large."""
    a = x.data
    tanh_u, out = np.empty_like(a), np.empty_like(a)

    def forward_rows(r):
        xr, t, y = a[r], tanh_u[r], out[r]
        u = xr * xr  # u = c x (1 + 0.044715 x^2), built in place:
        u *= _SQRT_2_OVER_PI * _GELU_CUBIC
        u += _SQRT_2_OVER_PI
        u *= xr
        np.tanh(u, out=t)
        np.add(t, 1, out=y)  # y = x/2 (1 + t), built in place
        y *= xr
        y *= 0.5

    parallel.rows(forward_rows, a)

    def backward(g):
        grad = np.empty_like(a)

        def backward_rows(r):
            xr, t, dx = a[r], tanh_u[r], grad[r]
            du_dx = xr * xr  # du/dx = c (1 + 3 * 0.044715 x^2), built in place
            du_dx *= 3 * _GELU_CUBIC * _SQRT_2_OVER_PI
            du_dx += _SQRT_2_OVER_PI
            np.multiply(t, t, out=dx)  # dx = g ((1 + t)/2 + x/2 (1 - t^2) du/dx), in place:
            np.subtract(1, dx, out=dx)
            dx *= du_dx
            dx *= xr
            dx += t
            dx += 1
            dx *= 0.5
            dx *= g[r]

        parallel.rows(backward_rows, a)
        return (grad,)

    return record("gelu", out, (x,), backward, saved=(x,))


def gelu_erf(x: Tensor) -> Tensor:
    """y = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 the standard normal CDF.

    dy/dx = Phi(x) + x phi(x),  phi(x) = e^{-x^2/2} / sqrt(2 pi), the normal density; the
    forward computes e^{-x^2/2} anyway (see `_normal_cdf_and_density`), so the backward is free."""
    a = x.data
    cdf, pdf = np.empty_like(a), np.empty_like(a)
    out = np.empty_like(a)

    def forward_rows(r):
        cdf[r], pdf[r] = _normal_cdf_and_density(a[r])
        np.multiply(a[r], cdf[r], out=out[r])

    parallel.rows(forward_rows, a)

    def backward(g):
        grad = np.empty_like(a)

        def backward_rows(r):
            np.multiply(g[r], cdf[r] + a[r] * pdf[r], out=grad[r])

        parallel.rows(backward_rows, a)
        return (grad,)

    return record("gelu", out, (x,), backward, saved=(x,))


# Abramowitz & Stegun 7.1.26: erf(z) = 1 - (a1 s + ... + a5 s^5) e^{-z^2}, s = 1 / (1 + p z),
# z >= 0, |error| <= 1.5e-7: float32's own rounding near 1. SciPy's erf is exact but runs a
# scalar loop, ~70x slower than NumPy's vectorised exp on this machine (11.7 vs 0.17 ms for 4M
# float32 values), which made the exact GELU the slowest op of a transformer step.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _normal_cdf_and_density(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Phi(x), phi(x)) for an array x. float64: SciPy's erf (exact). float32: A&S 7.1.26
    (|Phi error| <= 7.5e-8, below float32's spacing at 0.5), vectorised, buffers in place."""
    gaussian = np.multiply(x, x, out=np.empty_like(x))  # e^{-x^2/2} = e^{-z^2}, z = x / sqrt 2
    gaussian *= -0.5
    np.exp(gaussian, out=gaussian)
    pdf = gaussian * (1 / math.sqrt(2 * math.pi))
    if x.dtype != np.float32:
        return 0.5 * (1 + erf(x / math.sqrt(2))), pdf
    s = np.abs(x, out=np.empty_like(x))  # s = 1 / (1 + p |z|)
    s *= _AS_P / math.sqrt(2)
    s += 1
    np.reciprocal(s, out=s)
    tail = np.multiply(s, _AS_A[4], out=np.empty_like(s))  # Horner: a1 s + ... + a5 s^5 ...
    for coefficient in _AS_A[3::-1]:
        tail += coefficient
        tail *= s
    tail *= gaussian  # ... times e^{-z^2} = erfc(|z|)
    tail *= 0.5  # erfc(|z|) / 2 = Phi(-|x|), the normal's tail beyond |x|
    cdf = np.subtract(0.5, tail, out=tail)  # Phi(x) = 1/2 + sign(x) (1/2 - Phi(-|x|)):
    np.copysign(cdf, x, out=cdf)  # (branch-free: np.where on a random mask was 6x slower)
    cdf += 0.5
    return cdf, pdf


def silu(x: Tensor) -> Tensor:
    """y = x s, s = sigmoid(x) = 1 / (1 + e^{-x});  dy/dx = s + x s (1 - s) = s (1 + x (1 - s)).

    s is computed as (1 + tanh(x/2)) / 2, the same function: no overflow for large -x, and on
    this machine ~25x faster than through np.logaddexp (1.7 vs 43 ms for 786k float32 values,
    the widest activation of lesson 05's U-Net step, which called it 20 times). Buffers built
    in place, by row blocks on two threads when large (as gelu_tanh)."""
    a = x.data
    s, out = np.empty_like(a), np.empty_like(a)

    def forward_rows(r):
        np.multiply(a[r], 0.5, out=s[r])  # s = (1 + tanh(x/2)) / 2, built in place
        np.tanh(s[r], out=s[r])
        s[r] *= 0.5
        s[r] += 0.5
        np.multiply(a[r], s[r], out=out[r])

    parallel.rows(forward_rows, a)

    def backward(g):
        grad = np.empty_like(a)

        def backward_rows(r):
            dx = grad[r]
            np.subtract(1, s[r], out=dx)  # dx = g s (1 + x (1 - s)), built in place
            dx *= a[r]
            dx += 1
            dx *= s[r]
            dx *= g[r]

        parallel.rows(backward_rows, a)
        return (grad,)

    return record("silu", out, (x,), backward, saved=(x,))


# ----------------------------------------------------------------------------------------------
# Softmax family (stable: subtract the max before exp)
# ----------------------------------------------------------------------------------------------


def softmax(x: Tensor, axis: int) -> Tensor:
    """y = softmax(x).  dx = J^T g with J = diag(y) - y y^T, i.e.  dx = y * (g - sum(g * y)).

    A row that is entirely -inf gives uniform weights and a zero gradient (`_empty_rows`)."""
    a, empty = _empty_rows(x.data, axis)
    exp_shifted = np.exp(a - a.max(axis=axis, keepdims=True))
    y = exp_shifted / _sum(exp_shifted, axis)

    def backward(g):
        return (_zero_where(empty, y * (g - _sum(g * y, axis))),)

    return record("softmax", y, (x,), backward)


def log_softmax(x: Tensor, axis: int) -> Tensor:
    """y = x - logsumexp(x).  dy_i/dx_j = delta_ij - softmax_j, so dx = g - softmax(x) sum(g).

    A row that is entirely -inf gives log(1/n) and a zero gradient (`_empty_rows`)."""
    a, empty = _empty_rows(x.data, axis)
    y = _log_softmax(a, axis)
    return record(
        "log_softmax", y, (x,), lambda g: (_zero_where(empty, g - np.exp(y) * _sum(g, axis)),)
    )


def logsumexp(x: Tensor, axis: int, keepdims: bool) -> Tensor:
    """y = log sum_i e^{x_i}.  dy/dx_i = e^{x_i} / sum_j e^{x_j} = softmax(x)_i.

    A row that is entirely -inf gives -inf (log 0, as PyTorch) and a zero gradient."""
    a, empty = _empty_rows(x.data, axis)
    lse = _logsumexp(a, axis)
    if empty is not None:
        lse[empty] = -np.inf
    out = lse if keepdims else np.squeeze(lse, axis=axis)

    def backward(g):
        g = g if keepdims else np.expand_dims(g, axis)
        return (_zero_where(empty, g * np.exp(_log_softmax(a, axis))),)  # not exp(x - lse)

    return record("logsumexp", out, (x,), backward, saved=(x,))


def _empty_rows(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows along `axis` that are entirely -inf ("nothing allowed"), where x - max(x) would be
    -inf - (-inf) = NaN: returns a with those rows set to 0 (so softmax is uniform there) and
    their mask (keepdims), or a itself and None when there is no such row (the usual case)."""
    empty = np.isneginf(a.max(axis=axis, keepdims=True))
    if not empty.any():
        return a, None
    return np.where(empty, np.zeros((), a.dtype), a), empty


def _zero_where(empty: np.ndarray | None, grad: np.ndarray) -> np.ndarray:
    """The gradient with the rows of `empty` (an all -inf input row) set to 0."""
    return grad if empty is None else np.where(empty, np.zeros((), grad.dtype), grad)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return m + np.log(_sum(np.exp(a - m), axis))


def _log_softmax(a: np.ndarray, axis: int) -> np.ndarray:
    """(x - m) - log sum e^{x - m}: x - m is exact, so this keeps its precision for |x| ~ 1e4,
    where x - logsumexp(x) would lose it (logsumexp is rounded at the scale of x).
    The caller has replaced rows that are entirely -inf (`_empty_rows`)."""
    shifted = a - a.max(axis=axis, keepdims=True)
    return shifted - np.log(_sum(np.exp(shifted), axis))


def cross_entropy(
    logits: Tensor, targets: np.ndarray, ignore_index: int, label_smoothing: float
) -> Tensor:
    """loss = (1/n) sum over the n kept rows of -sum_c q_c log p_c,  p = softmax(z),
    q = (1 - eps) onehot(t) + eps / C.

    d loss / dz = (p - q) / n on kept rows, 0 on ignored ones (sum_c q_c = 1 makes the softmax's
    Jacobian collapse to p - q). logits (..., C), targets (...) already checked by functional."""
    n_classes = logits.shape[-1]
    z = logits.data.reshape(-1, n_classes)
    t = targets.reshape(-1)
    kept = t != ignore_index
    count = int(kept.sum())
    z, empty = _empty_rows(z, -1)  # a row of -inf logits: uniform p, no gradient
    log_p = _log_softmax(z, -1)
    safe_t = np.where(kept, t, 0)
    rows = np.arange(len(t))
    eps = label_smoothing
    per_row = -(1 - eps) * log_p[rows, safe_t]
    if eps:  # (not 0 * sum: a logit of -inf makes that sum -inf, and 0 * -inf is NaN)
        per_row -= (eps / n_classes) * log_p.sum(-1)
    loss = np.asarray((per_row * kept).sum() / max(count, 1), dtype=logits.dtype)

    def backward(g):
        grad = np.exp(log_p) - eps / n_classes  # p - eps / C
        grad[rows, safe_t] -= 1 - eps  # p - q
        grad *= (kept * (g / max(count, 1)))[:, None]
        grad = _zero_where(empty, grad)
        return (grad.reshape(logits.shape).astype(logits.dtype, copy=False),)

    return record("cross_entropy", loss, (logits,), backward)


# ----------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """y = xhat w + b, xhat = (x - mean) / sqrt(var + eps) over the last axis.

    With gh = g w (the gradient reaching xhat) and means over the last axis:
        dx = (gh - mean(gh) - xhat mean(gh xhat)) / sqrt(var + eps)
        dw = sum over rows of g xhat,   db = sum over rows of g."""
    xhat, rstd = _normalise(x.data, -1, eps)
    return _affine("layer_norm", x, xhat, rstd, weight, bias, lambda a: a, -1)


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """layer_norm's kernel per group: x (N, H, W, C) seen as (N, HW, G, C/G), normalised over
    axes (1, 3), then a per-channel affine; the same backward over the same axes."""
    n, h, w, c = x.shape
    grouped = (n, h * w, num_groups, c // num_groups)  # (N, H, W, C) -> (N, HW, G, C/G)
    xhat, rstd = _normalise(x.data.reshape(grouped), (1, 3), eps)
    return _affine(
        "group_norm",
        x,
        xhat.reshape(x.shape),
        rstd,
        weight,
        bias,
        lambda a: a.reshape(grouped),
        (1, 3),
    )


def _normalise(a: np.ndarray, axes: Any, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """xhat = (a - mean) / sqrt(var + eps) and rstd = 1 / sqrt(var + eps), over `axes`.

    One thread: split over two (tinymm.parallel) a layer norm was no faster, its many short
    NumPy calls each waiting for the GIL (measured up to 2M elements)."""
    centred = a - _mean(a, axes)
    rstd = 1 / np.sqrt(_mean(centred * centred, axes) + eps)
    xhat = np.multiply(centred, rstd, out=centred)  # the centred values are not needed again
    return xhat, rstd


def _affine(op, x, xhat, rstd, weight, bias, grouped, axes) -> Tensor:
    """y = xhat w + b, and the backward shared by layer and group norm; `grouped(a)` views an
    array of x's shape with the normalised axes as `axes` (identity for layer norm)."""
    out = xhat * weight.data if weight is not None else xhat.copy()
    if bias is not None:
        out += bias.data
    inputs = tuple(t for t in (x, weight, bias) if t is not None)

    def backward(g):
        g_xhat = grouped(g * weight.data if weight is not None else g)  # gh = g w
        xhat_g = grouped(xhat)
        gx = xhat_g * _mean(g_xhat * xhat_g, axes)  # dx built in place: xhat mean(gh xhat),
        np.subtract(g_xhat, gx, out=gx)  # gh - xhat mean(gh xhat),
        gx -= _mean(g_xhat, axes)  # gh - mean(gh) - xhat mean(gh xhat),
        gx *= rstd  # all / sqrt(var + eps)
        grads = [gx.reshape(x.shape)]
        g_rows = _rows(g)  # (N, ..., C) -> (rows, C): sums over rows are GEMVs
        if weight is not None:
            grads.append(_sum(g_rows * xhat.reshape(g_rows.shape), 0)[0])  # dw
        if bias is not None:
            grads.append(_sum(g_rows, 0)[0])  # db
        return grads

    return record(op, out.astype(x.dtype, copy=False), inputs, backward, saved=inputs[1:])


# ----------------------------------------------------------------------------------------------
# Linear and convolution
# ----------------------------------------------------------------------------------------------


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """z = x W + b with the leading axes folded into one GEMM: (N, ..., in) -> (N*..., in).

    dx = g W^T,  dW = x^T g,  db = sum of g's rows. The input and weight gradients are two
    products of the same size: they run at once on the two threads (tinymm.parallel.both)."""
    lead = x.shape[:-1]
    x_rows = _rows(x.data)  # (N, ..., in) -> (N*..., in)
    out = parallel.matmul(x_rows, weight.data, None if bias is None else bias.data)
    inputs = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        g_rows = _rows(g)

        def weight_grads():
            gw = parallel.matmul(x_rows.T, g_rows) if weight.requires_grad else None
            return gw, None if bias is None else _sum(g_rows, 0)[0]

        def input_grad():
            return (g_rows @ weight.data.T).reshape(x.shape)

        if not x.requires_grad:  # e.g. the first layer: only dW, split by rows
            gx, (gw, gb) = None, weight_grads()
        else:  # dx here, dW and db on the other thread
            gx, (gw, gb) = parallel.both(input_grad, weight_grads, g_rows.size * x_rows.shape[1])
        return (gx, gw) if bias is None else (gx, gw, gb)

    return record("linear", out.reshape(*lead, -1), inputs, backward, saved=(x, weight))


def windows(a: np.ndarray, kh: int, kw: int, stride: int) -> np.ndarray:
    """A strided view (N, Ho, Wo, kh, kw, C) of every kh x kw window of a (N, H, W, C): no copy."""
    n, h, w, c = a.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    sn, sh, sw, sc = a.strides
    return as_strided(
        a, (n, ho, wo, kh, kw, c), (sn, sh * stride, sw * stride, sh, sw, sc), writeable=False
    )


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """im2col: every window becomes a row of kh*kw*C_in values (one strided view, one copy), and
    the convolution is one matmul  cols (N Ho Wo, kh kw C_in) @ W (kh kw C_in, C_out).

    dW = cols^T g.  dx: each kernel offset (i, j) sent g @ W[i, j]^T to the input pixels it read,
    so dx adds g @ W[i, j]^T into those shifted positions: kh*kw matmuls, no scatter.
    As in `linear`, dx and dW are computed at once, one on each of two threads."""
    kh, kw, c_in, c_out = weight.shape
    p = padding
    pointwise = kh == kw == 1 and stride == 1 and not p  # a 1x1 conv: the pixels are the rows
    x_padded = np.pad(x.data, ((0, 0), (p, p), (p, p), (0, 0))) if p else x.data
    window_view = windows(x_padded, kh, kw, stride)  # (N, Ho, Wo, kh, kw, C_in), no copy
    n, ho, wo = window_view.shape[:3]
    if pointwise:
        cols = np.ascontiguousarray(x_padded)  # (no copy unless x is a strided view)
    else:
        cols = np.empty(window_view.shape, x_padded.dtype)
        parallel.rows(lambda r: np.copyto(cols[r], window_view[r]), cols)  # the copy, by images
    cols = cols.reshape(n * ho * wo, kh * kw * c_in)
    w_matrix = weight.data.reshape(kh * kw * c_in, c_out)
    out = parallel.matmul(cols, w_matrix, None if bias is None else bias.data)
    inputs = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        g_rows = g.reshape(-1, c_out)

        def weight_grad():  # dW = cols^T g, computed as (g^T cols)^T (BLAS was ~8% faster so)
            return parallel.matmul(g_rows.T, cols).T.reshape(weight.shape)

        def input_grad(split: bool = True):  # split: over the threads (by rows, by images)
            if pointwise:  # dx = g W^T, nothing to shift
                product = parallel.matmul if split else np.matmul
                return product(g_rows, w_matrix.T).reshape(x.shape)
            gx_padded = np.zeros(x_padded.shape, dtype=x_padded.dtype)

            def dx_images(r):  # the input gradient of the images r
                g_r, gx_r = g[r].reshape(-1, c_out), gx_padded[r]
                for i in range(kh):
                    for j in range(kw):
                        rows = slice(i, i + stride * (ho - 1) + 1, stride)
                        columns = slice(j, j + stride * (wo - 1) + 1, stride)
                        gx_ij = g_r @ weight.data[i, j].T  # (N_r Ho Wo, C_in)
                        gx_r[:, rows, columns] += gx_ij.reshape(-1, ho, wo, c_in)

            parallel.rows(dx_images, gx_padded) if split else dx_images(...)
            return gx_padded[:, p : p + x.shape[1], p : p + x.shape[2]] if p else gx_padded

        if x.requires_grad and weight.requires_grad:  # dx here while dW runs on another thread
            macs = g_rows.size * cols.shape[1]  # (one product each, not split: 5-10% faster)
            gx, gw = parallel.both(lambda: input_grad(split=False), weight_grad, macs)
        else:
            gx = input_grad() if x.requires_grad else None
            gw = weight_grad() if weight.requires_grad else None
        grads = [gx, gw]
        if bias is not None:
            grads.append(_sum(g_rows, 0)[0])
        return grads

    return record("conv2d", out.reshape(n, ho, wo, c_out), inputs, backward, saved=(x, weight))


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, allowed: np.ndarray | None) -> tuple[Tensor, Any]:
    """out = P V,  P = softmax(S) over the keys,  S = Q K^T / sqrt(d); blocked keys get -inf
    (the float's lowest value, so a row with nothing allowed becomes uniform, not NaN).

    Backward, per sequence, with g = dL/d out:
        dV = P^T g
        dP = g V^T
        dS = P * (dP - sum_keys(dP * P))           (softmax's Jacobian, as in `softmax`)
        dQ = dS K / sqrt(d),   dK = dS^T Q / sqrt(d)

    Layout: the weights are kept transposed and keys first, as one matrix (L_k, B L_q) over the
    whole batch B. The softmax over the keys of every query then runs down its columns, each
    step one NumPy operation over rows of length B L_q: 3-7x faster than one short row of L_k
    numbers per query. `_per_sequence` views the same memory as (..., L_k, L_q) for the matmuls.
    Returns (out, P^T per sequence) so that functional can hand P to figures.
    """
    out, weights_seq, backward = _attention(q.data, k.data, v.data, allowed)
    return record("attention", out, (q, k, v), backward, saved=(q, k, v)), weights_seq


def multi_head_attention(qkv: Tensor, heads: int, allowed: np.ndarray | None) -> tuple[Tensor, Any]:
    """Self-attention of every head on packed projections: qkv (N, L, 3D) = [Q | K | V] ->
    (N, L, D), head h on columns h d..(h+1) d of each of Q, K, V (d = D / heads), the heads'
    outputs side by side. `attention` above on views, nothing copied to split or merge heads:

    - head h of Q is read where it lies in qkv (its rows 3D numbers apart, which BLAS takes);
    - P V is written straight into (N, L, heads, d), which is (N, L, D) with the heads merged;
    - the backward writes dQ, dK, dV into one (N, L, 3, heads, d) gradient: one array back to
      the one product that made qkv (three projections would each get one, to be summed).
    Returns (out, P^T per sequence) as `attention`."""
    n, length, width = qkv.shape
    parts = qkv.data.reshape(n, length, 3, heads, width // 3 // heads)  # (N, L, [q k v], h, d)
    q, k, v = (parts[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (N, heads, L, d) views
    merged = np.empty((n, length, *parts.shape[3:]), parts.dtype)  # (N, L, heads, d)
    _, weights_seq, backward_heads = _attention(q, k, v, allowed, out=merged.transpose(0, 2, 1, 3))

    def backward(g):  # g (N, L, D) -> dqkv (N, L, 3D)
        grad = np.empty(parts.shape, parts.dtype)
        g_heads = g.reshape(merged.shape).transpose(0, 2, 1, 3)  # (N, heads, L, d)
        backward_heads(g_heads, into=[grad[:, :, i].transpose(0, 2, 1, 3) for i in range(3)])
        return (grad.reshape(qkv.shape),)

    out = merged.reshape(n, length, width // 3)
    return record("multi_head_attention", out, (qkv,), backward, saved=(qkv,)), weights_seq


def _attention(qd, kd, vd, allowed, out=None) -> tuple[np.ndarray, np.ndarray, Any]:
    """`attention` on arrays: (P V, P^T per sequence, backward), P V written into `out` if given.
    backward(g, into=(None, None, None)) returns (dQ, dK, dV), each written into its array of
    `into` where one is given."""
    lq, lk = qd.shape[-2], kd.shape[-2]
    batch = _broadcast_shape(qd.shape[:-2], kd.shape[:-2], vd.shape[:-2])
    dtype = np.result_type(qd, kd, vd)
    q_scaled = qd * (1.0 / math.sqrt(qd.shape[-1]))  # Q / sqrt(d)
    k_scaled = kd * (1.0 / math.sqrt(qd.shape[-1]))  # K / sqrt(d), for dQ
    keys_axis = (*range(1, len(batch) + 1), 0, len(batch) + 1)  # as np.moveaxis(0 -> -2)

    def per_sequence(keys_first: np.ndarray) -> np.ndarray:  # (L_k, B L_q) -> (..., L_k, L_q)
        return keys_first.reshape(lk, *batch, lq).transpose(keys_axis)

    scores_t = np.empty((lk, math.prod(batch) * lq), dtype)  # S^T, keys first
    parallel.matmul(kd, np.swapaxes(q_scaled, -1, -2), out=per_sequence(scores_t))  # K Q^T/sqrt d
    nothing_allowed = None  # the queries (columns) that may attend to no key at all
    if allowed is not None:  # (..., L_q, L_k) -> keys first, as scores_t
        keys_first = (len(batch) + 1, *range(len(batch) + 1))  # as np.moveaxis(-1 -> 0)
        blocked = np.broadcast_to(~allowed, (*batch, lq, lk)).transpose(keys_first)
        blocked = blocked.reshape(scores_t.shape)
        np.copyto(scores_t, np.finfo(dtype).min, where=blocked)
        nothing_allowed = blocked.all(axis=0)
        nothing_allowed = nothing_allowed if nothing_allowed.any() else None

    weights_t = np.empty_like(scores_t)  # P^T, keys first

    def softmax_over_keys(cols):  # P^T[:, cols] = softmax of S^T[:, cols] down each column
        scores, weights = scores_t[:, cols], weights_t[:, cols]
        np.subtract(scores, scores.max(axis=0), out=weights)  # P^T built in place: S - max,
        np.exp(weights, out=weights)  # e^{S - max},
        weights /= _sum(weights, 0)  # e^{S - max} / sum over keys

    parallel.rows(softmax_over_keys, weights_t.T)
    weights_seq = per_sequence(weights_t)  # P^T per sequence (..., L_k, L_q)
    out = parallel.matmul(np.swapaxes(weights_seq, -1, -2), vd, out=out)  # P V

    def backward(g, into=(None, None, None)):
        gv = parallel.matmul(weights_seq, g, out=into[2])  # dV = P^T g
        g_weights_t = np.empty_like(weights_t)  # dP^T = V g^T, keys first as P^T
        parallel.matmul(vd, np.swapaxes(g, -1, -2), out=per_sequence(g_weights_t))
        g_scores_t = np.empty_like(weights_t)  # dS^T

        def softmax_backward(cols):  # dS^T = P^T * (dP^T - sum_keys(dP^T * P^T))
            p, dp, ds = weights_t[:, cols], g_weights_t[:, cols], g_scores_t[:, cols]
            np.multiply(dp, p, out=ds)  # dS^T built in place: dP^T P^T,
            np.subtract(dp, _sum(ds, 0), out=ds)  # dP^T - sum_keys(dP^T P^T),
            ds *= p  # times P^T

        parallel.rows(softmax_backward, weights_t.T)
        if nothing_allowed is not None:  # their uniform weights do not depend on Q or K
            g_scores_t[:, nothing_allowed] = 0
        g_scores_seq = per_sequence(g_scores_t)  # dS^T per sequence (..., L_k, L_q)
        g_scores = np.swapaxes(g_scores_seq, -1, -2)  # dS per sequence (..., L_q, L_k)
        gq = parallel.matmul(g_scores, k_scaled, out=into[0])  # dQ = dS K / sqrt(d)
        gk = parallel.matmul(g_scores_seq, q_scaled, out=into[1])  # dK = dS^T Q / sqrt(d)
        return gq, gk, gv

    return out, weights_seq, backward
