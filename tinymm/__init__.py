"""tinymm: a small, readable NumPy-only autograd framework for learning multimodal models.

import tinymm as tm
x = tm.tensor([1.0, 2.0, 3.0], requires_grad=True)
(x * x).sum().backward()      # x.grad == 2 x
"""

from . import functional
from .tensor import (
    DEFAULT_DTYPE,
    Tensor,
    arange,
    concatenate,
    default_rng,
    is_grad_enabled,
    manual_seed,
    matmul,
    maximum,
    minimum,
    no_grad,
    ones,
    ones_like,
    pad,
    randn,
    split,
    stack,
    tensor,
    where,
    zeros,
    zeros_like,
)

__all__ = [
    "DEFAULT_DTYPE",
    "Tensor",
    "arange",
    "concatenate",
    "default_rng",
    "functional",
    "is_grad_enabled",
    "manual_seed",
    "matmul",
    "maximum",
    "minimum",
    "no_grad",
    "ones",
    "ones_like",
    "pad",
    "randn",
    "split",
    "stack",
    "tensor",
    "where",
    "zeros",
    "zeros_like",
]
