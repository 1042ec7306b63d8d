"""Tests of gradcheck itself: it must pass correct gradients and catch wrong ones, in both the
full-Jacobian mode (small inputs) and the random-direction mode (large inputs)."""

from __future__ import annotations

import numpy as np
import pytest

import tinymm as tm
from tinymm.gradcheck import FULL_JACOBIAN_MAX, gradcheck
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
