"""Question/answer data of lesson 04 (tinymm.data.qa): determinism, balance, answers that are
true of the picture and name one object, a split by image, and the chat template's round trip."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymm.data import BPETokenizer, parse_caption
from tinymm.data.qa import (
    QUESTION_TYPES,
    chat_answer,
    chat_prompt,
    decode_answer,
    make_qa,
    qa_splits,
    train_chat_tokenizer,
)


def oracle(objects, question: str) -> str:
    """Answer a question from the objects' attributes, independently of the generator."""
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        (obj,) = [o for o in objects if o.shape == m[1]]
        return obj.colour
    if m := re.fullmatch(r"what shape is the (\w+) one\?", question):
        (obj,) = [o for o in objects if o.colour == m[1]]
        return obj.shape
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        (obj,) = [o for o in objects if (o.colour, o.shape) == (m[1], m[2])]
        return obj.position
    if m := re.fullmatch(r"is the (\w+)(?: one)? large or small\?", question):
        (obj,) = [o for o in objects if m[1] in (o.shape, o.colour)]
        return obj.size
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objects) else "no"
    assert question == "describe the picture."
    return " and ".join(f"a {o.size} {o.colour} {o.shape} in the {o.position}" for o in objects)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12))
def test_every_answer_is_true_of_its_picture_and_names_one_object(seed, n):
    data = make_qa(n, seed, image_size=16)
    assert len(data) == n * len(QUESTION_TYPES) and len(data.scenes) == n
    np.testing.assert_array_equal(data.kind, np.tile(np.arange(len(QUESTION_TYPES)), n))
    for i in range(len(data)):
        objects = data.scenes.attributes(int(data.image[i]))
        assert objects[0].shape != objects[1].shape and objects[0].colour != objects[1].colour
        assert oracle(objects, data.questions[i]) == data.answers[i], data.questions[i]
    describe = data.kind == QUESTION_TYPES.index("describe")
    for i in np.flatnonzero(describe):  # the caption reads back as the objects
        assert parse_caption(data.answers[i]) == data.scenes.attributes(int(data.image[i]))


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = make_qa(16, 3), make_qa(16, 3), make_qa(16, 4)
    np.testing.assert_array_equal(a.scenes.images, b.scenes.images)
    assert (a.questions, a.answers) == (b.questions, b.answers)
    assert a.questions != c.questions and not np.array_equal(a.scenes.images, c.scenes.images)


def test_yes_and_no_are_exactly_balanced_and_half_the_nos_need_binding():
    data = make_qa(400, 0, image_size=16)
    exists = np.flatnonzero(data.kind == QUESTION_TYPES.index("exists"))
    answers = [data.answers[i] for i in exists]
    assert answers.count("yes") == answers.count("no") == 200
    swapped = 0
    for i in exists:
        if data.answers[i] == "no":
            colour, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", data.questions[i]).groups()
            objects = data.scenes.attributes(int(data.image[i]))
            swapped += {colour, shape} <= {a for o in objects for a in (o.colour, o.shape)}
    assert 0.35 < swapped / 200 < 0.7  # about half of the "no"s: both words are in the picture


def test_answers_of_each_type_are_spread_over_their_values():
    data = make_qa(600, 1, image_size=16)
    for kind, values in (("colour", 8), ("shape", 6), ("position", 9), ("size", 2)):
        answers = [
            a for a, k in zip(data.answers, data.kind, strict=True) if QUESTION_TYPES[k] == kind
        ]
        counts = np.unique(answers, return_counts=True)[1]
        assert len(counts) == values and counts.max() < 2.5 * len(answers) / values, kind


def test_splits_are_by_image():
    split = qa_splits(30, 10, 10, seed=5, image_size=16)
    flat = {name: d.scenes.images.reshape(len(d.scenes), -1) for name, d in split.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        distance = np.abs(flat[a][:, None] - flat[b][None]).sum(-1)
        assert distance.min() > 1.0, (a, b)  # no picture in two splits


def test_chat_template_round_trip():
    data = make_qa(20, 2, image_size=16)
    tokenizer = train_chat_tokenizer(data.questions + data.answers, 330)
    for q, a in zip(data.questions, data.answers, strict=True):
        prompt = chat_prompt(tokenizer, q)
        assert prompt[0] == tokenizer.special_ids["<|user|>"]
        assert prompt[-1] == tokenizer.special_ids["<|assistant|>"]
        assert tokenizer.decode(prompt).strip() == q  # special ids drop out
        assert decode_answer(tokenizer, chat_answer(tokenizer, a) + [5, 6]) == a  # cut at <eos>


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_images"):
        make_qa(0)
    plain = BPETokenizer.train(["a red circle"], 260)
    with pytest.raises(ValueError, match="chat special tokens"):
        chat_prompt(plain, "what colour is the circle?")
