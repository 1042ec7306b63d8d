"""Seeing the graph: tensor names, the read-only `grad_fn` view of the engine's nodes, parameter
names given by nn.Module, and the layered layout and drawing of `tinymm.viz.draw_graph`.
(Module.to / double / float are tested in test_nn.py.)"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymm as tm
from tinymm import functional as F
from tinymm import nn, viz
from tinymm.models import CLIP, TextTransformer, ViT

# ----------------------------------------------------------------------------------------------
# names and grad_fn
# ----------------------------------------------------------------------------------------------


def test_a_tensor_has_no_name_until_given_one():
    x = tm.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2.0
    assert x.name is None and y.name is None and y.detach().name is None
    x.name = "x"
    assert x.name == "x" and (x + 1.0).name is None


def test_grad_fn_is_none_for_leaves_and_names_the_op_its_inputs_and_what_it_saved():
    a = tm.tensor([1.0, 2.0], requires_grad=True)
    b = tm.tensor([3.0, 4.0], requires_grad=True)
    assert a.grad_fn is None and tm.tensor([1.0]).grad_fn is None
    prod = a * b
    assert prod.grad_fn.op == "mul"
    assert prod.grad_fn.inputs[0] is a and prod.grad_fn.inputs[1] is b
    assert prod.grad_fn.saved[0] is a and prod.grad_fn.saved[1] is b
    e = prod.exp()  # exp keeps its output, not its input
    assert e.grad_fn.op == "exp" and e.grad_fn.inputs[0] is prod and e.grad_fn.saved == ()
    assert e.grad_fn == e.grad_fn and e.grad_fn != prod.grad_fn
    with tm.no_grad():
        assert (a * b).grad_fn is None


def test_grad_fn_is_read_only():
    y = tm.tensor([1.0], requires_grad=True) * 2.0
    with pytest.raises(AttributeError):
        y.grad_fn = None
    with pytest.raises(AttributeError):
        y.grad_fn.op = "add"
    with pytest.raises(AttributeError):
        y.grad_fn.inputs = ()


def test_after_backward_grad_fn_shows_a_released_node_unless_the_graph_was_retained():
    x = tm.tensor([1.0, 2.0], requires_grad=True)
    kept = (x * x).sum()
    kept.backward(retain_graph=True)
    assert not kept.grad_fn.released and kept.grad_fn.inputs[0].grad_fn.op == "mul"
    freed = (x * x).sum()
    freed.backward()
    fn = freed.grad_fn
    assert fn.released and fn.op == "sum" and "released" in repr(fn)
    with pytest.raises(RuntimeError, match=r"grad_fn.inputs of 'sum'.*retain_graph=True"):
        _ = fn.inputs
    with pytest.raises(RuntimeError, match="released"):
        _ = fn.saved


def test_module_parameters_carry_their_dotted_names():
    model = ViT(8, 4, dim=8, depth=2, heads=2, num_classes=3)
    names = dict(model.named_parameters())
    assert all(p.name == name for name, p in names.items())
    assert names["blocks.1.attn.q_proj.weight"].name == "blocks.1.attn.q_proj.weight"
    vision = ViT(8, 4, dim=8, depth=1, heads=2)
    clip = CLIP(vision, TextTransformer(20, 6, dim=8, depth=1, heads=2), embed_dim=4)
    named = list(clip.named_parameters())
    assert all(p.name == name for name, p in named)
    assert any(name.startswith("vision.blocks.0.") for name, _ in named)  # nested: full path


def test_names_follow_later_changes_anywhere_in_the_tree():
    model = ViT(8, 4, dim=8, depth=1, heads=2)
    model.blocks.append(nn.TransformerBlock(8, 2))  # added to a module already inside model
    assert model.blocks[1].ln1.weight.name == "blocks.1.ln1.weight"
    model.blocks[0].mlp.fc1.scale = nn.Parameter(np.ones(8))
    assert model.blocks[0].mlp.fc1.scale.name == "blocks.0.mlp.fc1.scale"
    shared = model.blocks[0].ln1.weight
    model.blocks[1].ln2.weight = shared  # a parameter in two places keeps its first name
    assert shared.name == "blocks.0.ln1.weight"
    assert all(p.name == name for name, p in model.named_parameters())


@pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_a_copied_model_names_its_own_parameters(copy_of):
    model = ViT(8, 4, dim=8, depth=1, heads=2)
    twin = copy_of(model)
    twin.blocks.append(nn.TransformerBlock(8, 2))  # named through the copy's own parents
    assert twin.blocks[1].ln1.weight.name == "blocks.1.ln1.weight"
    assert all(p.name == name for name, p in twin.named_parameters())
    assert not {id(p) for p in twin.parameters()} & {id(p) for p in model.parameters()}
    assert len(model.blocks) == 1


# ----------------------------------------------------------------------------------------------
# the layout: random graphs built from random ops
# ----------------------------------------------------------------------------------------------

UNARY = [lambda t: t.exp() * 0.1, lambda t: t.tanh(), lambda t: t.sum(-1, keepdims=True)]
BINARY = [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: a - b * 0.5]

programs = st.lists(
    st.tuples(st.booleans(), st.integers(0, 99), st.integers(0, 99), st.integers(0, 2)),
    min_size=1,
    max_size=40,
)


def run_program(program, leaves: int = 3):
    """Random ops on earlier tensors; the output sums every tensor nobody used (one graph)."""
    rng = np.random.default_rng(0)
    values = [tm.tensor(rng.uniform(-1, 1, (2, 3)), requires_grad=True) for _ in range(leaves)]
    for i, leaf in enumerate(values):
        leaf.name = f"leaf{i}"
    used = set()
    for binary, i, j, op in program:
        a, b = i % len(values), j % len(values)
        used.update({a, b} if binary else {a})
        out = BINARY[op](values[a], values[b]) if binary else UNARY[op](values[a])
        values.append(out)
    out = values[-1].sum()
    for k, v in enumerate(values[:-1]):
        if k not in used:
            out = out + v.sum()
    return out


def reachable(out):
    """Every tensor behind out that requires grad, by an independent walk over grad_fn."""
    seen, stack = {id(out): out}, [out]
    while stack:
        fn = stack.pop().grad_fn
        for t in fn.inputs if fn is not None else ():
            if t.requires_grad and id(t) not in seen:
                seen[id(t)] = t
                stack.append(t)
    return seen


@given(programs)
def test_layout_layers_every_edge_downward_and_holds_every_tensor_once(program):
    out = run_program(program)
    layout = viz.graph_layers(out)
    nodes = layout.nodes
    assert nodes[0].tensor is out and nodes[0].layer == 0
    graded = [id(n.tensor) for n in nodes if n.kind != "const"]
    assert sorted(graded) == sorted(reachable(out)), "each tensor with a gradient exactly once"
    for src, dst in layout.edges:  # input -> the op's result: from a deeper layer up
        assert nodes[src].layer > nodes[dst].layer
        assert any(t is nodes[src].tensor for t in nodes[dst].tensor.grad_fn.inputs)
        route = layout.routes[(src, dst)]
        assert [layer for _, layer in route] == list(
            range(nodes[src].layer, nodes[dst].layer - 1, -1)
        )
        assert route[0][0] == nodes[src].x and route[-1][0] == nodes[dst].x
    for node in nodes[1:]:  # longest path: one layer below the deepest op that uses it
        users = [nodes[d].layer for s, d in layout.edges if nodes[s] is node]
        assert node.layer == 1 + max(users)
    for k in range(layout.depth):
        row = sorted((n for n in nodes if n.layer == k), key=lambda n: n.position)
        assert [n.position for n in row] == list(range(len(row)))
        for a, b in zip(row[:-1], row[1:], strict=True):  # in order, and boxes never overlap
            assert b.x - a.x >= (viz._graph_box(a.label)[0] + viz._graph_box(b.label)[0]) / 2


@given(programs)
def test_barycentre_sweeps_never_add_crossings(program):
    out = run_program(program)
    assert viz.graph_layers(out, sweeps=8).crossings <= viz.graph_layers(out, sweeps=0).crossings


def test_constants_sit_beside_each_op_that_uses_them_or_are_left_out():
    x = tm.tensor([1.0, 2.0], requires_grad=True)
    y = (x * 0.5 + x * 0.5).sum()  # one cached 0.5 tensor, used by two ops
    layout = viz.graph_layers(y)
    halves = [n for n in layout.nodes if n.kind == "const"]
    assert len(halves) == 2 and all(n.label == "0.5" for n in halves)
    assert {id(n.tensor) for n in halves} == {id(halves[0].tensor)}
    assert all(n.kind != "const" for n in viz.graph_layers(y, constants=False).nodes)


# ----------------------------------------------------------------------------------------------
# a transformer block, drawn
# ----------------------------------------------------------------------------------------------


def block_loss():
    tm.manual_seed(0)
    block = nn.TransformerBlock(32, 4)
    x = tm.randn(2, 5, 32, requires_grad=True)
    x.name = "x (tokens)"
    loss = F.mse_loss(block(x, causal=True), np.zeros((2, 5, 32), np.float32))
    loss.name = "loss"
    return block, loss


def test_block_layout_labels_parameters_with_their_names_and_ops_with_shapes():
    block, loss = block_loss()
    layout = viz.graph_layers(loss)
    labels = {n.label.split("\n")[0]: n for n in layout.nodes}
    for name, p in block.named_parameters():
        assert labels[name].kind == "param" and labels[name].tensor is p
        assert f"{p.shape[0]}," in labels[name].label and "float32" in labels[name].label
    assert labels["x (tokens)"].kind == "input"
    assert layout.nodes[0].label.startswith("loss = ")
    ops = {n.label.split("\n")[0] for n in layout.nodes if n.kind == "op"}
    assert {"multi_head_attention", "concatenate", "layer_norm", "linear", "gelu", "add"} <= ops
    assert any(n.kind == "op" and "(2, 5, 96) float32" in n.label for n in layout.nodes)  # qkv


def test_draw_graph_saves_a_png_and_shows_gradient_shapes_after_a_retained_backward(tmp_path):
    block, loss = block_loss()
    loss.backward(retain_graph=True)
    layout = viz.graph_layers(loss)
    weight = next(n for n in layout.nodes if n.tensor is block.mlp.fc1.weight)
    assert weight.label.endswith("grad (32, 128)")
    path = viz.draw_graph(loss, tmp_path / "block.png", title="one transformer block")
    assert path == tmp_path / "block.png" and path.stat().st_size > 50_000


def test_draw_graph_errors_name_the_problem(tmp_path):
    _, loss = block_loss()
    loss.backward()
    with pytest.raises(RuntimeError, match="released the graph.*retain_graph=True"):
        viz.draw_graph(loss, tmp_path / "x.png")
    with pytest.raises(TypeError, match="expected a tinymm Tensor, got ndarray"):
        viz.graph_layers(np.ones(3))
    with pytest.raises(ValueError, match="sweeps must be an integer >= 0, got -1"):
        viz.graph_layers(tm.tensor([1.0]), sweeps=-1)
