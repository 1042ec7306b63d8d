"""Questions and answers about two-object scenes, and the chat template a VLM reads them in.

The scenes are `make_shapes(..., objects=2)` pictures whose two objects differ in shape AND in
colour, so that "the circle" or "the red one" names exactly one object. Every image gets one
question of each type, its answer read off the objects' attributes:

    type       question                              answer
    colour     "what colour is the circle?"          "red"
    shape      "what shape is the red one?"          "circle"
    position   "where is the red circle?"            "top left"
    size       "is the circle large or small?"       "small"      (or "is the red one ...")
    exists     "is there a blue star?"               "yes" / "no" (exactly balanced; half of
                                                     the "no"s swap the two objects' colours,
                                                     so only a model that binds colour to
                                                     shape can tell them apart)
    describe   "describe the picture."               the full caption, parse_caption reads it

Two objects make the questions need binding: the answer sits at one object, found by attending
to the patches of the object the question names. Seeded and deterministic; `qa_splits` draws
train / val / test from disjoint seeds, so the split is by image.

The chat template (as Qwen-VL's ChatML, with its own special tokens):

    [image tokens]  <|user|> what colour is the circle? <|assistant|> red <eos>
    `------------'  `------------------------------------------------' `------'
     Z_img (model)   prompt: chat_prompt                                answer: the loss is here

The image never enters the text ids: a model puts its tokens in front of the text between
<|vision_start|> and <|vision_end|> (`VISION_START`, `VISION_END`). The loss is on the answer
tokens and the closing <eos> only; every other target is IGNORE_INDEX, as Qwen-VL and nanoVLM
train (`chat_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .shapes import COLOURS, SHAPES, ShapesData, make_shapes
from .tokenizer import REQUIRED_SPECIALS, BPETokenizer

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "position", "size", "exists", "describe")
VISION_START, VISION_END, USER, ASSISTANT = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|user|>",
    "<|assistant|>",
)
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (
    *REQUIRED_SPECIALS,
    VISION_START,
    VISION_END,
    USER,
    ASSISTANT,
)
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: no loss at this target
DISTINCT_FRACTION = (5 / 6) * (7 / 8)  # P(two objects differ in shape and in colour)


@dataclass
class QAData:
    """Question/answer turns about images.

    scenes:    ShapesData of the images (M, H, W, 3), two objects each.
    image:     (Q,) int64, the image each question is about (index into scenes).
    kind:      (Q,) int64, the question's type (index into QUESTION_TYPES).
    questions, answers: Q strings each.
    """

    scenes: ShapesData
    image: np.ndarray
    kind: np.ndarray
    questions: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.questions)


def make_qa(n_images: int, seed: int | np.random.SeedSequence = 0, image_size: int = 32) -> QAData:
    """n_images scenes of two objects that differ in shape and colour, with one question of
    each of the QUESTION_TYPES per image: 6 n_images questions, image-major.

    Same seed, same arguments -> the same images, questions and answers.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    draw_seed, question_seed = root.spawn(2)
    # draw enough scenes that n_images of them have two different shapes and colours
    drawn = make_shapes(int(n_images / DISTINCT_FRACTION * 1.15) + 16, draw_seed, image_size, 2)
    ok = (drawn.shape[:, 0] != drawn.shape[:, 1]) & (drawn.colour[:, 0] != drawn.colour[:, 1])
    while ok.sum() < n_images:  # rare: draw more from the same stream's next child
        draw_seed = draw_seed.spawn(1)[0]
        more = make_shapes(n_images, draw_seed, image_size, 2)
        drawn = _join(drawn, more)
        ok = (drawn.shape[:, 0] != drawn.shape[:, 1]) & (drawn.colour[:, 0] != drawn.colour[:, 1])
    scenes = drawn.subset(np.flatnonzero(ok)[:n_images])

    rng = np.random.default_rng(question_seed)
    target = rng.integers(2, size=(n_images, len(QUESTION_TYPES)))  # which object is asked about
    exists_answer = rng.permutation(np.arange(n_images) % 2 == 0)  # exactly balanced yes / no
    questions, answers = [], []
    for i in range(n_images):
        objects = scenes.attributes(i)
        for t, kind in enumerate(QUESTION_TYPES):
            obj = objects[target[i, t]]
            if kind == "exists":
                q, a = _exists_question(rng, objects, bool(exists_answer[i]))
            elif kind == "describe":
                q, a = "describe the picture.", scenes.captions[i]
            else:
                q, a = _attribute_question(rng, kind, obj)
            questions.append(q)
            answers.append(a)
    n_types = len(QUESTION_TYPES)
    return QAData(
        scenes=scenes,
        image=np.repeat(np.arange(n_images, dtype=np.int64), n_types),
        kind=np.tile(np.arange(n_types, dtype=np.int64), n_images),
        questions=questions,
        answers=answers,
    )


def _attribute_question(rng: np.random.Generator, kind: str, obj) -> tuple[str, str]:
    """A question naming the object by what it does NOT ask about, and its answer."""
    if kind == "colour":
        return f"what colour is the {obj.shape}?", obj.colour
    if kind == "shape":
        return f"what shape is the {obj.colour} one?", obj.shape
    if kind == "position":
        return f"where is the {obj.colour} {obj.shape}?", obj.position
    name = obj.shape if rng.integers(2) else f"{obj.colour} one"
    return f"is the {name} large or small?", obj.size


def _exists_question(rng: np.random.Generator, objects, yes: bool) -> tuple[str, str]:
    """ "is there a {colour} {shape}?": yes for one of the objects; no for a pair that is not
    there: half of the time the two objects' colours swapped (needs binding), else any."""
    if yes:
        obj = objects[rng.integers(2)]
        return f"is there a {obj.colour} {obj.shape}?", "yes"
    present = {(o.colour, o.shape) for o in objects}
    if rng.integers(2):
        k = rng.integers(2)
        colour, shape = objects[k].colour, objects[1 - k].shape
    else:
        while True:
            colour = COLOURS[rng.integers(len(COLOURS))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            if (colour, shape) not in present:
                break
    return f"is there a {colour} {shape}?", "no"


def _join(a: ShapesData, b: ShapesData) -> ShapesData:
    return ShapesData(
        images=np.concatenate([a.images, b.images]),
        shape=np.concatenate([a.shape, b.shape]),
        colour=np.concatenate([a.colour, b.colour]),
        size=np.concatenate([a.size, b.size]),
        position=np.concatenate([a.position, b.position]),
        captions=a.captions + b.captions,
    )


def qa_splits(
    n_train: int, n_val: int, n_test: int, seed: int = 0, image_size: int = 32
) -> dict[str, QAData]:
    """Train / val / test question sets over disjoint images: the three seeds are children
    of np.random.SeedSequence(seed), as `splits`."""
    seeds = np.random.SeedSequence(seed).spawn(3)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {
        name: make_qa(n, s, image_size) for (name, n), s in zip(sizes.items(), seeds, strict=True)
    }


# --- the chat template ----------------------------------------------------------------------------


def train_chat_tokenizer(texts: Sequence[str], vocab_size: int) -> BPETokenizer:
    """A BPE tokenizer over the questions and answers, with the chat's special tokens."""
    return BPETokenizer.train([f" {t}" for t in texts], vocab_size, CHAT_SPECIAL_TOKENS)


def _check_chat_tokenizer(tokenizer: BPETokenizer) -> None:
    if missing := [s for s in CHAT_SPECIAL_TOKENS if s not in tokenizer.special_ids]:
        raise ValueError(f"tokenizer lacks the chat special tokens {missing}")


def chat_prompt(tokenizer: BPETokenizer, question: str) -> list[int]:
    """The ids a model is given to answer: <|user|> {question} <|assistant|>."""
    _check_chat_tokenizer(tokenizer)
    user, assistant = tokenizer.special_ids[USER], tokenizer.special_ids[ASSISTANT]
    return [user, *tokenizer.encode(f" {question}", add_eos=False), assistant]


def chat_answer(tokenizer: BPETokenizer, answer: str) -> list[int]:
    """The ids of an answer as the model should write it: {answer} <eos>."""
    return tokenizer.encode(f" {answer}", add_eos=True)


def chat_batch(
    tokenizer: BPETokenizer, questions: Sequence[str], answers: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forcing batch: ids (N, L), targets (N, L), mask (N, L) bool (True = a token).

    Sequence s = prompt + answer; ids = s[:-1] right-padded; targets[t] = s[t + 1] where
    s[t + 1] belongs to the answer (its <eos> too), IGNORE_INDEX elsewhere (the prompt and the
    padding): the loss is on the answer only.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    seqs, starts = [], []
    for q, a in zip(questions, answers, strict=True):
        prompt = chat_prompt(tokenizer, q)
        seqs.append(prompt + chat_answer(tokenizer, a))
        starts.append(len(prompt))
    length = max(len(s) for s in seqs) - 1
    ids = np.full((len(seqs), length), tokenizer.pad_id, dtype=np.int64)
    targets = np.full((len(seqs), length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=bool)
    for row, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[row, : len(s) - 1] = s[:-1]
        mask[row, : len(s) - 1] = True
        targets[row, start - 1 : len(s) - 1] = s[start:]
    return ids, targets, mask


def decode_answer(tokenizer: BPETokenizer, ids: Sequence[int]) -> str:
    """Generated ids -> the answer text: everything before the first <eos>, stripped."""
    ids = list(map(int, ids))
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids).strip()
