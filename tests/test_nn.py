"""Tests for tinymm.nn: the Module tree (registration, names, state dicts, modes, printing), the
layers against hand-written NumPy, attention and the transformer block against a NumPy reference,
their symmetries (permutation equivariance, masks, cross-attention) and gradients (gradcheck)."""

import math
import re

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy.special import erf

import tinymm as tm
from tinymm import nn
from tinymm.gradcheck import gradcheck
from tinymm.tensor import record

seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------------------------
# NumPy references, written from the lecture's equations, reading the weights of the modules
# ----------------------------------------------------------------------------------------------


def np_linear(x: np.ndarray, layer: nn.Linear) -> np.ndarray:
    out = x @ layer.weight.data.astype(np.float64)
    return out if layer.bias is None else out + layer.bias.data


def np_softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_layer_norm(x: np.ndarray, ln: nn.LayerNorm) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + ln.eps) * ln.weight.data + ln.bias.data


def np_gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU, x Phi(x): nn.MLP's default, as PyTorch's."""
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def np_attention(mha, x, context=None, mask=None, causal=False):
    """Per-head split, softmax(Q K^T / sqrt(d)) V, merge heads, out_proj. Returns (out, P)."""
    x = np.asarray(x, dtype=np.float64)
    c = x if context is None else np.asarray(context, dtype=np.float64)
    n, lq, dim = x.shape
    lk = c.shape[1]
    h, d = mha.heads, dim // mha.heads

    def heads(t, length):  # (N, L, dim) -> (N, h, L, d)
        return t.reshape(n, length, h, d).transpose(0, 2, 1, 3)

    q = heads(np_linear(x, mha.q_proj), lq)
    k = heads(np_linear(c, mha.k_proj), lk)
    v = heads(np_linear(c, mha.v_proj), lk)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)  # (N, h, L_q, L_k)
    allowed = np.ones(scores.shape, dtype=bool)
    if mask is not None:
        allowed &= mask
    if causal:
        allowed &= np.tril(np.ones((lq, lk), dtype=bool))
    p = np_softmax(np.where(allowed, scores, -np.inf))
    merged = (p @ v).transpose(0, 2, 1, 3).reshape(n, lq, dim)
    return np_linear(merged, mha.out_proj), p


def np_block(block, x, mask=None, causal=False):
    """Pre-norm: x = x + attn(ln1(x)); x = x + fc2(gelu(fc1(ln2(x))))."""
    x = np.asarray(x, dtype=np.float64)
    x = x + np_attention(block.attn, np_layer_norm(x, block.ln1), mask=mask, causal=causal)[0]
    hidden = np_gelu(np_linear(np_layer_norm(x, block.ln2), block.mlp.fc1))
    return x + np_linear(hidden, block.mlp.fc2)


def randomise(model: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Give every parameter (LayerNorm's too) random values, so no weight is trivially 1 or 0."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = scale * rng.standard_normal(p.shape)
    return model


def to_float64(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    return model


def block_param_count(dim: int, hidden: int) -> int:
    layer_norms = 2 * 2 * dim
    attention = 4 * (dim * dim + dim)
    mlp = dim * hidden + hidden + hidden * dim + dim
    return layer_norms + attention + mlp


def padding_mask(lengths: list[int], lk: int) -> np.ndarray:
    """(N, 1, 1, L_k): True for the first `length` keys of each sequence."""
    return (np.arange(lk)[None, :] < np.array(lengths)[:, None])[:, None, None, :]


# ----------------------------------------------------------------------------------------------
# Module: registration, names, sharing
# ----------------------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(np.ones(3, dtype=np.float32))
        self.proj = nn.Linear(3, 2)
        self.buffer = tm.Tensor(np.zeros(3))  # a plain tensor: not a parameter
        self.note = "not a module"

    def forward(self, x, shift=0.0):
        return self.proj(x * self.scale) + shift


class Stack(nn.Module):
    def __init__(self, depth=2, dim=8, heads=2):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList([nn.TransformerBlock(dim, heads) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def test_module_registers_parameters_and_submodules_on_assignment():
    toy = Toy()
    names = [name for name, _ in toy.named_parameters()]
    assert names == ["scale", "proj.weight", "proj.bias"]
    assert toy.parameters()[0] is toy.scale
    assert toy.parameters()[1] is toy.proj.weight
    # replacing a registered attribute by a non-parameter unregisters it
    toy.proj = None
    assert [name for name, _ in toy.named_parameters()] == ["scale"]
    toy.scale = tm.Tensor(np.ones(3))
    assert toy.parameters() == []
    # a parameter assigned later is registered too
    toy.extra = nn.Parameter(np.zeros((2, 2), dtype=np.float32))
    assert [name for name, _ in toy.named_parameters()] == ["extra"]


def test_deleting_an_attribute_unregisters_it():
    toy = Toy()
    del toy.proj
    del toy.scale
    assert toy.parameters() == [] and toy.num_parameters() == 0
    assert [name for name, _ in toy.named_modules()] == [""]
    assert toy.state_dict() == {}


def test_module_without_super_init_raises_a_clear_error():
    class Forgetful(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(2, dtype=np.float32))

    with pytest.raises(RuntimeError, match="super"):
        Forgetful()


def test_named_parameters_are_dotted_paths_through_module_lists():
    model = Stack(depth=2)
    names = [name for name, _ in model.named_parameters()]
    per_block = [
        "ln1.weight",
        "ln1.bias",
        "attn.q_proj.weight",
        "attn.q_proj.bias",
        "attn.k_proj.weight",
        "attn.k_proj.bias",
        "attn.v_proj.weight",
        "attn.v_proj.bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln2.weight",
        "ln2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    expected = ["embed.weight", "embed.bias"]
    expected += [f"blocks.{i}.{n}" for i in range(2) for n in per_block]
    expected += ["ln_f.weight", "ln_f.bias"]
    assert names == expected
    named = dict(model.named_parameters())
    assert named["blocks.0.attn.q_proj.weight"] is model.blocks[0].attn.q_proj.weight
    assert named["blocks.1.mlp.fc2.bias"] is model.blocks[1].mlp.fc2.bias
    assert list(model.state_dict()) == expected


def test_shared_parameters_and_modules_are_listed_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.decoder = nn.Linear(4, 4)
            self.decoder.weight = self.encoder.weight  # tied weights
            self.again = self.encoder  # the same module under a second name

    tied = Tied()
    params = tied.parameters()
    assert len(params) == 3  # encoder.weight, encoder.bias, decoder.bias
    assert len({id(p) for p in params}) == 3
    names = [name for name, _ in tied.named_parameters()]
    assert names == ["encoder.weight", "encoder.bias", "decoder.bias"]
    assert tied.num_parameters() == 16 + 4 + 4
    assert list(tied.state_dict()) == names


def test_parameter_requires_grad_and_stays_a_leaf():
    p = nn.Parameter(np.arange(3.0, dtype=np.float32))
    assert p.requires_grad and p.is_leaf
    assert isinstance(p, tm.Tensor)
    (p * p).sum().backward()
    np.testing.assert_array_equal(p.grad, 2 * np.arange(3.0))
    assert "Parameter" in repr(p)


def test_call_is_forward_with_args_and_kwargs():
    toy = Toy()
    x = tm.Tensor(np.random.default_rng(0).standard_normal((5, 3)))
    expected = toy.forward(x, shift=2.0).data
    np.testing.assert_array_equal(toy(x, shift=2.0).data, expected)
    np.testing.assert_allclose(toy(x).data + 2.0, expected, rtol=1e-6)

    class NoForward(nn.Module):
        pass

    with pytest.raises(NotImplementedError):
        NoForward()(x)


def test_num_parameters_counts_every_element():
    assert nn.Linear(3, 4).num_parameters() == 3 * 4 + 4
    assert nn.Linear(3, 4, bias=False).num_parameters() == 12
    assert nn.Conv2d(3, 5, 3).num_parameters() == 3 * 3 * 3 * 5 + 5
    assert nn.Embedding(10, 6).num_parameters() == 60
    assert nn.TransformerBlock(8, 2).num_parameters() == block_param_count(8, 32)
    model = Stack(depth=3)
    assert model.num_parameters() == (4 * 8 + 8) + 3 * block_param_count(8, 32) + 2 * 8
    assert model.num_parameters() == sum(p.size for p in model.parameters())


def test_repr_prints_the_tree_with_parameter_counts():
    model = Stack(depth=2)
    text = repr(model)
    counts = [int(c.replace(",", "")) for c in re.findall(r"#\s*([\d,]+) params", text)]
    assert counts[0] == model.num_parameters()
    # one count per module that has parameters, in tree order (depth first)
    expected = [
        m.num_parameters()
        for _, m in model.named_modules()
        if m.num_parameters() or len(list(m.named_modules())) > 1
    ]
    assert counts == expected
    for name in ("embed", "blocks", "0", "1", "attn", "q_proj", "mlp", "fc1", "ln_f"):
        assert f"({name})" in text
    assert "TransformerBlock" in text and "MultiHeadAttention" in text
    assert text.count("\n") >= len(list(model.named_modules())) - 1


# ----------------------------------------------------------------------------------------------
# Module: state_dict / load_state_dict
# ----------------------------------------------------------------------------------------------


def test_state_dict_holds_copies():
    tm.manual_seed(0)
    model = Stack(depth=1)
    x = tm.Tensor(np.random.default_rng(1).standard_normal((2, 3, 4)))
    before = model(x).data.copy()
    sd = model.state_dict()
    for name, p in model.named_parameters():
        assert isinstance(sd[name], np.ndarray)
        assert sd[name].shape == p.shape and sd[name].dtype == p.dtype
        assert not np.shares_memory(sd[name], p.data)
        sd[name] += 1.0
    np.testing.assert_array_equal(model(x).data, before)


def test_load_state_dict_round_trip_restores_outputs_exactly():
    tm.manual_seed(0)
    source = Stack(depth=2)
    tm.manual_seed(1)
    target = Stack(depth=2)
    x = tm.Tensor(np.random.default_rng(2).standard_normal((2, 5, 4)))
    assert not np.array_equal(source(x).data, target(x).data)
    sd = source.state_dict()
    assert target.load_state_dict(sd) == ([], [])
    np.testing.assert_array_equal(target(x).data, source(x).data)
    # the target holds copies: changing the dict or the source afterwards does not reach it
    expected = source(x).data.copy()
    for value in sd.values():
        value *= 0
    for p in source.parameters():
        p.data += 1
    np.testing.assert_array_equal(target(x).data, expected)


def test_load_state_dict_lists_every_problem_in_one_error_and_loads_nothing():
    tm.manual_seed(0)
    model = Stack(depth=2)
    original = model.state_dict()
    sd = model.state_dict()
    missing = ["blocks.0.attn.k_proj.bias", "ln_f.weight"]
    for key in missing:
        del sd[key]
    unexpected = ["blocks.2.attn.q_proj.weight", "head.bias"]
    for key in unexpected:
        sd[key] = np.zeros(3, dtype=np.float32)
    mismatched = ["embed.weight", "blocks.1.mlp.fc1.bias"]
    for key in mismatched:
        sd[key] = np.zeros(sd[key].shape + (2,), dtype=np.float32)
    sd["ln_f.bias"] = np.full(8, 5.0, dtype=np.float32)  # valid: must not be loaded on error

    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(sd)
    message = str(info.value)
    for key in missing + unexpected + mismatched:
        assert key in message, f"{key} not named in:\n{message}"
    assert "missing" in message and "unexpected" in message and "shape" in message
    assert "(4, 8, 2)" in message and "(4, 8)" in message  # both shapes of a mismatch
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, original[name])


def test_load_state_dict_non_strict_loads_what_matches():
    tm.manual_seed(0)
    source = Stack(depth=1)
    tm.manual_seed(1)
    target = Stack(depth=2)
    target_before = target.state_dict()
    sd = source.state_dict()
    sd["head.weight"] = np.zeros((8, 3), dtype=np.float32)
    missing, unexpected = target.load_state_dict(sd, strict=False)
    assert sorted(missing) == sorted(k for k in target_before if k.startswith("blocks.1."))
    assert unexpected == ["head.weight"]
    after = target.state_dict()
    for name, value in after.items():
        reference = sd[name] if name in sd else target_before[name]
        np.testing.assert_array_equal(value, reference)

    # a shape mismatch is an error even when not strict
    bad = source.state_dict()
    bad["ln_f.weight"] = np.ones(9, dtype=np.float32)
    with pytest.raises(RuntimeError, match="ln_f.weight"):
        target.load_state_dict(bad, strict=False)


def test_load_state_dict_accepts_tensors_and_keeps_the_parameter_dtype():
    tm.manual_seed(0)
    layer = nn.Linear(3, 2)
    sd = {
        "weight": tm.Tensor(np.ones((3, 2))),
        "bias": np.arange(2, dtype=np.float64),
    }
    layer.load_state_dict(sd)
    assert layer.weight.dtype == np.float32 and layer.bias.dtype == np.float32
    np.testing.assert_array_equal(layer.weight.data, np.ones((3, 2)))
    np.testing.assert_array_equal(layer.bias.data, [0, 1])


# ----------------------------------------------------------------------------------------------
# Module: modes, dtype and gradients
# ----------------------------------------------------------------------------------------------


def test_module_to_double_and_float_cast_in_place_and_return_self():
    layer = nn.Linear(3, 2)
    weight = layer.weight
    layer(tm.randn(4, 3)).sum().backward()
    assert layer.double() is layer and layer.weight is weight
    assert weight.dtype == np.float64 and weight.grad.dtype == np.float64
    assert layer(tm.tensor(np.ones((1, 3)))).dtype == np.float64
    assert layer.float().weight.dtype == np.float32 and layer.to("float64") is layer
    assert layer.bias.dtype == np.float64


def test_module_to_rejects_a_dtype_that_is_not_floating():
    with pytest.raises(TypeError, match=r"Linear.to: parameters need a floating dtype.*int64"):
        nn.Linear(2, 2).to(np.int64)
    with pytest.raises(TypeError, match="not a dtype"):
        nn.Linear(2, 2).to("pixels")


def test_a_graph_that_saved_a_parameter_before_the_cast_refuses_backward():
    layer = nn.Linear(2, 2)
    loss = (tm.randn(3, 2) @ layer.weight).sum()
    layer.double()
    with pytest.raises(RuntimeError, match="modified in place by 'to'"):
        loss.backward()


def test_train_and_eval_set_the_flag_recursively():
    model = Stack(depth=2)
    modules = [m for _, m in model.named_modules()]
    assert len(modules) > 10
    assert all(m.training for m in modules)
    assert model.eval() is model
    assert not any(m.training for m in modules)
    assert model.train() is model
    assert all(m.training for m in modules)
    model.blocks[1].eval()  # a sub-tree only
    flags = {name: m.training for name, m in model.named_modules()}
    assert not flags["blocks.1"] and not flags["blocks.1.attn.q_proj"]
    assert flags["blocks.0"] and flags["blocks.0.dropout"] and flags[""]


def test_zero_grad_clears_every_gradient():
    tm.manual_seed(0)
    model = Stack(depth=1)
    x = tm.Tensor(np.random.default_rng(0).standard_normal((2, 3, 4)))
    (model(x) ** 2).sum().backward()
    assert all(p.grad is not None and np.any(p.grad != 0) for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None or not np.any(p.grad) for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------


class AddOne(nn.Module):
    def forward(self, x):
        return x + 1.0


class Double(nn.Module):
    def forward(self, x):
        return x * 2.0


def test_sequential_applies_in_order():
    x = tm.Tensor(np.array([1.0, -3.0], dtype=np.float32))
    np.testing.assert_array_equal(nn.Sequential(AddOne(), Double())(x).data, [4.0, -4.0])
    np.testing.assert_array_equal(nn.Sequential(Double(), AddOne())(x).data, [3.0, -5.0])
    tm.manual_seed(0)
    a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    seq = nn.Sequential(a, b)
    assert [name for name, _ in seq.named_parameters()] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
    ]
    h = tm.Tensor(np.random.default_rng(0).standard_normal((5, 3)))
    np.testing.assert_array_equal(seq(h).data, b(a(h)).data)


def test_module_list_registers_and_indexes():
    layers = [nn.Linear(2, 3), nn.Linear(3, 4), nn.LayerNorm(4)]
    ml = nn.ModuleList(layers)
    assert len(ml) == 3
    assert ml[0] is layers[0] and ml[2] is layers[2] and ml[-1] is layers[2]
    assert list(ml) == layers
    ml.append(nn.Linear(4, 1))
    assert len(ml) == 4 and ml[3].out_features == 1
    names = [name for name, _ in ml.named_parameters()]
    assert names[:2] == ["0.weight", "0.bias"] and names[-2:] == ["3.weight", "3.bias"]
    assert ml.num_parameters() == sum(m.num_parameters() for m in ml)
    # anything but a Module would be silently left out of parameters(): refuse it
    with pytest.raises(TypeError, match="function"):
        nn.ModuleList([nn.Linear(2, 2), lambda x: x])
    with pytest.raises(TypeError):
        nn.Sequential(nn.Linear(2, 2), tm.functional.relu)


# ----------------------------------------------------------------------------------------------
# Layers against NumPy
# ----------------------------------------------------------------------------------------------


def test_linear_weight_layout_and_output():
    tm.manual_seed(0)
    layer = nn.Linear(5, 3)
    assert layer.weight.shape == (5, 3) and layer.bias.shape == (3,)
    x = np.random.default_rng(0).standard_normal((2, 4, 5)).astype(np.float32)
    out = layer(tm.Tensor(x))
    assert out.shape == (2, 4, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out.data, np_linear(x, layer), rtol=1e-5, atol=1e-6)
    no_bias = nn.Linear(5, 3, bias=False)
    assert no_bias.bias is None
    assert [name for name, _ in no_bias.named_parameters()] == ["weight"]
    np.testing.assert_allclose(no_bias(tm.Tensor(x)).data, x @ no_bias.weight.data, rtol=1e-5)


def test_linear_init_matches_pytorch_bounds():
    tm.manual_seed(0)
    fan_in = 1024
    layer = nn.Linear(fan_in, 512)
    bound = 1 / math.sqrt(fan_in)
    for p in (layer.weight, layer.bias):
        assert p.dtype == np.float32
        assert np.abs(p.data).max() <= bound * (1 + 1e-6)
    w = layer.weight.data
    assert np.abs(w).max() > 0.99 * bound  # spans the whole interval, not a narrower one
    assert abs(w.std() - bound / math.sqrt(3)) < 0.01 * bound / math.sqrt(3)
    assert abs(w.mean()) < 0.01 * bound
    small = nn.Linear(3, 4)
    assert np.abs(small.weight.data).max() <= 1 / math.sqrt(3) * (1 + 1e-6)


def test_manual_seed_makes_init_reproducible():
    tm.manual_seed(7)
    a = nn.TransformerBlock(8, 2).state_dict()
    tm.manual_seed(7)
    b = nn.TransformerBlock(8, 2).state_dict()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_embedding_looks_up_rows():
    tm.manual_seed(0)
    emb = nn.Embedding(10, 4)
    assert emb.weight.shape == (10, 4) and emb.weight.requires_grad
    ids = np.array([[1, 3, 3], [9, 0, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out.data, emb.weight.data[ids])
    out.sum().backward()
    counts = np.bincount(ids.ravel(), minlength=10)[:, None] * np.ones((1, 4))
    np.testing.assert_array_equal(emb.weight.grad, counts)
    big = nn.Embedding(1000, 64).weight.data
    assert abs(big.std() - 1.0) < 0.02  # N(0, 1) as PyTorch


@given(seed=seeds, n=st.integers(1, 3), length=st.integers(1, 4), dim=st.integers(2, 9))
def test_layer_norm_matches_numpy(seed, n, length, dim):
    rng = np.random.default_rng(seed)
    ln = nn.LayerNorm(dim)
    x = (3 * rng.standard_normal((n, length, dim)) + 1).astype(np.float32)
    # rows of nearly equal values are ill-conditioned in float32 (x - mean cancels): skip them
    assume(x.std(-1).min() > 0.1)
    plain = ln(tm.Tensor(x)).data
    np.testing.assert_allclose(plain.mean(-1), 0, atol=1e-4)
    var = x.astype(np.float64).var(-1)
    np.testing.assert_allclose(plain.var(-1), var / (var + ln.eps), rtol=1e-3)  # eps: just under 1
    randomise(ln, seed)
    np.testing.assert_allclose(ln(tm.Tensor(x)).data, np_layer_norm(x, ln), rtol=1e-4, atol=1e-5)


def test_group_norm_matches_numpy_channels_last():
    rng = np.random.default_rng(0)
    gn = randomise(nn.GroupNorm(2, 6), seed=1)
    x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    out = gn(tm.Tensor(x)).data
    groups = x.astype(np.float64).reshape(2, 3, 4, 2, 3)  # (N, H, W, G, C/G)
    mean = groups.mean(axis=(1, 2, 4), keepdims=True)
    var = groups.var(axis=(1, 2, 4), keepdims=True)
    xhat = ((groups - mean) / np.sqrt(var + gn.eps)).reshape(x.shape)
    np.testing.assert_allclose(out, xhat * gn.weight.data + gn.bias.data, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="6"):
        nn.GroupNorm(4, 6)


def np_conv2d(x, weight, bias, stride, padding):
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    k = weight.shape[0]
    n, h, w, _ = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.zeros((n, ho, wo, weight.shape[3]))
    for i in range(ho):
        for j in range(wo):
            window = x[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            out[:, i, j] = np.einsum("nabc,abco->no", window, weight) + bias
    return out


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 0), (3, 2, 1), (2, 2, 0), (1, 1, 0)])
def test_conv2d_matches_numpy_channels_last(kernel, stride, padding):
    tm.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding)
    assert conv.weight.shape == (kernel, kernel, 3, 4) and conv.bias.shape == (4,)
    x = np.random.default_rng(0).standard_normal((2, 7, 6, 3)).astype(np.float32)
    out = conv(tm.Tensor(x))
    expected = np_conv2d(x, conv.weight.data, conv.bias.data, stride, padding)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.data, expected, rtol=1e-4, atol=1e-5)


def test_conv2d_init_bound_uses_fan_in():
    tm.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    bound = 1 / math.sqrt(16 * 3 * 3)
    assert np.abs(conv.weight.data).max() <= bound * (1 + 1e-6)
    assert np.abs(conv.weight.data).max() > 0.99 * bound


def test_mlp_is_fc2_activation_fc1():
    tm.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 3, 6)).astype(np.float32)
    mlp = nn.MLP(6, 16)
    assert mlp.fc1.weight.shape == (6, 16) and mlp.fc2.weight.shape == (16, 6)
    expected = np_linear(np_gelu(np_linear(x, mlp.fc1)), mlp.fc2)
    np.testing.assert_allclose(mlp(tm.Tensor(x)).data, expected, rtol=1e-4, atol=1e-5)
    approx = nn.MLP(6, 16, activation="gelu_tanh")  # GPT-2's tanh approximation, on request
    hidden = np_linear(x, approx.fc1)
    tanh_gelu = (
        0.5 * hidden * (1 + np.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3)))
    )
    expected = np_linear(tanh_gelu, approx.fc2)
    np.testing.assert_allclose(approx(tm.Tensor(x)).data, expected, rtol=1e-4, atol=1e-5)
    relu = nn.MLP(6, 16, out=2, activation="relu")
    expected = np_linear(np.maximum(np_linear(x, relu.fc1), 0), relu.fc2)
    out = relu(tm.Tensor(x))
    assert out.shape == (2, 3, 2)
    np.testing.assert_allclose(out.data, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        nn.MLP(6, 16, activation="swishy")


def test_dropout_train_and_eval():
    tm.manual_seed(0)
    drop = nn.Dropout(0.25)
    x = tm.Tensor(np.ones((200, 50), dtype=np.float32))
    a, b = drop(x).data, drop(x).data
    assert not np.array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((a == 0).mean() - 0.25) < 0.02
    drop.eval()
    np.testing.assert_array_equal(drop(x).data, x.data)
    np.testing.assert_array_equal(nn.Dropout(0.0)(x).data, x.data)


def test_dropout_rejects_a_bad_probability_when_built():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout"):
            nn.Dropout(p)


# ----------------------------------------------------------------------------------------------
# Attention and the transformer block against the NumPy reference
# ----------------------------------------------------------------------------------------------


@given(
    seed=seeds,
    n=st.integers(1, 3),
    lq=st.integers(1, 5),
    lk=st.integers(1, 5),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.integers(1, 4),
    cross=st.booleans(),
)
def test_multi_head_attention_matches_numpy(seed, n, lq, lk, heads, head_dim, cross):
    tm.manual_seed(seed % 2**16)
    dim = heads * head_dim
    mha = nn.MultiHeadAttention(dim, heads)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, lq, dim)).astype(np.float32)
    context = rng.standard_normal((n, lk, dim)).astype(np.float32) if cross else None
    out, weights = mha(
        tm.Tensor(x), None if context is None else tm.Tensor(context), return_weights=True
    )
    expected, p = np_attention(mha, x, context)
    assert out.shape == (n, lq, dim)
    np.testing.assert_allclose(out.data, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weights.data, p, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_masked_attention_and_block_match_numpy(causal, use_mask):
    tm.manual_seed(3)
    rng = np.random.default_rng(3)
    n, length, dim = 3, 5, 8
    mask = padding_mask([5, 2, 1], length) if use_mask else None
    x = rng.standard_normal((n, length, dim)).astype(np.float32)

    mha = nn.MultiHeadAttention(dim, 2)
    out = mha(tm.Tensor(x), mask=mask, causal=causal)
    expected = np_attention(mha, x, mask=mask, causal=causal)[0]
    np.testing.assert_allclose(out.data, expected, rtol=1e-4, atol=1e-5)

    block = randomise(nn.TransformerBlock(dim, 2), seed=4)
    out = block(tm.Tensor(x), mask=mask, causal=causal)
    assert out.shape == (n, length, dim)
    expected = np_block(block, x, mask=mask, causal=causal)
    np.testing.assert_allclose(out.data, expected, rtol=1e-4, atol=1e-4)


def test_block_matches_numpy_in_float64():
    tm.manual_seed(5)
    block = to_float64(randomise(nn.TransformerBlock(12, 3, mlp_ratio=2), seed=5))
    x = np.random.default_rng(5).standard_normal((2, 4, 12))
    out = block(tm.Tensor(x), causal=True)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.data, np_block(block, x, causal=True), rtol=1e-10, atol=1e-12)


def test_padding_mask_hides_the_padded_keys():
    tm.manual_seed(6)
    rng = np.random.default_rng(6)
    mha = nn.MultiHeadAttention(8, 2)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    context = rng.standard_normal((2, 6, 8)).astype(np.float32)
    mask = padding_mask([4, 2], 6)
    out = mha(tm.Tensor(x), tm.Tensor(context), mask=mask).data
    scrambled = context.copy()
    scrambled[0, 4:] = 100 * rng.standard_normal((2, 8))
    scrambled[1, 2:] = 100 * rng.standard_normal((4, 8))
    out2 = mha(tm.Tensor(x), tm.Tensor(scrambled), mask=mask).data
    np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-6)
    # and truncating the context to its real keys gives the same output
    alone = mha(tm.Tensor(x[1:]), tm.Tensor(context[1:, :2])).data
    np.testing.assert_allclose(out[1:], alone, rtol=1e-5, atol=1e-6)


def test_mask_must_be_boolean():
    mha = nn.MultiHeadAttention(4, 2)
    x = tm.Tensor(np.zeros((1, 3, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="boolean"):
        mha(x, mask=np.ones((1, 1, 1, 3)))


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="divisible"):
        nn.MultiHeadAttention(10, 3)


@given(seed=seeds, lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3))
def test_attention_weights_are_distributions_zero_where_masked(seed, lengths):
    tm.manual_seed(seed % 2**16)
    lk = 5
    mha = nn.MultiHeadAttention(8, 2)
    rng = np.random.default_rng(seed)
    n = len(lengths)
    x = tm.Tensor(rng.standard_normal((n, lk, 8)).astype(np.float32))
    mask = padding_mask(lengths, lk)
    for causal in (False, True):
        _, weights = mha(x, mask=mask, causal=causal, return_weights=True)
        assert weights.shape == (n, 2, lk, lk)
        w = weights.data
        allowed = np.broadcast_to(mask, w.shape)
        if causal:
            allowed = allowed & np.tril(np.ones((lk, lk), dtype=bool))
        assert np.all(w >= 0)
        np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-5)
        assert np.all(w[~allowed] == 0)
        assert np.all(w[allowed] > 0)


def test_block_return_weights():
    tm.manual_seed(0)
    block = nn.TransformerBlock(8, 2)
    x = tm.Tensor(np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32))
    out, weights = block(x, causal=True, return_weights=True)
    np.testing.assert_array_equal(out.data, block(x, causal=True).data)
    assert weights.shape == (2, 2, 4, 4)
    np.testing.assert_allclose(weights.data.sum(-1), 1, rtol=1e-5)
    assert np.all(np.triu(weights.data, k=1) == 0)


# ----------------------------------------------------------------------------------------------
# Symmetries: cross-attention, permutation equivariance, dropout modes
# ----------------------------------------------------------------------------------------------


@given(seed=seeds, lq=st.integers(1, 4), lk=st.integers(1, 6))
def test_cross_attention_uses_the_context(seed, lq, lk):
    assume(lq != lk)
    tm.manual_seed(seed % 2**16)
    mha = nn.MultiHeadAttention(8, 2)
    rng = np.random.default_rng(seed)
    x = tm.Tensor(rng.standard_normal((2, lq, 8)).astype(np.float32))
    context = rng.standard_normal((2, lk, 8)).astype(np.float32)
    out, weights = mha(x, tm.Tensor(context), return_weights=True)
    assert out.shape == (2, lq, 8)
    assert weights.shape == (2, 2, lq, lk)
    other = mha(x, tm.Tensor(context + rng.standard_normal(context.shape).astype(np.float32)))
    assert np.abs(other.data - out.data).max() > 1e-3
    # the context is a set: permuting its tokens changes nothing
    perm = rng.permutation(lk)
    shuffled = mha(x, tm.Tensor(context[:, perm]))
    np.testing.assert_allclose(shuffled.data, out.data, rtol=1e-4, atol=1e-5)


permutations = st.integers(2, 7).flatmap(lambda n: st.permutations(range(n)))


@given(seed=seeds, perm=permutations)
def test_self_attention_and_block_are_permutation_equivariant(seed, perm):
    tm.manual_seed(seed % 2**16)
    perm = np.array(perm)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, len(perm), 8)).astype(np.float32)
    mha = nn.MultiHeadAttention(8, 2)
    block = randomise(nn.TransformerBlock(8, 2), seed)
    for layer in (mha, block):
        out = layer(tm.Tensor(x)).data
        permuted = layer(tm.Tensor(x[:, perm])).data
        np.testing.assert_allclose(permuted, out[:, perm], rtol=1e-4, atol=1e-4)


@given(seed=seeds, perm=permutations)
def test_causal_block_is_not_permutation_equivariant(seed, perm):
    assume(list(perm) != sorted(perm))
    tm.manual_seed(seed % 2**16)
    perm = np.array(perm)
    x = np.random.default_rng(seed).standard_normal((2, len(perm), 8)).astype(np.float32)
    block = randomise(nn.TransformerBlock(8, 2), seed)
    out = block(tm.Tensor(x), causal=True).data
    permuted = block(tm.Tensor(x[:, perm]), causal=True).data
    assert np.abs(permuted - out[:, perm]).max() > 1e-4


def test_block_dropout_follows_train_and_eval():
    tm.manual_seed(0)
    noisy = nn.TransformerBlock(8, 2, dropout=0.5)
    clean = nn.TransformerBlock(8, 2, dropout=0.0)
    clean.load_state_dict(noisy.state_dict())
    x = tm.Tensor(np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32))
    reference = clean(x).data
    a, b = noisy(x).data, noisy(x).data
    assert not np.array_equal(a, b)
    assert not np.allclose(a, reference)
    noisy.eval()
    c, d = noisy(x).data, noisy(x).data
    np.testing.assert_array_equal(c, d)
    np.testing.assert_array_equal(c, reference)
    noisy.train()
    assert not np.array_equal(noisy(x).data, reference)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal, use_mask", [(False, False), (True, False), (False, True)])
def test_transformer_block_gradcheck(causal, use_mask):
    tm.manual_seed(0)
    block = to_float64(randomise(nn.TransformerBlock(8, 2, mlp_ratio=2), seed=0))
    x = tm.Tensor(np.random.default_rng(0).standard_normal((2, 3, 8)), requires_grad=True)
    mask = padding_mask([3, 2], 3) if use_mask else None
    params = block.parameters()
    assert gradcheck(lambda x, *_: block(x, mask=mask, causal=causal), [x, *params])


def test_cross_attention_gradcheck():
    tm.manual_seed(1)
    mha = to_float64(nn.MultiHeadAttention(4, 2))
    rng = np.random.default_rng(1)
    x = tm.Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    context = tm.Tensor(rng.standard_normal((2, 5, 4)), requires_grad=True)
    mask = padding_mask([5, 3], 5)
    assert gradcheck(lambda x, c, *_: mha(x, c, mask=mask), [x, context, *mha.parameters()])


def test_gradcheck_catches_a_wrong_gradient():
    """The gradient check above can fail: a layer whose backward is off is caught."""

    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(np.ones(3), dtype=np.float64)

        def forward(self, x):
            w = self.w
            return record("bad", x.data * w.data, (x, w), lambda g: (g * w.data, 2 * g * x.data))

    layer = Wrong()
    x = tm.Tensor(np.arange(1.0, 4.0), requires_grad=True)
    with pytest.raises(AssertionError, match="gradcheck failed"):
        gradcheck(lambda x, *_: layer(x), [x, layer.w])


def test_gradients_reach_every_block_parameter():
    tm.manual_seed(0)
    model = Stack(depth=2)
    x = tm.Tensor(np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32))
    (model(x) * tm.Tensor(np.random.default_rng(1).standard_normal((2, 3, 8)))).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert p.grad.dtype == np.float32, name
        assert np.all(np.isfinite(p.grad)) and np.any(p.grad != 0), name
