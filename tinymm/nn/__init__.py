"""Layers with PyTorch's names: Module, Parameter, Linear, LayerNorm, MultiHeadAttention, ..."""

from .attention import MultiHeadAttention, TransformerBlock
from .layers import MLP, Conv2d, Dropout, Embedding, GroupNorm, LayerNorm, Linear
from .module import Module, ModuleList, Parameter, Sequential

__all__ = [
    "MLP",
    "Conv2d",
    "Dropout",
    "Embedding",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "Module",
    "ModuleList",
    "MultiHeadAttention",
    "Parameter",
    "Sequential",
    "TransformerBlock",
]
