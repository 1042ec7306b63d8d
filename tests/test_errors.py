"""Bad input gets a clear error, raised where the mistake is made (when the graph is built, not
inside backward), that names what was wrong and what was expected."""

from __future__ import annotations

import operator

import numpy as np
import pytest

import tinymm as tm
import tinymm.functional as F


def leaf(*shape):
    return tm.randn(*shape, requires_grad=True)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((2, 3), (4, 5), r"\(2, 3\) @ \(4, 5\).*last axis of the left operand \(3\) must equal"),
        ((3,), (4,), r"\(3,\) @ \(4,\).*only axis of the right operand \(4\)"),
        ((2, 5, 3), (2, 4), r"\(2, 5, 3\) @ \(2, 4\).*\(3\).*second-to-last.*\(2\)"),
    ],
)
def test_matmul_shape_mismatch_names_both_shapes(a, b, expected):
    with pytest.raises(ValueError, match=expected):
        leaf(*a) @ leaf(*b)


def test_matmul_batch_axes_that_do_not_broadcast():
    with pytest.raises(
        ValueError, match=r"\(2, 3, 4\) @ \(5, 4, 2\).*batch axes \(2,\) and \(5,\)"
    ):
        leaf(2, 3, 4) @ leaf(5, 4, 2)


def test_matmul_of_a_scalar_says_it_needs_an_axis():
    with pytest.raises(ValueError, match=r"at least 1 axis.*\(\) @ \(3,\)"):
        tm.matmul(tm.tensor(2.0), leaf(3))


@pytest.mark.parametrize(
    "op, symbol",
    [
        (operator.add, r"\+"),
        (operator.sub, "-"),
        (operator.mul, r"\*"),
        (operator.truediv, "/"),
        (operator.pow, r"\*\*"),
        (tm.maximum, "maximum"),
        (tm.minimum, "minimum"),
    ],
)
def test_non_broadcastable_operands_name_both_shapes_and_the_rule(op, symbol):
    with pytest.raises(ValueError, match=rf"'{symbol}'.*\(2, 3\) and \(4,\).*equal or 1"):
        op(leaf(2, 3), leaf(4))


def test_conv2d_on_a_3d_input_says_what_it_expected():
    with pytest.raises(
        ValueError, match=r"conv2d expects x of shape \(N, H, W, C_in\), got \(8, 8, 3\)"
    ):
        F.conv2d(leaf(8, 8, 3), leaf(3, 3, 3, 4))


def test_conv2d_weight_channels_mismatch_and_kernel_too_large():
    with pytest.raises(ValueError, match=r"C_in=3.*\(3, 3, 2, 4\)"):
        F.conv2d(leaf(1, 8, 8, 3), leaf(3, 3, 2, 4))
    with pytest.raises(ValueError, match=r"kernel 5x5 is larger than the padded input \(4, 4\)"):
        F.conv2d(leaf(1, 4, 4, 1), leaf(5, 5, 1, 1))


def test_patch_size_that_does_not_divide_the_image_names_both_numbers():
    with pytest.raises(ValueError, match=r"patch size 5 does not divide the image size 12x10"):
        F.patchify(leaf(1, 12, 10, 3), 5)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\), got \(12, 12\)"):
        F.patchify(leaf(12, 12), 4)


def test_linear_feature_mismatch():
    with pytest.raises(ValueError, match=r"x has 3 features \(shape \(2, 3\)\).*expects 4"):
        F.linear(leaf(2, 3), leaf(4, 5))


def test_cross_entropy_bad_targets():
    with pytest.raises(
        ValueError, match=r"logits \(4, 3\) need targets of shape \(4,\), got \(3,\)"
    ):
        F.cross_entropy(leaf(4, 3), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices, got float"):
        F.cross_entropy(leaf(2, 3), np.array([0.0, 1.0]))
    with pytest.raises(IndexError, match=r"\[0, 3\) or be ignore_index"):
        F.cross_entropy(leaf(2, 3), np.array([0, 3]))


def test_norm_and_layer_argument_errors():
    with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
        F.group_norm(leaf(1, 2, 2, 6), 4, None, None)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\), got \(2, 6\)"):
        F.group_norm(leaf(2, 6), 2, None, None)
    with pytest.raises(ValueError, match=r"'none' or 'tanh', got 'erf'"):
        F.gelu(leaf(2), approximate="erf")
    with pytest.raises(ValueError, match=r"\[0, 1\), got 1"):
        F.dropout(leaf(2), 1.0)
    with pytest.raises(IndexError, match=r"\[0, 4\), got 0..4"):
        F.embedding(np.array([0, 4]), leaf(4, 2))
    with pytest.raises(TypeError, match="integers"):
        F.embedding(np.array([0.0]), leaf(4, 2))
    with pytest.raises(ValueError, match="length 5 does not divide into 2 equal parts"):
        tm.split(leaf(5), 2)


def test_attention_argument_errors():
    with pytest.raises(ValueError, match=r"q \(2, 4\), k \(3, 5\), v \(3, 4\) do not fit"):
        F.scaled_dot_product_attention(leaf(2, 4), leaf(3, 5), leaf(3, 4))
    with pytest.raises(TypeError, match="boolean.*got int64"):
        F.scaled_dot_product_attention(
            leaf(2, 4), leaf(2, 4), leaf(2, 4), mask=np.ones((2, 2), dtype=np.int64)
        )

    with pytest.raises(ValueError, match=r"qkv must be \(N, L, 3 D\) with D divisible by heads=4"):
        F.multi_head_attention(leaf(2, 5, 18), 4)  # D = 6 is not divisible by 4 heads
    with pytest.raises(ValueError, match="heads must be a positive int, got 0"):
        F.multi_head_attention(leaf(2, 5, 12), 0)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 3\) does not broadcast"):
        F.multi_head_attention(leaf(2, 5, 12), 2, mask=np.ones((3, 3), dtype=bool))


def test_errors_come_at_construction_not_in_backward():
    """A mistake raises when the op is called: the graph is never half-built with a bad node."""
    a = leaf(2, 3)
    with pytest.raises(ValueError):
        a @ leaf(2, 3)
    (a * 2).sum().backward()  # the tensor is still usable
    np.testing.assert_array_equal(a.grad, 2.0)
