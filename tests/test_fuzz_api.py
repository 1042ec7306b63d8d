"""A fuzz test of the whole public API: random shapes, dtypes, axes and argument values, valid
and invalid, for every public function, method and layer of tinymm.

The contract each call must keep (`check_call`):

- it returns, and then what it returns is what NumPy (or the other reading of a composite op,
  see `tm.reference_mode`) returns for the same arguments; where NumPy refuses the arguments,
  tinymm must refuse them too (an axis out of range raises, it does not wrap around);
- or it raises ValueError, TypeError or IndexError, *from tinymm's own code* (not a NumPy or
  Python error from deep inside), with a message that names one of the function's arguments;
- never NaN from finite inputs, in the value or (after backward) in any gradient, unless NumPy's
  own answer has a NaN there.

The list of what must be fuzzed is derived from the package (`public_api`): the `__all__` of
tinymm, tinymm.functional, tinymm.nn, tinymm.optim, tinymm.data, tinymm.models, the functions
and classes defined in tinymm.audio and tinymm.diffusion, and the public methods and operators
of Tensor. Each is either an entry
of FUZZ (a hypothesis strategy that draws one `Call`) or of EXEMPT (with the reason);
`test_every_public_name_is_fuzzed_or_exempt` checks that nothing is left out. To fuzz a new
function: add one entry to FUZZ, `"module.name": st.builds(...)` or a `@st.composite` drawing a
`Call(fn, args, kwargs, expected)`.
"""

from __future__ import annotations

import inspect
import math
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinymm as tm
import tinymm.functional as F
from tinymm import audio, diffusion, nn

PACKAGE = str(Path(tm.__file__).parent)
DOCUMENTED = (ValueError, TypeError, IndexError)

# ----------------------------------------------------------------------------------------------
# One call, and the contract it must keep
# ----------------------------------------------------------------------------------------------


@dataclass
class Call:
    """fn(*args, **kwargs); arrays in args become tensors that require grad when float.

    expected: NumPy's answer for the same arguments (a function of the same args, as arrays),
    or "reference" (compare with tm.reference_mode()), or None (only the contract's other rules).
    names: words that name an argument in an error message, beyond fn's parameter names."""

    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    expected: Any = None
    names: tuple = ()
    tensors: bool = True  # wrap float arrays of args as tensors that require grad

    def __repr__(self) -> str:
        def show(a):
            if isinstance(a, np.ndarray):
                return f"array{a.shape}:{a.dtype}"
            return repr(a)

        args = ", ".join(
            [*map(show, self.args), *(f"{k}={show(v)}" for k, v in self.kwargs.items())]
        )
        return f"{getattr(self.fn, '__qualname__', self.fn)}({args})"


def as_inputs(call: Call) -> tuple[list, dict, list]:
    """args and kwargs with float arrays as leaf tensors (requiring grad), and those leaves."""
    leaves = []

    def wrap(a):
        if call.tensors and isinstance(a, np.ndarray) and a.dtype.kind == "f":
            t = tm.tensor(a, requires_grad=True)
            leaves.append(t)
            return t
        return a

    return [wrap(a) for a in call.args], {k: wrap(v) for k, v in call.kwargs.items()}, leaves


def argument_names(call: Call) -> set[str]:
    try:
        params = set(inspect.signature(call.fn).parameters)
    except (TypeError, ValueError):
        params = set()
    aliases = {"self": {"tensor"}, "other": {"operand", "operands"}}
    names = set(params) | set(call.names) | set(call.kwargs)
    for p in params:
        names |= aliases.get(p, set())
    if "args" in names:
        names |= {"arguments", "shape"}
    names.discard("args")
    names.discard("kwargs")
    return names


def raised_in_tinymm(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(PACKAGE)


def finite(x: Any) -> bool:
    if isinstance(x, list | tuple):
        return all(finite(item) for item in x)
    a = np.asarray(x.data if isinstance(x, tm.Tensor) else x)
    return a.dtype.kind not in "fc" or bool(np.isfinite(a).all())


def outputs(out: Any) -> list:
    if isinstance(out, tuple | list):
        return [o for item in out for o in outputs(item)]
    return [out]


def numpy_answer(call: Call) -> tuple[Any, BaseException | None]:
    with np.errstate(all="ignore"):
        try:
            return call.expected(*call.args, **call.kwargs), None
        except Exception as error:  # NumPy refuses these arguments
            return None, error


def run(call: Call, reference: bool = False) -> Any:
    args, kwargs, leaves = as_inputs(call)
    with tm.reference_mode(reference), np.errstate(all="ignore"):
        out = call.fn(*args, **kwargs)
        grads = None
        outs = [o for o in outputs(out) if isinstance(o, tm.Tensor) and o.requires_grad]
        if outs and outs[0].dtype.kind == "f":
            u = np.random.default_rng(0).standard_normal(outs[0].shape).astype(outs[0].dtype)
            try:
                outs[0].backward(u)
            except Exception as error:  # any error must come from the call, not from backward
                raise AssertionError(f"raised in backward, not in the call: {error!r}") from error
            grads = [leaf.grad for leaf in leaves]
    return out, grads


def check_call(call: Call) -> None:
    """The contract of the module docstring, for one call."""
    try:
        out, grads = run(call)
    except DOCUMENTED as error:
        message = str(error)
        assert raised_in_tinymm(error), (
            f"{call}: a raw {type(error).__name__} from outside tinymm: {message}\n"
            + "".join(traceback.format_tb(error.__traceback__)[-3:])
        )
        named = [n for n in argument_names(call) if re.search(rf"\b{re.escape(n)}\b", message)]
        assert named, f"{call}: the message names no argument of {argument_names(call)}: {message}"
        if call.expected == "reference":  # both readings refuse the same mistakes
            with pytest.raises(type(error)):
                run(call, reference=True)
        return
    except Exception as error:
        raise AssertionError(
            f"{call}: {type(error).__name__} is not a documented error type: {error}"
        ) from error

    inputs_finite = all(finite(a) for a in (*call.args, *call.kwargs.values()))
    single = any(  # float32 anywhere in the inputs: compare at float32's precision
        isinstance(a, np.ndarray) and a.dtype == np.float32
        for a in (*call.args, *call.kwargs.values())
    )
    if call.expected == "reference":
        ref_out, ref_grads = run(call, reference=True)
        for a, b in zip(outputs(out), outputs(ref_out), strict=True):
            if isinstance(a, tm.Tensor):
                tol = 1e-4 if single else 1e-9
                np.testing.assert_allclose(a.data, np.asarray(b), rtol=tol, atol=tol)
        for a, b in zip(grads or [], ref_grads or [], strict=True):
            if a is not None:
                tol = 1e-3 if single else 1e-8
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        expected_nan = False
    elif call.expected is not None:
        want, refused = numpy_answer(call)
        assert refused is None, f"{call}: NumPy refuses ({refused!r}) but tinymm returned"
        got = [np.asarray(o.data if isinstance(o, tm.Tensor) else o) for o in outputs(out)]
        want = [np.asarray(w) for w in (want if isinstance(want, list) else [want])]
        assert len(got) == len(want), f"{call}: {len(got)} outputs, NumPy {len(want)}"
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape, f"{call}: shape {g.shape}, NumPy {w.shape}"
            tol = 1e-5 if g.dtype == np.float32 else 1e-10
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=str(call))
        expected_nan = any(w.dtype.kind in "fc" and np.isnan(w).any() for w in want)
    else:
        expected_nan = False
    if inputs_finite and not expected_nan:
        for o in outputs(out):
            if isinstance(o, tm.Tensor | np.ndarray):
                assert not np.isnan(np.asarray(o)).any(), f"{call}: NaN from finite inputs"
        for g in grads or []:
            assert g is None or not np.isnan(g).any(), f"{call}: a NaN gradient"


# ----------------------------------------------------------------------------------------------
# Strategies for arguments
# ----------------------------------------------------------------------------------------------

DTYPES = st.sampled_from([np.float32, np.float64])


def shapes(min_dims=0, max_dims=4, min_side=0, max_side=3):
    return hnp.array_shapes(
        min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    )


def arrays(shape, lo=-3.0, hi=3.0, dtype=None):
    """Finite float arrays of `shape` (a shape or a strategy of shapes)."""
    shape = shape if isinstance(shape, st.SearchStrategy) else st.just(shape)
    dtype = DTYPES if dtype is None else st.just(dtype)
    return st.tuples(shape, dtype).flatmap(
        lambda sd: hnp.arrays(sd[1], sd[0], elements=st.floats(lo, hi, width=32))
    )


def any_arrays(lo=-3.0, hi=3.0, **kw):
    return arrays(shapes(**kw), lo, hi)


def axis_for(ndim: int):
    """An axis, valid ([-ndim, ndim)) or just outside, or None."""
    return st.none() | st.integers(-ndim - 2, ndim + 1)


def sizes(lo=-1, hi=5):
    return st.integers(lo, hi)


# ----------------------------------------------------------------------------------------------
# The table: what is fuzzed, and how each call is drawn
# ----------------------------------------------------------------------------------------------


def reduction(method: str, numpy_fn: Callable) -> st.SearchStrategy:
    @st.composite
    def draw(draw):
        x = draw(any_arrays())
        axis = draw(axis_for(x.ndim) | st.tuples(st.integers(-x.ndim - 1, x.ndim)))
        keepdims = draw(st.booleans())
        return Call(
            getattr(tm.Tensor, method),
            (x,),
            {"axis": axis, "keepdims": keepdims},
            expected=lambda a, axis, keepdims: numpy_fn(a, axis=axis, keepdims=keepdims),
        )

    return draw()


def elementwise(method: str, numpy_fn: Callable, lo=-3.0, hi=3.0) -> st.SearchStrategy:
    return st.builds(
        lambda x: Call(getattr(tm.Tensor, method), (x,), expected=numpy_fn), any_arrays(lo, hi)
    )


def binary(fn: Callable, numpy_fn: Callable, lo=-3.0, hi=3.0) -> st.SearchStrategy:
    """Two operands, usually broadcastable, sometimes not."""
    pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3).map(
        lambda b: b.input_shapes
    ) | st.tuples(shapes(max_dims=3), shapes(max_dims=3))
    return pairs.flatmap(
        lambda s: st.builds(
            lambda a, b: Call(fn, (a, b), expected=numpy_fn, names=("operands", "shapes")),
            arrays(s[0], lo, hi),
            arrays(s[1], lo, hi),
        )
    )


@st.composite
def reshape_call(draw):
    x = draw(any_arrays())
    new = draw(st.just((-1,)) | shapes(max_dims=3) | st.tuples(st.integers(-2, 4), st.just(-1)))
    return Call(tm.Tensor.reshape, (x, new), expected=lambda a, s: np.reshape(a, s))


@st.composite
def transpose_call(draw):
    x = draw(any_arrays())
    axes = draw(st.permutations(range(x.ndim)) | st.lists(st.integers(-4, 4), max_size=4))
    return Call(
        tm.Tensor.transpose, (x, *axes), expected=lambda a, *ax: np.transpose(a, ax or None)
    )


@st.composite
def swapaxes_call(draw):
    x = draw(any_arrays())
    a, b = draw(st.integers(-x.ndim - 1, x.ndim)), draw(st.integers(-x.ndim - 1, x.ndim))
    return Call(tm.Tensor.swapaxes, (x, a, b), expected=np.swapaxes)


@st.composite
def squeeze_call(draw):
    x = draw(any_arrays(max_side=2))
    return Call(tm.Tensor.squeeze, (x, draw(axis_for(x.ndim))), expected=np.squeeze)


@st.composite
def expand_dims_call(draw):
    x = draw(any_arrays())
    return Call(
        tm.Tensor.expand_dims,
        (x, draw(st.integers(-x.ndim - 2, x.ndim + 1))),
        expected=np.expand_dims,
    )


@st.composite
def broadcast_to_call(draw):
    x = draw(any_arrays(max_dims=3))
    shape = draw(shapes(max_dims=4))
    return Call(tm.Tensor.broadcast_to, (x, shape), expected=np.broadcast_to)


@st.composite
def getitem_call(draw):
    x = draw(any_arrays(min_dims=1))
    n = x.shape[0]
    index = draw(
        st.integers(-n - 2, n + 1)
        | st.slices(max(n, 1))
        | st.lists(st.integers(-n - 1, n), max_size=4).map(np.array)
        | st.tuples(*[st.integers(-s - 1, s) for s in x.shape]).map(tuple)
        | st.tuples(*[st.integers(-s - 1, s) for s in x.shape], st.just(0))
    )
    return Call(tm.Tensor.__getitem__, (x, index), expected=lambda a, i: a[i], names=("index",))


@st.composite
def clip_call(draw):
    x = draw(any_arrays())
    lo = draw(st.none() | st.floats(-2, 2))
    hi = draw(st.none() | st.floats(-2, 2))
    return Call(tm.Tensor.clip, (x, lo, hi), expected=lambda a, lo, hi: np.clip(a, lo, hi))


@st.composite
def astype_call(draw):
    x = draw(any_arrays())
    dtype = draw(st.sampled_from([np.float32, np.float64, "float16", np.int64]))
    return Call(tm.Tensor.astype, (x, dtype), expected=lambda a, d: a.astype(d))


@st.composite
def in_place_call(draw, method: str):
    x = draw(any_arrays(max_dims=3))
    other = draw(arrays(st.just(x.shape) | shapes(max_dims=3)))
    fn = getattr(tm.Tensor, method)

    def numpy_fn(a, b):
        out = a.copy()
        {"add_": np.add, "sub_": np.subtract, "mul_": np.multiply}[method](out, b, out=out)
        return out

    def call(a, b):
        with tm.no_grad():
            return fn(tm.tensor(a.copy()), b)

    return Call(call, (x, other), expected=numpy_fn, names=("other",), tensors=False)


@st.composite
def copy_call(draw):
    x = draw(any_arrays(max_dims=3))
    other = draw(arrays(st.just(x.shape) | shapes(max_dims=3)))

    def call(a, b):
        return tm.tensor(a.copy()).copy_(b)

    return Call(
        call,
        (x, other),
        expected=lambda a, b: np.broadcast_to(b, a.shape) + 0 * a,
        names=("other",),
        tensors=False,
    )


@st.composite
def item_call(draw):
    return Call(
        tm.Tensor.item, (draw(any_arrays(max_dims=2, max_side=2)),), expected=lambda a: a.item()
    )


@st.composite
def matmul_call(draw):
    a = draw(any_arrays(max_dims=3, max_side=3))
    b = draw(arrays(shapes(max_dims=3, max_side=3)))
    return Call(tm.matmul, (a, b), expected=np.matmul, names=("matmul", "operand", "shapes"))


@st.composite
def where_call(draw):
    s = draw(
        hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=3).map(
            lambda b: b.input_shapes
        )
        | st.tuples(shapes(max_dims=3), shapes(max_dims=3), shapes(max_dims=3))
    )
    cond = draw(hnp.arrays(bool, s[0]))
    a, b = draw(arrays(s[1])), draw(arrays(s[2]))
    return Call(tm.where, (cond, a, b), expected=np.where)


@st.composite
def join_call(draw, fn, numpy_fn):
    first = draw(shapes(max_dims=3))
    k = draw(st.integers(1, 3))
    parts = [draw(arrays(st.just(first) | shapes(max_dims=3), dtype=np.float64)) for _ in range(k)]
    axis = draw(st.integers(-len(first) - 2, len(first) + 1))

    def call(tensors, axis):
        return fn([tm.tensor(t, requires_grad=True) for t in tensors], axis=axis)

    return Call(
        call,
        (parts, axis),
        expected=lambda ts, axis: numpy_fn(ts, axis=axis),
        names=("tensors", "axis"),
    )


@st.composite
def split_call(draw):
    x = draw(any_arrays(min_dims=1))
    sections = draw(st.integers(-1, 4) | st.lists(st.integers(-1, 4), max_size=3))
    axis = draw(st.integers(-x.ndim - 1, x.ndim))
    return Call(tm.split, (x, sections, axis), expected=np.split)


@st.composite
def pad_call(draw):
    x = draw(any_arrays(max_dims=3))
    width = draw(
        st.integers(-1, 2)
        | st.tuples(st.integers(-1, 2), st.integers(0, 2))
        | st.lists(st.tuples(st.integers(-1, 2), st.integers(0, 2)), min_size=0, max_size=4)
    )
    return Call(tm.pad, (x, width), expected=lambda a, w: np.pad(a, w), names=("pad_width",))


@st.composite
def constructor_call(draw, fn, numpy_fn):
    shape = draw(st.lists(st.integers(-1, 3), max_size=3).map(tuple))
    return Call(
        fn, shape, expected=(lambda *s: numpy_fn(s)) if numpy_fn else None, names=("shape",)
    )


@st.composite
def arange_call(draw):
    halves = st.integers(-6, 10).map(lambda i: i / 2)  # (a step of 1e-10 would fill memory)
    args = draw(st.lists(st.integers(-3, 5) | halves, min_size=1, max_size=3))
    return Call(tm.arange, tuple(args), expected=lambda *a: np.arange(*a))


# -- functional ---------------------------------------------------------------------------------


@st.composite
def softmax_like(draw, fn):
    x = draw(any_arrays())
    return Call(fn, (x,), {"axis": draw(st.integers(-x.ndim - 1, x.ndim))}, expected="reference")


@st.composite
def logsumexp_call(draw):
    x = draw(any_arrays())
    axis = draw(axis_for(x.ndim))
    return Call(F.logsumexp, (x, axis, draw(st.booleans())), expected="reference")


@st.composite
def cross_entropy_call(draw):
    lead = draw(shapes(min_dims=1, max_dims=2, min_side=0))
    c = draw(st.integers(0, 4))
    logits = draw(arrays(st.just((*lead, c)) | shapes(max_dims=3)))
    targets = draw(
        hnp.arrays(np.int64, st.just(lead) | shapes(max_dims=2), elements=st.integers(-100, c))
    )
    smoothing = draw(st.sampled_from([0.0, 0.1, -0.1, 1.5]))
    return Call(
        F.cross_entropy,
        (logits, targets),
        {"label_smoothing": smoothing},
        expected="reference",
        names=("logits", "targets"),
    )


@st.composite
def mse_call(draw):
    a = draw(any_arrays(max_dims=3))
    b = draw(arrays(st.just(a.shape) | shapes(max_dims=3)))

    def numpy_mse(a, b):
        if a.shape != b.shape:  # a broadcast would average a matrix nobody asked for
            raise ValueError("refused")
        return np.mean((a - b) ** 2)

    return Call(F.mse_loss, (a, b), expected=numpy_mse)


@st.composite
def linear_call(draw):
    x = draw(any_arrays(max_dims=3, min_side=1))
    w = draw(arrays(st.just((x.shape[-1] if x.ndim else 2, 3)) | shapes(max_dims=3, min_side=1)))
    b = draw(st.none() | arrays(st.just(w.shape[-1:]) | shapes(max_dims=2, min_side=1)))
    return Call(F.linear, (x, w, b), expected="reference")


@st.composite
def embedding_call(draw):
    w = draw(arrays(shapes(min_dims=1, max_dims=3, min_side=0)))
    idx = draw(
        hnp.arrays(
            st.sampled_from([np.int64, np.float32]), shapes(max_dims=2), elements=st.integers(-2, 4)
        )
    )
    return Call(F.embedding, (idx, w), expected=lambda i, w: w[i])


@st.composite
def layer_norm_call(draw):
    x = draw(any_arrays(max_dims=3, min_side=1))
    d = x.shape[-1] if x.ndim else 1
    w = draw(st.none() | arrays(st.just((d,)) | shapes(max_dims=2, min_side=1)))
    b = draw(st.none() | arrays(st.just((d,)) | shapes(max_dims=2, min_side=1)))
    eps = draw(st.sampled_from([1e-5, 0.0, -1.0]))
    return Call(F.layer_norm, (x, w, b, eps), expected="reference")


@st.composite
def group_norm_call(draw):
    x = draw(arrays(shapes(min_dims=3, max_dims=5, min_side=1)))
    c = x.shape[-1]
    g = draw(st.integers(-1, 4))
    w = draw(st.none() | arrays(st.just((c,)) | shapes(max_dims=2, min_side=1)))
    return Call(F.group_norm, (x, g, w, None), expected="reference")


@st.composite
def conv2d_call(draw):
    x = draw(
        arrays(
            st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3))
            | shapes(max_dims=5, min_side=1)
        )
    )
    c = x.shape[-1] if x.ndim else 1
    k = draw(st.integers(1, 4))
    w = draw(arrays(st.just((k, k, c, 2)) | shapes(max_dims=5, min_side=1)))
    stride, padding = draw(st.integers(-1, 3)), draw(st.integers(-1, 2))
    return Call(F.conv2d, (x, w, None, stride, padding), expected="reference")


@st.composite
def pool_call(draw):
    x = draw(
        arrays(
            st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 5), st.integers(1, 2))
            | shapes(max_dims=5, min_side=1)
        )
    )
    k = draw(st.integers(-1, 6))
    stride = draw(st.none() | st.integers(-1, 3))

    def numpy_pool(a, k, s):
        s = s or k
        if a.ndim != 4 or k < 1 or s < 1 or k > a.shape[1] or k > a.shape[2]:
            raise ValueError("refused")
        ho, wo = (a.shape[1] - k) // s + 1, (a.shape[2] - k) // s + 1
        return np.stack(
            [
                np.stack(
                    [
                        a[:, i * s : i * s + k, j * s : j * s + k].mean(axis=(1, 2))
                        for j in range(wo)
                    ],
                    1,
                )
                for i in range(ho)
            ],
            1,
        )

    return Call(F.avg_pool2d, (x, k, stride), expected=numpy_pool)


@st.composite
def upsample_call(draw):
    x = draw(arrays(shapes(min_dims=3, max_dims=5, min_side=1, max_side=2)))
    s = draw(st.integers(-1, 3))

    def numpy_up(a, s):
        if a.ndim != 4 or s < 1:
            raise ValueError("refused")
        return a.repeat(s, axis=1).repeat(s, axis=2)

    return Call(F.upsample_nearest2d, (x, s), expected=numpy_up)


@st.composite
def patchify_call(draw):
    x = draw(arrays(shapes(min_dims=3, max_dims=5, min_side=1, max_side=4)))
    p = draw(st.integers(-1, 4))

    def numpy_patchify(a, p):
        n, h, w, c = a.shape
        if p < 1 or h % p or w % p:
            raise ValueError("refused")
        return (
            a.reshape(n, h // p, p, w // p, p, c)
            .transpose(0, 1, 3, 2, 4, 5)
            .reshape(n, -1, p * p * c)
        )

    return Call(F.patchify, (x, p), expected=numpy_patchify)


@st.composite
def unpatchify_call(draw):
    p = draw(st.integers(-1, 3))
    h, w, c = draw(st.integers(0, 4)), draw(st.integers(0, 4)), draw(st.integers(0, 2))
    n_patches = (h // p) * (w // p) if p > 0 else 1
    x = draw(arrays(st.just((1, n_patches, max(p, 0) ** 2 * c)) | shapes(min_dims=2, max_dims=4)))

    def numpy_unpatchify(a, p, size, c):
        h, w = size
        if p < 1 or h % p or w % p or a.shape != (a.shape[0], (h // p) * (w // p), p * p * c):
            raise ValueError("refused")
        n = a.shape[0]
        return a.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)

    return Call(F.unpatchify, (x, p, (h, w), c), expected=numpy_unpatchify)


@st.composite
def attention_call(draw):
    n, lq, lk, d = (draw(st.integers(1, 3)) for _ in range(4))
    q = draw(arrays(st.just((n, lq, d)) | shapes(max_dims=3, min_side=1)))
    k = draw(arrays(st.just((n, lk, d)) | shapes(max_dims=3, min_side=1)))
    v = draw(arrays(st.just((n, lk, 2)) | shapes(max_dims=3, min_side=1)))
    mask = draw(
        st.none()
        | hnp.arrays(
            st.sampled_from([bool, np.float32]), st.just((lq, lk)) | shapes(max_dims=3, min_side=1)
        )
    )
    return Call(
        F.scaled_dot_product_attention,
        (q, k, v),
        {"mask": mask, "causal": draw(st.booleans())},
        expected="reference",
    )


@st.composite
def multi_head_attention_call(draw):
    n, length, heads, d = (draw(st.integers(1, 3)) for _ in range(4))
    qkv = draw(arrays(st.just((n, length, 3 * heads * d)) | shapes(max_dims=4, min_side=1)))
    mask = draw(
        st.none()
        | hnp.arrays(
            st.sampled_from([bool, np.float32]),
            st.just((length, length)) | shapes(max_dims=4, min_side=1),
        )
    )
    heads = draw(st.just(heads) | st.sampled_from([0, -1, 2.0, True, 5]))
    return Call(
        F.multi_head_attention,
        (qkv, heads),
        {"mask": mask, "causal": draw(st.booleans())},
        expected="reference",
    )


@st.composite
def clip_loss_call(draw):
    a = draw(arrays(shapes(min_dims=1, max_dims=3, min_side=1)))
    b = draw(arrays(st.just(a.shape) | shapes(min_dims=1, max_dims=3, min_side=1)))
    return Call(F.clip_loss, (a, b, draw(st.floats(-1, 3))), expected="reference")


@st.composite
def dropout_call(draw):
    x = draw(any_arrays())
    p = draw(st.sampled_from([0.0, 0.3, -0.1, 1.0, 2.0]))
    return Call(F.dropout, (x, p, draw(st.booleans())))


def activation(fn, **kw):
    return st.builds(lambda x: Call(fn, (x,), kw, expected="reference"), any_arrays(-6, 6))


# -- layers: constructor arguments, then a forward ------------------------------------------------


@st.composite
def layer_call(draw, make, make_args, input_shape):
    args = draw(make_args)
    x = draw(arrays(input_shape([max(a, 1) for a in args]) | shapes(max_dims=4, min_side=1)))

    def call(x, *args):
        tm.manual_seed(0)
        return make(*args)(x)

    forward = tuple(inspect.signature(make.forward).parameters)
    return Call(call, (x, *args), names=tuple(inspect.signature(make).parameters) + forward)


def _dim():
    return st.integers(-1, 4)


FUZZ: dict[str, st.SearchStrategy] = {
    # Tensor: reductions, elementwise, shape, indexing, in place, operators
    "Tensor.sum": reduction("sum", np.sum),
    "Tensor.mean": reduction("mean", np.mean),
    "Tensor.max": reduction("max", np.max),
    "Tensor.min": reduction("min", np.min),
    "Tensor.var": reduction("var", np.var),
    "Tensor.exp": elementwise("exp", np.exp),
    "Tensor.log": elementwise("log", np.log, 0.125, 3.0),
    "Tensor.sqrt": elementwise("sqrt", np.sqrt, 0.125, 3.0),
    "Tensor.tanh": elementwise("tanh", np.tanh),
    "Tensor.erf": elementwise("erf", __import__("scipy.special").special.erf),
    "Tensor.abs": elementwise("abs", np.abs),
    "Tensor.clip": clip_call(),
    "Tensor.astype": astype_call(),
    "Tensor.reshape": reshape_call(),
    "Tensor.flatten": elementwise("flatten", np.ravel),
    "Tensor.transpose": transpose_call(),
    "Tensor.swapaxes": swapaxes_call(),
    "Tensor.squeeze": squeeze_call(),
    "Tensor.expand_dims": expand_dims_call(),
    "Tensor.broadcast_to": broadcast_to_call(),
    "Tensor.__getitem__": getitem_call(),
    "Tensor.item": item_call(),
    "Tensor.add_": in_place_call("add_"),
    "Tensor.sub_": in_place_call("sub_"),
    "Tensor.mul_": in_place_call("mul_"),
    "Tensor.copy_": copy_call(),
    "Tensor.__add__": binary(tm.Tensor.__add__, np.add),
    "Tensor.__sub__": binary(tm.Tensor.__sub__, np.subtract),
    "Tensor.__mul__": binary(tm.Tensor.__mul__, np.multiply),
    "Tensor.__truediv__": binary(tm.Tensor.__truediv__, np.divide, 0.5, 3.0),
    "Tensor.__pow__": binary(tm.Tensor.__pow__, np.power, 0.5, 2.0),
    "Tensor.__matmul__": matmul_call(),
    # tinymm
    "tinymm.matmul": matmul_call(),
    "tinymm.maximum": binary(tm.maximum, np.maximum),
    "tinymm.minimum": binary(tm.minimum, np.minimum),
    "tinymm.where": where_call(),
    "tinymm.concatenate": join_call(tm.concatenate, np.concatenate),
    "tinymm.stack": join_call(tm.stack, np.stack),
    "tinymm.split": split_call(),
    "tinymm.pad": pad_call(),
    "tinymm.zeros": constructor_call(tm.zeros, np.zeros),
    "tinymm.ones": constructor_call(tm.ones, np.ones),
    "tinymm.randn": constructor_call(tm.randn, None),
    "tinymm.arange": arange_call(),
    # tinymm.functional
    "functional.relu": st.builds(
        lambda x: Call(F.relu, (x,), expected=lambda a: np.maximum(a, 0)), any_arrays()
    ),
    "functional.sigmoid": st.builds(
        lambda x: Call(F.sigmoid, (x,), expected=lambda a: 1 / (1 + np.exp(-a))), any_arrays()
    ),
    "functional.silu": activation(F.silu),
    "functional.gelu": activation(F.gelu)
    | activation(F.gelu, approximate="tanh")
    | activation(F.gelu, approximate="erf"),
    "functional.softmax": softmax_like(F.softmax),
    "functional.log_softmax": softmax_like(F.log_softmax),
    "functional.logsumexp": logsumexp_call(),
    "functional.cross_entropy": cross_entropy_call(),
    "functional.mse_loss": mse_call(),
    "functional.linear": linear_call(),
    "functional.embedding": embedding_call(),
    "functional.layer_norm": layer_norm_call(),
    "functional.group_norm": group_norm_call(),
    "functional.dropout": dropout_call(),
    "functional.conv2d": conv2d_call(),
    "functional.avg_pool2d": pool_call(),
    "functional.upsample_nearest2d": upsample_call(),
    "functional.patchify": patchify_call(),
    "functional.unpatchify": unpatchify_call(),
    "functional.scaled_dot_product_attention": attention_call(),
    "functional.multi_head_attention": multi_head_attention_call(),
    "functional.clip_loss": clip_loss_call(),
    # tinymm.nn
    "nn.Linear": layer_call(nn.Linear, st.tuples(_dim(), _dim()), lambda a: st.just((2, a[0]))),
    "nn.Embedding": layer_call(nn.Embedding, st.tuples(_dim(), _dim()), lambda a: st.just((2,))),
    "nn.LayerNorm": layer_call(nn.LayerNorm, st.tuples(_dim()), lambda a: st.just((2, a[0]))),
    "nn.GroupNorm": layer_call(
        nn.GroupNorm, st.tuples(_dim(), _dim()), lambda a: st.just((1, 2, 2, a[1]))
    ),
    "nn.Conv2d": layer_call(
        nn.Conv2d,
        st.tuples(_dim(), _dim(), _dim(), st.integers(-1, 2), st.integers(-1, 2)),
        lambda a: st.just((1, 4, 4, a[0])),
    ),
    "nn.Dropout": layer_call(
        nn.Dropout, st.tuples(st.sampled_from([0.0, 0.5, -0.5, 1.0])), lambda a: st.just((3,))
    ),
    "nn.MLP": layer_call(nn.MLP, st.tuples(_dim(), _dim()), lambda a: st.just((2, a[0]))),
    "nn.MultiHeadAttention": layer_call(
        nn.MultiHeadAttention,
        st.tuples(_dim(), st.integers(-1, 3)),
        lambda a: st.just((1, 2, a[0])),
    ),
    "nn.TransformerBlock": layer_call(
        nn.TransformerBlock, st.tuples(_dim(), st.integers(-1, 3)), lambda a: st.just((1, 2, a[0]))
    ),
}

# -- audio: plain NumPy functions (no tensors) -------------------------------------------------


@st.composite
def frame_call(draw):
    x = draw(arrays(shapes(max_dims=2, max_side=8)))
    return Call(audio.frame, (x, draw(st.integers(-1, 9)), draw(st.integers(-1, 4))), tensors=False)


@st.composite
def stft_call(draw):
    x = draw(arrays(shapes(max_dims=2, max_side=40)))
    n_fft = draw(st.sampled_from([-1, 0, 1, 8, 16, 64]))
    hop = draw(st.none() | st.integers(-1, 8))
    return Call(audio.stft, (x,), {"n_fft": n_fft, "hop_length": hop}, tensors=False)


@st.composite
def mel_filterbank_call(draw):
    return Call(
        audio.mel_filterbank,
        (),
        {
            "sr": draw(st.sampled_from([-1, 0, 8000, 22050])),
            "n_fft": draw(st.sampled_from([-1, 0, 1, 16, 64])),
            "n_mels": draw(st.integers(-1, 12)),
        },
        tensors=False,
    )


@st.composite
def melspectrogram_call(draw):
    x = draw(arrays(shapes(max_dims=2, max_side=80)))
    return Call(
        audio.melspectrogram,
        (x,),
        {
            "sr": 8000,
            "n_fft": draw(st.sampled_from([0, 16, 64])),
            "hop_length": draw(st.integers(-1, 8) | st.none()),
            "n_mels": draw(st.integers(-1, 8)),
        },
        tensors=False,
    )


@st.composite
def db_call(draw, fn):
    x = draw(arrays(shapes(max_dims=2), 0.0, 3.0))
    return Call(
        fn, (x,), {"top_db": draw(st.none() | st.sampled_from([-1.0, 0.0, 80.0]))}, tensors=False
    )


FUZZ.update(
    {
        "audio.frame": frame_call(),
        "audio.stft": stft_call(),
        "audio.mel_filterbank": mel_filterbank_call(),
        "audio.melspectrogram": melspectrogram_call(),
        "audio.power_to_db": db_call(audio.power_to_db),
        "audio.amplitude_to_db": db_call(audio.amplitude_to_db),
        "audio.hz_to_mel": st.builds(
            lambda f: Call(audio.hz_to_mel, (f,), tensors=False),
            arrays(shapes(max_dims=2), 0, 8000),
        ),
        "audio.mel_to_hz": st.builds(
            lambda m: Call(audio.mel_to_hz, (m,), tensors=False), arrays(shapes(max_dims=2), 0, 50)
        ),
        "audio.fft_frequencies": st.builds(
            lambda sr, n: Call(audio.fft_frequencies, (sr, n), tensors=False),
            st.sampled_from([-1, 0, 8000]),
            st.integers(-1, 16),
        ),
        "audio.mel_frequencies": st.builds(
            lambda n: Call(audio.mel_frequencies, (n,), tensors=False), st.integers(-1, 10)
        ),
        "audio.get_window": st.builds(
            lambda w, n: Call(audio.get_window, (w, n), tensors=False),
            st.sampled_from(["hann", "ones", "nope"]),
            st.integers(-1, 8),
        ),
    }
)

# -- optim: hyper-parameters, then one step -----------------------------------------------------


@st.composite
def optimizer_call(draw, make):
    w = draw(arrays(shapes(min_dims=1, max_dims=2, min_side=1), dtype=np.float64))
    kwargs = {
        "lr": draw(st.sampled_from([0.1, 0.0, -0.1, float("nan")])),
        "weight_decay": draw(st.sampled_from([0.0, 0.01, -1.0])),
    }
    if make is tm.optim.SGD:
        kwargs["momentum"] = draw(st.sampled_from([0.0, 0.9, -0.5]))
    else:
        kwargs["betas"] = draw(st.sampled_from([(0.9, 0.999), (1.0, 0.9), (-0.1, 0.9)]))
        kwargs["eps"] = draw(st.sampled_from([1e-8, 0.0, -1e-8]))

    def step(w, **kwargs):
        p = nn.Parameter(w.copy())
        opt = make([p], **kwargs)
        (tm.tensor(w) * p).sum().backward()
        opt.step()
        return p.data

    return Call(step, (w,), kwargs, expected=None, tensors=False, names=("params",))


@st.composite
def clip_grad_norm_call(draw):
    g = draw(arrays(shapes(max_dims=2), dtype=np.float64))
    max_norm = draw(st.sampled_from([1.0, 0.5, 0.0, -1.0]))

    def clip(g, max_norm):
        p = nn.Parameter(np.zeros_like(g))
        p.grad = g.copy()
        total = tm.optim.clip_grad_norm_([p], max_norm)
        return np.asarray([total, *p.grad.ravel()])

    def numpy_clip(g, max_norm):
        if not max_norm >= 0:
            raise ValueError("refused")
        total = np.sqrt((g * g).sum())
        scale = min(1.0, max_norm / (total + 1e-6))
        return np.asarray([total, *(g * scale).ravel()])

    return Call(clip, (g, max_norm), expected=numpy_clip, tensors=False)


@st.composite
def cosine_schedule_call(draw):
    step, total, warmup = (draw(st.integers(-1, 6)) for _ in range(3))

    def numpy_cosine(step, total, warmup):
        if not 0 <= warmup < total or step < 0:
            raise ValueError("refused")
        if step < warmup:
            return 1.0 * (step + 1) / warmup
        s = min(1.0, (step - warmup) / (total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * s))

    def schedule(step, total, warmup):
        return tm.optim.cosine_schedule(step, total, warmup, 1.0)

    return Call(schedule, (step, total, warmup), expected=numpy_cosine, tensors=False)


FUZZ.update(
    {
        "optim.SGD": optimizer_call(tm.optim.SGD),
        "optim.Adam": optimizer_call(tm.optim.Adam),
        "optim.AdamW": optimizer_call(tm.optim.AdamW),
        "optim.clip_grad_norm_": clip_grad_norm_call(),
        "optim.cosine_schedule": cosine_schedule_call(),
    }
)

# -- data: the generators' sizes and seeds ------------------------------------------------------


@st.composite
def batches_call(draw):
    n = draw(st.integers(0, 5))
    arrays_ = [np.arange(n), np.arange(draw(st.sampled_from([n, n + 1])))]
    batch_size = draw(st.integers(-1, 3))

    def all_batches(arrays, batch_size):
        return list(tm.data.batches(arrays, batch_size, shuffle=False))

    return Call(all_batches, (arrays_, batch_size), tensors=False)


FUZZ.update(
    {
        "data.batches": batches_call(),
        "data.make_shapes": st.builds(
            lambda n, size, objects: Call(
                tm.data.make_shapes, (n,), {"image_size": size, "objects": objects}, tensors=False
            ),
            st.integers(-1, 3),
            st.sampled_from([-1, 8, 16, 32]),
            st.integers(-1, 3),
        ),
        "data.make_sounds": st.builds(
            lambda n, sr, duration: Call(
                tm.data.make_sounds, (n,), {"sr": sr, "duration": duration}, tensors=False
            ),
            st.integers(-1, 2),
            st.sampled_from([0, 4000, 8000]),
            st.sampled_from([-1.0, 0.1, 0.25]),
        ),
        "diffusion.q_sample": st.builds(
            lambda x0, noise, t, big_t: Call(
                diffusion.q_sample,
                (x0, t, noise, diffusion.Schedule.linear(big_t)),
                names=("t", "x0", "noise"),
                tensors=False,
            ),
            hnp.arrays(np.float32, st.sampled_from([(3, 2), (2, 2), (3,)])),
            hnp.arrays(np.float32, st.sampled_from([(3, 2), (2, 2)])),
            st.one_of(
                st.integers(-2, 12),
                hnp.arrays(np.int64, st.sampled_from([(3,), (2,)]), elements=st.integers(-1, 12)),
                st.just(np.array([0.5, 1.0, 2.0])),
            ),
            st.sampled_from([1, 10]),
        ),
        "diffusion.guidance": st.builds(
            lambda a, b, scale: Call(
                diffusion.guidance,
                (a, b, scale),
                expected=lambda a, b, scale: b + scale * (a - b),
            ),
            hnp.arrays(np.float64, (2, 3), elements=st.floats(-3, 3)),
            hnp.arrays(np.float64, (2, 3), elements=st.floats(-3, 3)),
            st.sampled_from([0.0, 1.0, 3.0]),
        ),
        "diffusion.ddim_timesteps": st.builds(
            lambda big_t, steps: Call(diffusion.ddim_timesteps, (big_t, steps), tensors=False),
            st.integers(1, 50),
            st.integers(-1, 60),
        ),
        "data.make_qa": st.builds(
            lambda n, size: Call(tm.data.make_qa, (n,), {"image_size": size}, tensors=False),
            st.integers(-1, 3),
            st.sampled_from([-1, 8, 16, 32]),
        ),
        "data.make_videos": st.builds(
            lambda n, frames, size, sr: Call(
                tm.data.make_videos,
                (n,),
                {"frames": frames, "image_size": size, "sr": sr},
                tensors=False,
            ),
            st.integers(-1, 2),
            st.sampled_from([0, 1, 2, 4]),
            st.sampled_from([-1, 8, 16]),
            st.sampled_from([0, 2000, 4000]),
        ),
    }
)

EXEMPT: dict[str, str] = {
    # no argument to fuzz, or one whose only check is its type
    "Tensor.backward": "its misuse (non-scalar, freed graph, wrong grad shape) is in test_errors",
    "Tensor.detach": "no arguments",
    "Tensor.numpy": "no arguments",
    "Tensor.retain_grad": "no arguments",
    "Tensor.zero_": "no arguments (its refusal inside a live graph is in test_tensor)",
    "tinymm.Tensor": "the constructor is np.asarray's: any array-like is valid",
    "tinymm.tensor": "the constructor is np.asarray's: any array-like is valid",
    "tinymm.zeros_like": "np.zeros_like of any array-like: nothing to refuse but its dtype",
    "tinymm.ones_like": "np.ones_like of any array-like: nothing to refuse but its dtype",
    "tinymm.default_rng": "no arguments",
    "tinymm.manual_seed": "np.random.default_rng(seed) refuses a bad seed itself",
    "tinymm.is_grad_enabled": "no arguments",
    "tinymm.is_reference_mode": "no arguments",
    "tinymm.is_anomaly_enabled": "no arguments",
    "tinymm.no_grad": "a context manager without arguments",
    "tinymm.reference_mode": "a context manager of one bool",
    "tinymm.detect_anomaly": "a context manager of one bool (tests/test_reliability.py)",
    # take models or files, not arrays: their errors are tested where they live
    "tinymm.gradcheck": "a test tool over a function of tensors (tests/test_gradcheck.py)",
    "tinymm.gradcheck_module": "a test tool over a Module (tests/test_gradcheck.py)",
    "tinymm.save": "files: atomic write, bad keys listed (tests/test_io.py)",
    "tinymm.load": "files: missing/unexpected/mismatched keys listed (tests/test_io.py)",
    "nn.Module": "a base class: no arguments",
    "nn.ModuleList": "a container of modules, no numeric argument (tests/test_nn.py)",
    "nn.Sequential": "a container of modules, no numeric argument (tests/test_nn.py)",
    "nn.Parameter": "the constructor of Tensor with requires_grad=True",
    "optim.Optimizer": "a base class; SGD, Adam and AdamW are fuzzed",
    "optim.set_lr": "sets one float on every group; the optimizers check it at step",
    "optim.weight_decay_groups": "takes a model (tests/test_optim.py)",
    "audio.istft": "takes the complex output of stft: its round trip is in tests/test_audio.py",
    # the data sets and models: generated and built from a few ints, tested where they live
    "data.BPETokenizer": "text in, ids out: its errors are in tests/test_tokenizer.py",
    "data.ShapesData": "a container returned by make_shapes (tests/test_shapes.py)",
    "data.parse_caption": "text in (tests/test_shapes.py)",
    "data.splits": "the data set's splits (tests/test_shapes.py)",
    "models.CLIP": "built from nn layers, which are fuzzed; shapes in tests/test_clip.py",
    "models.TextTransformer": "built from nn layers, which are fuzzed (tests/test_clip.py)",
    "models.ViT": "built from nn layers, which are fuzzed (tests/test_vit.py)",
    "models.zero_shot_classifier": "takes a CLIP model and prompts (tests/test_clip.py)",
    "data.VideoData": "a container returned by make_videos (tests/test_video.py)",
    "data.qa_splits": "make_qa's splits by image (tests/test_qa.py)",
    "diffusion.Schedule": "a class of betas; its checks (range, length) in tests/test_diffusion.py",
    "diffusion.diffusion_loss": "takes a noise-predicting model (tests/test_diffusion.py)",
    "diffusion.guided_eps_fn": "wraps a noise-predicting model (tests/test_diffusion.py)",
    "diffusion.ddpm_sample": "takes a noise predictor; its loop in tests/test_diffusion.py",
    "diffusion.ddim_sample": "takes a noise predictor; its loop in tests/test_diffusion.py",
    "models.UNet": "built from nn layers, which are fuzzed (tests/test_unet.py)",
    "models.KLAutoencoder": "built from nn layers, which are fuzzed (tests/test_unet.py)",
    "models.VLM": "built from nn layers, which are fuzzed; generate's errors in tests/test_vlm.py",
    "models.VideoTransformer": "built from nn layers, which are fuzzed (tests/test_video.py)",
    "models.FrameBag": "a ViT per frame, built from nn layers (tests/test_video.py)",
    "models.AudioVisualTransformer": "built from nn layers, which are fuzzed (test_video.py)",
}


# ----------------------------------------------------------------------------------------------
# The public API, derived from the package
# ----------------------------------------------------------------------------------------------

TENSOR_OPERATORS = (
    "__add__",
    "__sub__",
    "__mul__",
    "__truediv__",
    "__pow__",
    "__matmul__",
    "__getitem__",
)


def public_api() -> set[str]:
    """Every public callable: the packages' __all__, audio's functions, Tensor's methods."""
    names = set()
    for prefix, module in (
        ("tinymm", tm),
        ("functional", tm.functional),
        ("nn", tm.nn),
        ("optim", tm.optim),
        ("data", tm.data),
        ("models", tm.models),
    ):
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and getattr(obj, "__module__", "").startswith("tinymm"):
                names.add(f"{prefix}.{name}")
    for prefix, module in (("audio", audio), ("diffusion", diffusion)):
        for name, obj in vars(module).items():
            if (
                (inspect.isfunction(obj) or inspect.isclass(obj))
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                names.add(f"{prefix}.{name}")
    for name, obj in vars(tm.Tensor).items():
        if (callable(obj) and not name.startswith("_")) or name in TENSOR_OPERATORS:
            names.add(f"Tensor.{name}")
    return names


def test_every_public_name_is_fuzzed_or_exempt():
    api = public_api()
    assert not set(FUZZ) & set(EXEMPT), set(FUZZ) & set(EXEMPT)
    missing = api - set(FUZZ) - set(EXEMPT)
    stale = (set(FUZZ) | set(EXEMPT)) - api
    assert not missing, (
        f"public, neither fuzzed nor exempt (add to FUZZ or EXEMPT): {sorted(missing)}"
    )
    assert not stale, f"in FUZZ/EXEMPT but not public: {sorted(stale)}"


@pytest.mark.parametrize("name", sorted(FUZZ))
@settings(max_examples=max(50, settings.default.max_examples))  # ci: 50 calls per function
@given(data=st.data())
def test_fuzz(name, data):
    check_call(data.draw(FUZZ[name], label=name))
