"""Optimizers (SGD, Adam, AdamW), gradient clipping and the warmup + cosine learning-rate schedule.

After `loss.backward()` every parameter p holds its gradient g = dL/dp in `p.grad`. An optimizer
moves each p a little against g, in place (`p.sub_`, `p.mul_`, `p.copy_`: the version counter
moves, so a graph that saved p notices), inside `no_grad`. It may keep buffers per parameter
(momentum, moment estimates) in `optimizer.state`.

    opt = AdamW(model.parameters(), lr=3e-4)
    for step in range(total):
        set_lr(opt, cosine_schedule(step, total, warmup=100, base_lr=3e-4))
        opt.zero_grad()
        loss = ...; loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

Parameter groups give different parameters different hyper-parameters, e.g. no weight decay for
biases, norms and embeddings (`weight_decay_groups(model, 0.05)` makes these two groups):

    AdamW([{"params": weights}, {"params": biases_and_norms, "weight_decay": 0.0}], lr=3e-4)

Semantics and defaults are PyTorch's (torch.optim.SGD / Adam / AdamW), so results carry over.
Each optimizer writes its formula once, for one parameter: `_update(p, grad, state, group)`.
Because that formula is elementwise, `step` runs it once per group instead of once per
parameter whenever it can (every parameter has a gradient, one dtype, one step count): on the
group's parameters laid end to end in one flat array, with flat moment buffers of which each
`state[p]["exp_avg"]` is a view (`_FlatGroup`). The numbers are the same; a model with many
small parameters then costs a handful of NumPy calls per group instead of per parameter.
`foreach=False` (PyTorch's name for the same switch) keeps the plain loop over parameters, which
is also what runs in reference mode and under a debugger, so stepping into `opt.step()` lands
in `_update` for one parameter of its own shape.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .modes import single_threaded
from .tensor import Tensor, no_grad

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


class Optimizer:
    """Base class: parameter groups, `zero_grad`, `step`, and a flat `state_dict` for checkpoints.

    A subclass sets `defaults` (its hyper-parameters), `state_names` (the per-parameter buffers
    it keeps) and writes `_update(p, grad, state, group)` for one parameter. It sets
    `elementwise = True` if that update treats every entry of p on its own (no norms, no
    shapes): then `step` may run it once on all of a group's parameters laid end to end.
    foreach: True: that flat update whenever possible; False: always one parameter at a time;
    None (default): flat, except in reference mode or under a debugger.
    """

    state_names: tuple[str, ...] = ()
    elementwise = False

    def __init__(self, params: ParamsT, defaults: dict[str, Any], foreach: bool | None = None):
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors (e.g. model.parameters())")
        self.defaults = defaults
        self.foreach = foreach
        self.param_groups: list[dict[str, Any]] = []
        self.state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        self._flat: dict[int, _FlatGroup] = {}  # id(group) -> that group laid end to end
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group {"params": [...], name: value, ...}; missing names take the defaults."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"a parameter group is a dict with a 'params' key, got {group!r}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"parameter {i} of group {len(self.param_groups)} is a {type(p)}")
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or any(id(p) in known for p in params):
            raise ValueError("a parameter appears more than once in the optimizer's groups")
        group = {**self.defaults, **group, "params": params}
        _check_hyperparameters(group)
        self.param_groups.append(group)

    def zero_grad(self) -> None:
        """Forget the gradients (p.grad = None), so the next backward starts from zero."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @no_grad()
    def step(self) -> None:
        """Update every parameter that has a gradient; parameters without one are skipped."""
        for group in self.param_groups:
            flat = self._flat_group(group) if self._flat_update() else None
            if flat is None:  # one parameter at a time: the reference
                for p in group["params"]:
                    if p.grad is not None:
                        self._update(p, p.grad, self.state[p], group)
                continue
            # the whole group at once: the same _update on its parameters laid end to end
            np.concatenate([p.data for p in flat.params], axis=None, out=flat.values.data)
            np.concatenate([p.grad for p in flat.params], axis=None, out=flat.grads)
            self._update(flat.values, flat.grads, flat.state, group)
            for p, new in zip(flat.params, flat.value_views, strict=True):
                p.copy_(new)  # into p.data, which stays the same array; p's version moves
            flat.share()

    def _flat_update(self) -> bool:
        if not self.elementwise:
            return False
        return self.foreach if self.foreach is not None else not single_threaded()

    def _flat_group(self, group: dict) -> _FlatGroup | None:
        """The group laid end to end for this step, or None: then it goes one parameter at a time,
        as it must when a parameter has no gradient (it is skipped, its step count stays), when
        dtypes differ, or when the parameters' states disagree (step counts differ since then)."""
        params = group["params"]
        if not params:
            return None
        dtype = params[0].data.dtype
        for p in params:
            g = p.grad
            if g is None or g.dtype != dtype or p.data.dtype != dtype or g.shape != p.data.shape:
                return None
        states = [self.state[p] for p in params]
        flat = self._flat.get(id(group))
        if flat is None or not flat.is_state_of(params, states):
            # first step, after load_state_dict, after a step one parameter at a time
            flat = self._flat[id(group)] = _FlatGroup.build(params, states)
        return flat

    def _update(self, p: Tensor, grad: np.ndarray, state: dict, group: dict) -> None:
        raise NotImplementedError

    # --- checkpoints ---------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, np.ndarray]:
        """A flat dict name -> ndarray (copies) that `tinymm.save` writes to an .npz.

        Parameters are numbered 0, 1, ... in group order (as in PyTorch):
            "param_groups.{g}.params"  int64 indices of group g's parameters
            "param_groups.{g}.{key}"   each hyper-parameter (lr, betas, ...) as a 0-d or 1-d array
            "state.{i}.{name}"         parameter i's buffers (e.g. step, exp_avg, exp_avg_sq)
        """
        index = {id(p): i for i, p in enumerate(self._params())}
        out: dict[str, np.ndarray] = {}
        for g, group in enumerate(self.param_groups):
            for key, value in group.items():
                if key == "params":
                    value = [index[id(p)] for p in value]
                array = np.array(value, dtype=np.int64 if key == "params" else None)
                if array.dtype.hasobject:
                    raise TypeError(f"hyper-parameter {key}={value!r} is not storable as an array")
                out[f"param_groups.{g}.{key}"] = array
        for p, state in self.state.items():
            for name, value in state.items():
                out[f"state.{index[id(p)]}.{name}"] = np.array(value)
        return out

    def load_state_dict(self, state_dict: Mapping[str, np.ndarray]) -> None:
        """Restore hyper-parameters and buffers saved by `state_dict`, so training resumes exactly.

        The optimizer must have been built over the same parameters in the same groups. Every
        missing, unexpected or mismatched entry is listed in one ValueError; nothing changes then.
        """
        params = self._params()
        index = {id(p): i for i, p in enumerate(params)}
        problems: list[str] = []
        used: set[str] = set()
        for g, group in enumerate(self.param_groups):
            for key in group:
                name = f"param_groups.{g}.{key}"
                if name not in state_dict:
                    problems.append(f"missing {name}")
                    continue
                used.add(name)
                if key == "params":
                    saved = np.asarray(state_dict[name]).tolist()
                    here = [index[id(p)] for p in group["params"]]
                    if saved != here:
                        problems.append(f"{name}: parameters {saved} saved, {here} here")

        buffers: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
        for name, value in state_dict.items():
            parts = name.split(".")
            if name in used:
                continue
            ok = len(parts) == 3 and parts[0] == "state" and parts[1].isdigit()
            if not ok or int(parts[1]) >= len(params) or parts[2] not in self.state_names:
                problems.append(f"unexpected {name}")
                continue
            i, buffer, value = int(parts[1]), parts[2], np.asarray(value)
            shape = () if buffer == "step" else params[i].shape
            if value.shape != shape:
                problems.append(f"{name}: shape {value.shape} saved, {shape} expected")
            buffers[i][buffer] = value
        for i, saved in buffers.items():
            problems += [f"missing state.{i}.{b}" for b in self.state_names if b not in saved]
        if problems:
            raise ValueError("optimizer state_dict does not match:\n  " + "\n  ".join(problems))

        for g, group in enumerate(self.param_groups):
            for key in group:
                if key != "params":
                    value = np.asarray(state_dict[f"param_groups.{g}.{key}"])
                    group[key] = value.item() if value.ndim == 0 else tuple(value.tolist())
        self.state = defaultdict(dict)  # the flat buffers are rebuilt from these at the next step
        for i, saved in buffers.items():
            p = params[i]
            self.state[p] = {
                b: int(v) if b == "step" else np.array(v, dtype=p.dtype) for b, v in saved.items()
            }


class _FlatGroup:
    """A parameter group laid end to end, so that an elementwise `_update` runs once for all of it.

    Parameter i is entries offsets[i]:offsets[i+1] of each flat array: `values` (a Tensor: the
    parameters' values, gathered before the update and copied back after), `grads`, and each
    buffer of `state`, the group's state as if it were one parameter's ({"step": t, "exp_avg": m,
    "exp_avg_sq": v}, m and v flat). `share` makes every parameter's own state (`states`, the
    dicts in `optimizer.state` that `state_dict` saves) hold views of its slices and the same t.
    Costs two scratch arrays the size of the group (values, grads); the buffers are not copied.
    """

    def __init__(self, params: list[Tensor], states: list[dict], state: dict[str, Any]):
        self.params, self.states, self.state = list(params), states, state
        self.shapes = [p.shape for p in params]
        self.offsets = np.cumsum([0] + [p.size for p in params]).tolist()
        dtype = params[0].data.dtype
        self.values = Tensor(np.empty(self.offsets[-1], dtype))
        self.value_views = self.split(self.values.data)
        self.grads = np.empty(self.offsets[-1], dtype)
        self.views: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}  # name -> (buffer, views)
        self.share()

    @classmethod
    def build(cls, params: list[Tensor], states: list[dict]) -> _FlatGroup | None:
        """Lay out the group from the parameters' own states (their buffers copied into flat ones),
        if they agree: the same names, the same scalars (step count), buffers shaped like their p.
        Before the first step all are empty, and so is the flat state: `_update` fills it."""
        first, dtype = states[0], params[0].data.dtype
        for p, state in zip(params, states, strict=True):
            if state.keys() != first.keys():
                return None
            for name, value in state.items():
                if isinstance(value, np.ndarray):
                    if value.dtype != dtype or value.shape != p.data.shape:
                        return None
                elif value != first[name]:
                    return None
        state = {
            name: np.concatenate([s[name] for s in states], axis=None)
            if isinstance(value, np.ndarray)
            else value
            for name, value in first.items()
        }
        return cls(params, states, state)

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """Views of a flat array, one per parameter, in the parameters' shapes."""
        pieces = zip(self.offsets, self.offsets[1:], self.shapes, strict=False)
        return [flat[a:b].reshape(shape) for a, b, shape in pieces]

    def share(self) -> None:
        """Hand the flat state to the parameters: the scalars, and views of any new buffer."""
        for name, value in self.state.items():
            if not isinstance(value, np.ndarray):
                for state in self.states:
                    state[name] = value
            elif self.views.get(name, (None,))[0] is not value:  # a buffer new in this step
                self.views[name] = (value, self.split(value))
                for state, view in zip(self.states, self.views[name][1], strict=True):
                    state[name] = view

    def is_state_of(self, params: list[Tensor], states: list[dict]) -> bool:
        """Are these still the group's parameters, each state exactly what `share` left there?"""
        if len(params) != len(self.params) or len(states) != len(self.states):
            return False
        for i, (p, state) in enumerate(zip(params, states, strict=True)):
            if p is not self.params[i] or state is not self.states[i]:
                return False  # another parameter, or its state replaced (load_state_dict)
            if len(state) != len(self.state):
                return False  # a name the flat state does not have (or lacks)
            for name, value in self.state.items():
                shared = self.views[name][1][i] if name in self.views else value
                if state.get(name) is not shared:
                    return False  # written by hand, or by a step one parameter at a time
        return True


def _check_hyperparameters(group: dict[str, Any]) -> None:
    for key in ("lr", "momentum", "weight_decay"):
        if key in group and not group[key] >= 0:
            raise ValueError(f"invalid {key}: {group[key]!r} (expected a number >= 0)")
    if "eps" in group and not group["eps"] > 0:  # eps = 0: a gradient that stays 0 gives 0/0
        raise ValueError(f"invalid eps: {group['eps']!r} (expected a number > 0)")
    if "betas" in group and not all(0.0 <= b < 1.0 for b in group["betas"]):
        raise ValueError(f"invalid betas: {group['betas']!r} (expected each in [0, 1))")
    if group.get("nesterov") and not group["momentum"] > 0:
        raise ValueError("nesterov momentum needs momentum > 0")


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

        g_t = dL/dp + lambda p_{t-1}                  (weight decay, if lambda > 0)
        b_1 = g_1,   b_t = mu b_{t-1} + g_t           (momentum buffer, if mu > 0)
        d_t = g_t + mu b_t   (nesterov)   or   d_t = b_t   (classic)   or   d_t = g_t   (mu = 0)
        p_t = p_{t-1} - lr d_t

    As torch.optim.SGD with dampening 0. Buffers: `momentum_buffer`, the shape of p.
    """

    state_names = ("momentum_buffer",)
    elementwise = True

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults, foreach)

    def _update(self, p: Tensor, grad: np.ndarray, state: dict, group: dict) -> None:
        lr, momentum = float(group["lr"]), float(group["momentum"])
        decay = float(group["weight_decay"])
        if decay:
            grad = grad + decay * p.data
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(grad, dtype=p.dtype)  # b_1 = g_1
            else:
                buf *= momentum
                buf += grad
            grad = grad + momentum * buf if group["nesterov"] else buf
        p.sub_(lr * grad)


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015), with weight decay as an L2 term added to the gradient.

        g_t = dL/dp + lambda p_{t-1}                  (weight decay, if lambda > 0)
        m_t = beta1 m_{t-1} + (1 - beta1) g_t         (first moment: mean of g)
        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2       (second moment: uncentred variance)
        m^_t = m_t / (1 - beta1^t),  v^_t = v_t / (1 - beta2^t)     (bias correction, m_0 = v_0 = 0)
        p_t = p_{t-1} - lr m^_t / (sqrt(v^_t) + eps)

    As torch.optim.Adam (amsgrad off). Buffers: `step` (t, an int), `exp_avg` (m) and
    `exp_avg_sq` (v), the shape of p. With L2 decay the decay term is also divided by
    sqrt(v^_t): weights with large gradients are decayed less. AdamW fixes that.
    """

    state_names = ("step", "exp_avg", "exp_avg_sq")
    elementwise = True
    decoupled_weight_decay = False

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, foreach)

    def _update(self, p: Tensor, grad: np.ndarray, state: dict, group: dict) -> None:
        lr, eps, decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data))
        state["step"] = t = state["step"] + 1
        m, v = state["exp_avg"], state["exp_avg_sq"]

        if decay and self.decoupled_weight_decay:
            p.mul_(1.0 - lr * decay)  # p <- p - lr lambda p
        elif decay:
            grad = grad + decay * p.data  # g <- g + lambda p
        m *= beta1
        m += (1.0 - beta1) * grad
        v *= beta2
        v += (1.0 - beta2) * np.square(grad)
        denom = np.sqrt(v) / math.sqrt(1.0 - beta2**t) + eps  # sqrt(v^_t) + eps
        p.sub_((lr / (1.0 - beta1**t)) * m / denom)  # lr m^_t / (sqrt(v^_t) + eps)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay.

        p'  = p_{t-1} - lr lambda p_{t-1}             (decay the weights directly, not via g)
        m_t, v_t, m^_t, v^_t as in Adam, from g_t = dL/dp alone
        p_t = p' - lr m^_t / (sqrt(v^_t) + eps)

    As torch.optim.AdamW (default lambda = 1e-2). Every weight shrinks by the same factor
    (1 - lr lambda) per step, whatever its gradient history.
    """

    decoupled_weight_decay = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        foreach: bool | None = None,
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach
        )


def clip_grad_norm_(params: Iterable[Tensor] | Tensor, max_norm: float) -> float:
    """Scale all gradients together, in place, so that their joint L2 norm is at most max_norm.

        ||g|| = sqrt( sum over parameters p, entries i of g_{p,i}^2 )   (all grads as one vector)
        g <- g max_norm / (||g|| + 1e-6)     if that factor is < 1 (as torch.nn.utils)

    Returns ||g|| before clipping, as a float (worth logging: spikes show instability).
    Parameters without a gradient are skipped.
    """
    if not max_norm >= 0:  # a negative max_norm would flip the sign of every gradient
        raise ValueError(f"clip_grad_norm_: max_norm must be >= 0, got {max_norm!r}")
    params = [params] if isinstance(params, Tensor) else params
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads))
    scale = float(max_norm) / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g *= scale
    return total


def cosine_schedule(
    step: int, total: int, warmup: int, base_lr: float, min_lr: float = 0.0
) -> float:
    """Learning rate at `step` (0-based): linear warmup, then cosine decay to min_lr at `total`.

        lr = base_lr (step + 1) / warmup                                   step < warmup
        lr = min_lr + (base_lr - min_lr) (1 + cos(pi s)) / 2,              warmup <= step
             s = min(1, (step - warmup) / (total - warmup))

    So step 0 gets base_lr / warmup, step warmup - 1 and step warmup get base_lr, and every
    step >= total gets min_lr.
    """
    if not 0 <= warmup < total:
        raise ValueError(f"need 0 <= warmup < total, got warmup={warmup}, total={total}")
    if step < 0:
        raise ValueError(f"cosine_schedule: step must be >= 0 (0-based), got step={step}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    s = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * s))


def weight_decay_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: the weight matrices of Linear and Conv2d layers decay by
    `weight_decay`; everything else (biases, norm scales, embedding tables, [CLS], positions)
    does not, as is usual for transformers: decay pulls those toward 0 for no good reason."""
    from .nn import Conv2d, Linear  # nn does not import optim: no cycle

    weights = {id(m.weight) for _, m in model.named_modules() if isinstance(m, Linear | Conv2d)}
    params = model.parameters()
    return [
        {"params": [p for p in params if id(p) in weights], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in weights], "weight_decay": 0.0},
    ]


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (what a schedule does each step)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)


__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Optimizer",
    "clip_grad_norm_",
    "cosine_schedule",
    "set_lr",
    "weight_decay_groups",
]
