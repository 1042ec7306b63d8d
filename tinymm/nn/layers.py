"""Layers: each holds its Parameters and calls one function of tinymm.functional.

Initialisation follows PyTorch's defaults, so results compare with PyTorch models of the same size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import functional as F
from ..tensor import DEFAULT_DTYPE, Tensor, default_rng
from .module import Module, Parameter


def check_sizes(layer: str, **sizes: Any) -> None:
    """Each size (features, channels, heads, a kernel) must be an integer >= 1."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{layer}: {name} must be an integer >= 1, got {value!r}")


def _uniform(shape: tuple, bound: float) -> Parameter:
    return Parameter(default_rng().uniform(-bound, bound, shape).astype(DEFAULT_DTYPE))


class Linear(Module):
    """z = x W + b with W (in, out), as the lecture's z_p = x_p E.

    Init as PyTorch: W and b ~ U(-1/sqrt(in), 1/sqrt(in)). PyTorch's nn.Linear stores the
    transpose, weight (out, in), and computes x W^T + b: the same layer, the other layout.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        check_sizes("Linear", in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features)
        self.weight = _uniform((in_features, out_features), bound)
        self.bias = _uniform((out_features,), bound) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A table of `num` learned vectors of size `dim`, looked up by integer id. Init N(0, 1)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        check_sizes("Embedding", num=num, dim=dim)
        self.num, self.dim = num, dim
        self.weight = Parameter(default_rng().standard_normal((num, dim)).astype(DEFAULT_DTYPE))

    def forward(self, ids: np.ndarray) -> Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num}, {self.dim}"


class LayerNorm(Module):
    """Normalise the last axis to mean 0, variance 1, then scale and shift (weight 1, bias 0)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        check_sizes("LayerNorm", dim=dim)
        self.dim, self.eps = dim, eps
        self.weight = Parameter(np.ones(dim, dtype=DEFAULT_DTYPE))
        self.bias = Parameter(np.zeros(dim, dtype=DEFAULT_DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        shape = np.shape(x)
        if not shape or shape[-1] != self.dim:
            raise ValueError(
                f"LayerNorm({self.dim}) normalises a last axis of dim={self.dim}, but x has "
                f"shape {shape} (last axis {shape[-1] if shape else 'missing'})"
            )
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}"


class GroupNorm(Module):
    """Normalise groups of channels of (N, H, W, C) images, then a per-channel affine."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        check_sizes("GroupNorm", num_groups=num_groups, num_channels=num_channels)
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: num_channels={num_channels} do not split into "
                f"num_groups={num_groups} groups"
            )
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = Parameter(np.ones(num_channels, dtype=DEFAULT_DTYPE))
        self.bias = Parameter(np.zeros(num_channels, dtype=DEFAULT_DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        shape = np.shape(x)
        if len(shape) != 4 or shape[-1] != self.num_channels:
            raise ValueError(
                f"GroupNorm(num_channels={self.num_channels}) expects x of shape (N, H, W, "
                f"{self.num_channels}), got {shape}"
            )
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}"


class Dropout(Module):
    """Zero activations with probability p while training; identity in eval mode.
    p = 0.5 by default, as PyTorch's nn.Dropout."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p, the dropout probability, must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Conv2d(Module):
    """2-D convolution of channels-last images; weight (k, k, C_in, C_out).

    PyTorch's nn.Conv2d takes (N, C, H, W) and stores weight (C_out, C_in, k, k); tinymm keeps
    images as the lecture writes them, (N, H, W, C), and the weight in matching order.

    Init as PyTorch: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C_in * k * k.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ):
        super().__init__()
        check_sizes(
            "Conv2d",
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=stride,
        )
        if isinstance(padding, bool) or not isinstance(padding, int | np.integer) or padding < 0:
            raise ValueError(f"Conv2d: padding must be an integer >= 0, got {padding!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        bound = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight = _uniform((kernel_size, kernel_size, in_channels, out_channels), bound)
        self.bias = _uniform((out_channels,), bound) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        shape = np.shape(x)
        if len(shape) != 4 or shape[-1] != self.in_channels:
            raise ValueError(
                f"Conv2d(in_channels={self.in_channels}) expects x of shape (N, H, W, "
                f"{self.in_channels}), got {shape}"
            )
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )


_ACTIVATIONS = {
    "gelu": F.gelu,  # exact, x Phi(x): PyTorch's nn.GELU()
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # nn.GELU(approximate="tanh")
    "relu": F.relu,
    "silu": F.silu,
    "tanh": Tensor.tanh,
}


class MLP(Module):
    """Two linear layers with an activation between: fc2(act(fc1(x))).

    activation: "gelu" (exact, the default, as PyTorch), "gelu_tanh", "relu", "silu", "tanh"."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, activation: str = "gelu"):
        super().__init__()
        check_sizes("MLP", dim=dim, hidden=hidden, **({} if out is None else {"out": out}))
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"MLP: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        self.activation = activation
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_ACTIVATIONS[self.activation](self.fc1(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
