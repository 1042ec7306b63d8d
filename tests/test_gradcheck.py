"""Tests of gradcheck itself: it must pass correct gradients and catch wrong ones, in both the
full-Jacobian mode (small inputs) and the random-direction mode (large inputs); and of
gradcheck_module, the same for a whole model's loss, naming the parameter that is wrong."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

import tinymm as tm
from tinymm import functional as F
from tinymm import nn
from tinymm.gradcheck import FULL_JACOBIAN_MAX, gradcheck, gradcheck_module
from tinymm.models import ViT
from tinymm.tensor import record


def square_with_backward(x, backward):
    """x^2 with a chosen (maybe wrong) backward, as a test-only op."""
    return record("square", x.data**2, (x,), backward, saved=(x,))


def correct(x):
    return square_with_backward(x, lambda g: (2 * x.data * g,))


def wrong_at(index):
    def fn(x):
        def backward(g):
            grad = 2 * x.data * g
            grad[index] += 0.5  # one wrong element
            return (grad,)

        return square_with_backward(x, backward)

    return fn


def leaf(shape, seed=0):
    return tm.tensor(np.random.default_rng(seed).uniform(0.5, 1.5, shape), requires_grad=True)


def test_returns_true_on_correct_gradients():
    assert gradcheck(correct, [leaf((3, 4))]) is True
    assert gradcheck(lambda a, b: (a @ b).tanh(), [leaf((2, 3)), leaf((3, 2), 1)]) is True


def test_names_the_input_and_the_worst_element_of_a_wrong_backward():
    a, b = leaf((2, 3)), leaf((2, 3), 1)
    with pytest.raises(AssertionError, match=r"input 1 \(2, 3\) at index \(1, 2\)"):
        gradcheck(lambda a, b: correct(a) + wrong_at((1, 2))(b), [a, b])
    with pytest.raises(AssertionError, match=r"input 0 \(2, 3\) at index \(0, 1\).*analytic"):
        gradcheck(lambda a, b: wrong_at((0, 1))(a) * b, [a, b])


def test_catches_a_missing_broadcast_reduction_in_a_wrong_op():
    def scale_by_wrong(x, s):  # x * s with s's gradient not summed over the broadcast axis
        out = x.data * s.data
        return record("scale", out, (x, s), lambda g: (g * s.data, (g * x.data)[:1]))

    with pytest.raises(AssertionError, match="input 1"):
        gradcheck(scale_by_wrong, [leaf((3, 2)), leaf((1, 2), 1)])


def test_random_direction_mode_catches_a_wrong_gradient_on_a_large_input():
    n = FULL_JACOBIAN_MAX + 44
    x = leaf((n,))
    assert gradcheck(correct, [x])
    with pytest.raises(AssertionError, match=r"input 0 \(300,\) along a random direction"):
        gradcheck(wrong_at(123), [x])  # one wrong element out of 300 is still caught

    def scaled_wrong(x):
        return square_with_backward(x, lambda g: (2.001 * x.data * g,))  # 0.05% too large

    with pytest.raises(AssertionError, match="random direction"):
        gradcheck(scaled_wrong, [x], atol=1e-7, rtol=1e-6)


def test_inputs_without_grad_are_constants_and_data_is_restored():
    a, c = leaf((2, 2)), tm.tensor(np.ones((2, 2)) * 3.0)
    before = a.data.copy()
    assert gradcheck(lambda a, c: a * c, [a, c])
    np.testing.assert_array_equal(a.data, before)
    big = leaf((20, 20))
    before = big.data.copy()
    assert gradcheck(lambda x: x.exp(), [big])
    np.testing.assert_array_equal(big.data, before)


def test_an_input_the_output_does_not_depend_on_gets_zero_gradient():
    a, b = leaf((2,)), leaf((2,), 1)
    assert gradcheck(lambda a, b: a * 2.0, [a, b])
    with pytest.raises(AssertionError, match="input 1"):  # a cut gradient is a wrong gradient
        gradcheck(lambda a, b: a * 2.0 + b.detach(), [a, b])


def test_rejects_float32_and_inputs_without_grad():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda x: x * 2, [tm.tensor([1.0, 2.0], requires_grad=True)])
    with pytest.raises(ValueError, match="no input requires grad"):
        gradcheck(lambda x: x * 2, [tm.tensor(np.ones(2))])


# ----------------------------------------------------------------------------------------------
# gradcheck_module: a whole model's loss against every parameter
# ----------------------------------------------------------------------------------------------


def tiny_vit():
    tm.manual_seed(0)
    return ViT(8, 4, channels=3, dim=8, depth=1, heads=2, num_classes=3).double().eval()


def vit_loss(model, images, labels):
    logits = model(images)
    return F.cross_entropy(logits, labels), 0.0  # (loss, metric), as fit's loss_fn


IMAGES = np.random.default_rng(0).standard_normal((2, 8, 8, 3))
LABELS = np.array([0, 2])


def test_gradcheck_module_passes_on_a_tiny_vit_in_float64():
    model = tiny_vit()
    assert any(p.size > FULL_JACOBIAN_MAX for p in model.parameters())  # both modes run
    assert gradcheck_module(model, vit_loss, IMAGES, LABELS) is True
    assert model.patch_embedding.weight.grad is not None


class Gain(nn.Module):
    """y = x * gain through a hand-written op whose gain gradient is `factor` times too large
    on the elements `where` (all of them by default)."""

    def __init__(self, dim, factor, where=...):
        super().__init__()
        self.gain = nn.Parameter(np.linspace(0.5, 1.5, dim))
        self.factor, self.where = factor, where

    def forward(self, x):
        gain = self.gain

        def backward(g):
            g_gain = (g * x.data).reshape(-1, gain.shape[-1]).sum(0)
            g_gain[self.where] *= self.factor
            return g * gain.data, g_gain

        return record("gain", x.data * gain.data, (x, gain), backward, saved=(x, gain))


class GainedViT(nn.Module):
    def __init__(self, gain: Gain):
        super().__init__()
        self.vit = tiny_vit()
        self.vit.blocks[0].gain = gain  # inside a block, so its name is a dotted path

    def forward(self, images):
        block = self.vit.blocks[0]
        tokens = self.vit.encode(images)
        return self.vit.head(block.gain(tokens)[:, 0])


def test_gradcheck_module_names_the_parameter_whose_gradient_is_off_by_a_factor():
    model = GainedViT(Gain(8, factor=1.0))
    assert gradcheck_module(model, vit_loss, IMAGES, LABELS)  # the op itself is right
    model.vit.blocks[0].gain.factor = 1.5
    with pytest.raises(AssertionError, match=r"parameter 'vit.blocks.0.gain.gain' \(8,\) at index"):
        gradcheck_module(model, vit_loss, IMAGES, LABELS)


def test_gradcheck_module_finds_the_one_wrong_element_of_a_big_parameter(monkeypatch):
    module = sys.modules["tinymm.gradcheck"]  # (tinymm.gradcheck is also the function's name)
    found = []
    bisect = module._bisect
    monkeypatch.setattr(module, "_bisect", lambda *args: found.append(bisect(*args)) or found[-1])
    n = FULL_JACOBIAN_MAX + 44
    model = nn.Sequential(Gain(n, factor=3.0, where=123)).double()
    x = np.random.default_rng(1).uniform(1, 2, (2, n))
    x[:, 123] = 0.3  # not the largest gradient, so no element check picks it: halving finds it
    loss = lambda model, x: (model(tm.tensor(x)) ** 2.0).sum()  # noqa: E731
    with pytest.raises(AssertionError) as error:
        gradcheck_module(model, loss, x, elements=2)
    message = str(error.value)
    assert "parameter '0.gain' (300,) at index (123,)" in message
    analytic, numeric = (float(w) for w in re.findall(r"(?:analytic|numeric) (\S+),", message))
    assert analytic == pytest.approx(3 * numeric)
    assert found == [123], "a failing random direction, halved down to the element"


def test_gradcheck_module_rejects_float32_nondeterminism_and_bad_losses():
    with pytest.raises(TypeError, match=r"parameter 'cls_token' is float32.*double"):
        gradcheck_module(ViT(8, 4, dim=8, depth=1, heads=2), vit_loss, IMAGES, LABELS)
    block = nn.TransformerBlock(8, 2, dropout=0.5).double()  # training mode: dropout is random
    tokens = np.ones((1, 3, 8))
    with pytest.raises(ValueError, match=r"must be deterministic.*model.eval\(\)"):
        gradcheck_module(block, lambda m, x: m(x).sum(), tokens)
    with pytest.raises(TypeError, match="loss_fn returned float"):
        gradcheck_module(block.eval(), lambda m, x: 1.0, tokens)
    with pytest.raises(ValueError, match="Module has no parameters"):
        gradcheck_module(nn.Module(), lambda m: tm.tensor(0.0))
