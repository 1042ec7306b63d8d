"""tinymm: a small, readable NumPy-only autograd framework for learning multimodal models.

import tinymm as tm
x = tm.tensor([1.0, 2.0, 3.0], requires_grad=True)
(x * x).sum().backward()      # x.grad == 2 x
"""

from . import audio, data, functional, models, nn, optim, runtime
from .anomaly import detect_anomaly, is_anomaly_enabled
from .gradcheck import gradcheck, gradcheck_module
from .io import load, save
from .modes import is_reference_mode, reference_mode
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
    "audio",
    "concatenate",
    "data",
    "default_rng",
    "detect_anomaly",
    "functional",
    "gradcheck",
    "gradcheck_module",
    "is_anomaly_enabled",
    "is_grad_enabled",
    "is_reference_mode",
    "load",
    "manual_seed",
    "matmul",
    "maximum",
    "minimum",
    "models",
    "nn",
    "no_grad",
    "ones",
    "ones_like",
    "optim",
    "pad",
    "randn",
    "runtime",
    "reference_mode",
    "save",
    "split",
    "stack",
    "tensor",
    "where",
    "zeros",
    "zeros_like",
]
