"""Module and Parameter: how layers hold their weights, find each other, save and load.

A `Module` registers every `Parameter` and every sub-module assigned to one of its attributes, so
`model.parameters()` finds all weights of a tree of modules and `state_dict()` names them by
their path: `blocks.0.attn.q_proj.weight`. Every parameter carries that name as `p.name` (for
figures, `tinymm.viz.draw_graph`, and error messages, `tinymm.gradcheck.gradcheck_module`): it is
its name in the outermost module that holds it, kept up to date whenever a parameter or a module
is assigned anywhere in the tree.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..tensor import Tensor


class Parameter(Tensor):
    """A tensor that is a weight of a module: it always requires grad."""

    __slots__ = ()

    def __init__(self, data: Any, dtype: Any = None):
        super().__init__(data, requires_grad=True, dtype=dtype)

    def __repr__(self) -> str:
        return "Parameter(" + super().__repr__()[len("tensor(") :]


class Module:
    """Base class of every layer and model: subclasses set attributes and define forward()."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parent", None)  # weakref to the module this one is part of

    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(
                f"{type(self).__name__}: call super().__init__() before setting attributes"
            )
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
            object.__setattr__(value, "_parent", weakref.ref(self))
        object.__setattr__(self, name, value)
        if isinstance(value, Parameter | Module):
            self._root()._name_parameters()

    def _root(self) -> Module:
        """The outermost module this one is (through its parents) a part of."""
        module, seen = self, {id(self)}
        while module._parent is not None and (parent := module._parent()) is not None:
            if id(parent) in seen:
                break
            module = parent
            seen.add(id(module))
        return module

    def _name_parameters(self) -> None:
        """p.name = its dotted name in this module, for every parameter of the tree."""
        for name, p in self.named_parameters():
            p.name = name

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy and pickle: no weak references
        return {**self.__dict__, "_parent": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for module in self._modules.values():  # the copies of the children: parent is the copy
            object.__setattr__(module, "_parent", weakref.ref(self))

    def __delattr__(self, name: str) -> None:
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # --- the tree ------------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, module in self._modules.items():
            yield from module.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) for every parameter in the tree, each once."""
        seen: set[int] = set()
        for path, module in self.named_modules():
            for name, p in module._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}" if path else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # --- dtype -----------------------------------------------------------------------------------
    def to(self, dtype: Any) -> Module:
        """Cast every parameter (and its gradient, if any) to the floating dtype, in place.

        The Parameter objects stay the same (an optimizer or a figure holding them still does),
        only their `.data` becomes a new array; build an optimizer after the cast, since its
        buffers keep the old dtype. Returns self, so `model = ViT(...).double()` reads well."""
        try:
            target = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"{type(self).__name__}.to: {dtype!r} is not a dtype") from None
        if target.kind != "f":
            raise TypeError(
                f"{type(self).__name__}.to: parameters need a floating dtype "
                f"(float32, float64), got {target}"
            )
        for p in self.parameters():
            if p.data.dtype != target:
                p._bump("to")  # a graph that saved p notices that p changed
                p.data = p.data.astype(target)
                if p.grad is not None:
                    p.grad = p.grad.astype(target)
        return self

    def double(self) -> Module:
        """Every parameter to float64 (as gradcheck needs): `self.to(np.float64)`."""
        return self.to(np.float64)

    def float(self) -> Module:
        """Every parameter to float32, tinymm's default: `self.to(np.float32)`."""
        return self.to(np.float32)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> Module:
        """Set training mode (dropout on) for the whole tree; eval() turns it off."""
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """name -> a copy of the parameter's array."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(
        self, state_dict: dict[str, Any], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Copy arrays into the parameters of the same names.

        Any shape mismatch is an error; with strict=True so is any missing or unexpected key.
        One error lists every problem. Returns (missing, unexpected) keys.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = [
            f"{k}: checkpoint {np.shape(state_dict[k])}, model {own[k].shape}"
            for k in own
            if k in state_dict and np.shape(state_dict[k]) != own[k].shape
        ]
        problems = []
        if mismatched:
            problems.append("shape mismatch:\n    " + "\n    ".join(mismatched))
        if strict and missing:
            problems.append("missing keys:\n    " + "\n    ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys:\n    " + "\n    ".join(unexpected))
        if problems:
            raise RuntimeError(
                f"load_state_dict into {type(self).__name__} failed:\n  " + "\n  ".join(problems)
            )
        for k, p in own.items():
            if k in state_dict:
                value = state_dict[k]
                p.copy_(value.data if isinstance(value, Tensor) else value)
        return missing, unexpected

    # --- printing ------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        head = f"{type(self).__name__}({self.extra_repr()})"
        count = self.num_parameters()
        if not self._modules:
            return f"{head}  # {count:,} params" if count else head
        lines = [f"{type(self).__name__}({self.extra_repr()}  # {count:,} params"]
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        return "\n".join(lines) + "\n)"


class ModuleList(Module):
    """A list of modules whose parameters are registered (named 0, 1, 2, ...)."""

    def __init__(self, modules: Iterable[Module] = ()):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> ModuleList:
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__} holds Modules, got {type(module).__name__}")
        setattr(self, str(len(self._modules)), module)
        return self

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]


class Sequential(ModuleList):
    """Modules applied one after the other: Sequential(a, b, c)(x) = c(b(a(x)))."""

    def __init__(self, *modules: Module):
        super().__init__(modules)

    def forward(self, x: Any) -> Any:
        for module in self:
            x = module(x)
        return x
