"""Lesson 04: a Qwen-VL style vision-language model: an image and a question in, text out.

The data (tinymm.data.qa): pictures of two objects that differ in shape and colour, and six
kinds of question about them, answered from the objects' attributes:
    "what colour is the circle?" -> "red"        "what shape is the red one?" -> "circle"
    "where is the red circle?" -> "top left"     "is the circle large or small?" -> "small"
    "is there a blue star?" -> "yes" / "no"      "describe the picture." -> the full caption
With two objects every answer needs binding: find the object the question names, read the
attribute it asks for. Train / val / test are different images (qa_splits).

Following the lecture (image-to-text models, Qwen-VL), with the tinymm names of each step:

0. The vision tower learns to see first (stage 1; Qwen-VL starts from OpenCLIP's trained ViT).
   The cells' centres fall on the corners of the 8 px patches, so each object is cut into four
   quarters; a linear read-out shared by all patch tokens names the object (shape, colour, size
   or "empty") at each of the token's 4 corners, so each quarter learns its whole object:
       L_1 = sum over cells, the 4 tokens around it, attributes: CE(z_p W_read, label)
   3500 steps of 64 images (~80 s), then the read-out is thrown away.           CellReadout
1. Patch embeddings of the image from that ViT, projected to the decoder's width D:
       Z_img = ViT(X)[patches] W_proj in R^{N x D},  N = 16 patches of 8x8 px
   bracketed by the <|vision_start|> / <|vision_end|> embeddings.     VLM.image_tokens, ViT.encode
2. Text tokens (byte-level BPE, as Qwen's tokenizer, with chat special tokens) mapped to
   embeddings plus learned positions:
       <|user|> what colour is the circle? <|assistant|> red <eos>
       Z_text = E_tok[ids] + E_pos in R^{L x D}    data.qa.chat_batch, train_chat_tokenizer,
                                                   VLM.text_tokens
3. Cross-modal fusion in every decoder block:
       Z_joint = [Z_img, Z_text]
       Q = LN(Z_text) W^Q,   K = LN(Z_joint) W^K,   V = LN(Z_joint) W^V
       Z_text <- Z_text + softmax(Q K^T / sqrt(d_k) + M) V W^O,   then an MLP
   Queries come from the text only; the mask M lets every text token see every image key
   and the text keys up to itself (causal).          models.vlm.lecture_fusion, joint_mask,
                                                     F.scaled_dot_product_attention
4. Next-token logits LN(z_t) W_vocab; the loss is cross entropy on the answer tokens only
   (every other target is IGNORE_INDEX, as Qwen-VL and nanoVLM train):
       L = -1/|A| sum_{t in A} log p(s_{t+1} | image, s_<=t)       F.cross_entropy(ignore_index)
5. Answering: greedy decoding with a KV cache: each block's image keys/values computed once
   per image, a new token's k, v appended as it is written.              VLM.generate

Evaluation on held-out images: exact match of the generated answer, per question type; the
description is right when the set of (shape, colour, size, position) objects parsed from it
(data.parse_caption) equals the truth. Then every test question is asked about a *different*
test image (swapped_image_accuracy): if the model looks at the image, it falls to about what
answering from the question alone gives (answer_prior_accuracy: the most common training answer
of each question type). Generation speed with and without the KV cache, same prompts, same
answers.

Training (stage 2): each step takes 32 training images with all six of their questions (192
turns); an image is encoded once, and the short turns and the descriptions are decoded as two
batches so little time goes to padding (loss_fn). The ViT keeps learning with the decoder. What
the model learns first, and last (val scores in the progress lines): sizes, positions and
descriptions (the decoder reads the objects cell by cell), and the answers found by colour
("what shape is the red one?"); last, the answers found by shape ("what colour is the circle?",
"is there a blue star?"): queries that must match a shape word to the patches that show it.
That step comes suddenly, and it is what the choices below are for. Measured (seed 0 unless
said): without stage 1, 3000 steps reached vqa 0.74 and descriptions 0.26 (shape was learned
last and slowly through the answers alone; seeds 1 and 2: 0.70, 0.59); with a read-out of all
16 tokens at once, 0.976 / 0.906 on seed 0, but on seed 1 colour questions stayed at 0.5 (one
of the two colours) for 2400 steps, also with a 2x2 read-out, with the per-token read-out,
with a 4-block decoder (0.71 by the end) and with answer tokens weighted by turn; a decoder
with 8 heads of width 8 instead of 4 of width 16 (more heads, more chances that one starts
matching shapes; the same cost) found it by step ~1500 on seed 1, but not on seed 2 (there
also not with learning rate 2e-3, a 4-block decoder, or word embeddings starting at N(0, 1),
which slowed everything). Padding the pictures by half a patch, so that 5 x 5 patches are
centred on the cells and one token holds each object whole, read shapes better in stage 1
(0.86 against 0.80 per token) and gave seed 2 vqa 0.883 (colour 0.60), but seed 0 0.786
(colour 0.55) and seed 1 0.947, for 1.5x the tokens: not kept. What helped most: a longer
stage 1, 3500 steps instead of 2000 (+35 s): each token then reads its object's shape 0.92-0.95
of the time on held-out pictures (0.79-0.83 after 2000), and seed 2 found objects by shape by
step ~1800 (colour 0.93): the better each patch token knows its shape, the sooner a query can
match a shape word to it. With it seeds 1 and 2 meet every target and seed 0 misses "is there
a ...?" (0.674; vqa 0.896); with 2000 steps seeds 0 and 1 met them and seed 2 missed (0.773).
Holding the peak learning rate for the first half of stage 2 (then the cosine) helped again:
seeds 0 / 1 / 2 vqa 0.968 / 0.988 / 0.916 after 2400 steps, seed 2's "is there" 0.72 the one
miss; it was only late, and 3000 steps (affordable once the decoder's MLPs took the tanh GELU
and the gradient of the repeated image rows a sort instead of np.add.at: 11 -> 15 steps/s) gave
vqa 0.988 / 0.977 / 0.987, every question type >= 0.948, descriptions 0.94-0.95. When
self-attention came to take Q, K and V from one product (the same function, other float32
rounding), seed 2's "is there" was late again (0.754 after 3000 steps, rising: 0.61, 0.67, 0.75
at the evaluations); 3600 steps, the peak held for 1800, give vqa 0.988 / 0.994 / 0.991, every
question type >= 0.968, descriptions 0.946-0.966 (seed 2 found "is there" by step 1800, 0.935).
Tried before stage 1 existed: 64 patches of 4 px (slower per step), a ViT of width 128, 64
images with two turns each, learning rates 5e-4 and 3e-3. Starting the vision tower from lesson
03's CLIP (--vision-from) skips stage 1.
Measured results: README.md.

Options besides the lesson contract's: --fusion lecture|prefix|resampler (the alternatives of
models/vlm.py, same data and steps, for the README's table), --vision-from runs/03_clip/clip
(start the vision tower from lesson 03's trained CLIP; the default trains from scratch).

What to look at: runs/04_vlm/dialogue.png (questions, answers, right or wrong),
answer_attention.png (each answer token's attention over the patches: it finds the object),
fused_attention.png (the lecture's matrix: text queries x [image keys | text keys]), loss.png.
"""

import time
from pathlib import Path

import numpy as np

import tinymm as tm
from tinymm import functional as F
from tinymm import nn, optim, viz
from tinymm.data import COLOURS, SHAPES, SIZES, parse_caption
from tinymm.data.qa import (
    QUESTION_TYPES,
    VISION_END,
    VISION_START,
    chat_batch,
    chat_prompt,
    decode_answer,
    qa_splits,
    train_chat_tokenizer,
)
from tinymm.models import ViT
from tinymm.models.clip import load_clip
from tinymm.models.vlm import FUSIONS, VLM
from tinymm.train import checkpointing, fit, lesson_args, result_line

# --- config ---------------------------------------------------------------------------------------


def lesson_options(parser):
    parser.add_argument("--fusion", choices=FUSIONS, default="lecture")
    parser.add_argument("--vision-from", type=Path, default=None, help="lesson 03's clip folder")


args = lesson_args("04_vlm", __doc__, options=lesson_options)

IMAGE, PATCH = 32, 8  # 4 x 4 = 16 patches
VIT_DIM, VIT_DEPTH, VIT_HEADS, DIM, DEPTH, HEADS = 64, 4, 4, 64, 3, 8
VOCAB_SIZE, MAX_LEN = 400, 32
BATCH, LR, WEIGHT_DECAY = 32, 1e-3, 0.05  # BATCH images, each with its 6 questions
STEPS = args.steps or (30 if args.quick else 3600)
VISION_STEPS, VISION_BATCH, VISION_LR = (20 if args.quick else 3500), 64, 2e-3  # stage 1
N_TRAIN, N_VAL, N_TEST = (300, 32, 48) if args.quick else (12_000, 200, 500)
SHORT_TYPES = [k for k in QUESTION_TYPES if k != "describe"]  # one-word-or-two answers
tm.manual_seed(args.seed)
t_start = time.perf_counter()

# --- data: two-object scenes, six questions per image ---------------------------------------------
data = qa_splits(N_TRAIN, N_VAL, N_TEST, args.seed, IMAGE)
train, val, test = data["train"], data["val"], data["test"]
tokenizer = train_chat_tokenizer(train.questions + train.answers, VOCAB_SIZE)
train_ids, train_targets, train_mask = chat_batch(tokenizer, train.questions, train.answers)
print(
    f"{len(train.scenes)} training images, {len(train)} questions; vocabulary "
    f"{tokenizer.vocab_size}; up to {train_ids.shape[1]} tokens per turn"
)
print(f"e.g. {train.questions[0]!r} -> {train.answers[0]!r}")


def per_image(*arrays):
    """(Q, L) arrays of image-major questions -> (images, 6, L): a batch takes whole images."""
    return [a.reshape(-1, len(QUESTION_TYPES), a.shape[-1]) for a in arrays]


# --- model: ViT patch tokens + the decoder that fuses them --------------------------------------
if args.vision_from is not None:
    clip, _ = load_clip(args.vision_from)
    vision = clip.vision
    print(f"vision tower from {args.vision_from}: {vision}")
else:
    vision = ViT(IMAGE, PATCH, 3, VIT_DIM, VIT_DEPTH, VIT_HEADS)

# --- stage 1: the vision tower learns to see ------------------------------------------------------
# Qwen-VL starts from a ViT that already sees (OpenCLIP's). Here the ViT first learns, on its own,
# to name what is in each of the 9 cells. The cells' centres (8, 16, 24 px) fall on the corners
# of the 8 px patches, so every object is cut into four quarters, one per patch. A linear read-out
# of each patch token, shared by all, names the object at each of the token's 4 corners; each of
# the 4 tokens that meet at an object's centre must name it on its own, so every quarter learns
# the whole object (and the decoder can find it by any of them). Thrown away after VISION_STEPS.
CELLS = 9  # the 3 x 3 grid of positions
READ = {"shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES)}  # + 1 class: empty
# the 4 tokens around cell (r, c), as (rows, columns) of the token grid and the corner they see
# it at (0 top left, 1 top right, 2 bottom left, 3 bottom right of the token)
AROUND = [(slice(0, 3), slice(0, 3), 3), (slice(0, 3), slice(1, 4), 2)]
AROUND += [(slice(1, 4), slice(0, 3), 1), (slice(1, 4), slice(1, 4), 0)]


class CellReadout(nn.Module):
    """The ViT and a linear read-out of each patch token: for each cell, the 4 tokens around
    its centre each give (N, 9, values + 1) logits per attribute, the last class 'empty'."""

    def __init__(self, vision):
        super().__init__()
        if vision.grid != (4, 4):
            raise ValueError(f"the read-out expects a 4x4 patch grid, got {vision.grid}")
        self.vision = vision
        self.classes = [n + 1 for n in READ.values()]
        self.head = nn.Linear(vision.dim, 4 * sum(self.classes))  # 4 corners per token

    def forward(self, images):
        """[per token around a cell: [per attribute: logits (N, 9, values + 1)]]"""
        z = self.vision.encode(images)[:, 1:]  # (N, 16, D): the patch tokens, [CLS] dropped
        n = z.shape[0]
        logits = self.head(z).reshape(n, 4, 4, 4, sum(self.classes))  # row, col, corner, class
        cuts = np.cumsum([0] + self.classes)
        views = []
        for rows, cols, corner in AROUND:
            cell = logits[:, rows, cols, corner].reshape(n, CELLS, -1)  # cell r * 3 + c
            views.append([cell[:, :, a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
        return views


def cell_labels(scenes) -> list[np.ndarray]:
    """Per attribute, (n, 9): the value of the object in each cell, or `values` (empty)."""
    labels = []
    for name, n in READ.items():
        cells = np.full((len(scenes.images), CELLS), n)
        np.put_along_axis(cells, scenes.position, getattr(scenes, name), axis=1)
        labels.append(cells)
    return labels


def shape_hits(logits, shapes) -> np.ndarray:
    """Whether the shape read in each occupied cell is right."""
    return (logits.data.argmax(-1) == shapes)[shapes < READ["shape"]]


def readout_loss(readout, images, *labels):
    views = readout(images)
    loss = sum(F.cross_entropy(lg, y) for v in views for lg, y in zip(v, labels, strict=True))
    return loss / len(views), float(np.mean([shape_hits(v[0], labels[0]).mean() for v in views]))


vision_readout = None
if args.vision_from is None and VISION_STEPS:
    readout = CellReadout(vision)
    fit(
        readout,
        optim.AdamW(optim.weight_decay_groups(readout, WEIGHT_DECAY), lr=VISION_LR),
        readout_loss,
        (train.scenes.images, *cell_labels(train.scenes)),
        steps=VISION_STEPS,
        **checkpointing(args, VISION_STEPS, "vision"),
        batch_size=VISION_BATCH,
        seed=args.seed,
        lr=lambda step: optim.cosine_schedule(
            step, VISION_STEPS, VISION_STEPS // 20, VISION_LR, VISION_LR / 20
        ),
        log_every=max(VISION_STEPS // 5, 1),
        metric_name="cell shape acc",
    )
    readout.eval()
    with tm.no_grad():
        vision_readout = float(
            np.mean(
                [shape_hits(v[0], cell_labels(val.scenes)[0]) for v in readout(val.scenes.images)]
            )
        )
    print(f"stage 1: shapes read from the patch tokens of held-out images: {vision_readout:.3f}")

vision_ids = (tokenizer.special_ids[VISION_START], tokenizer.special_ids[VISION_END])
model = VLM(
    vision, tokenizer.vocab_size, DIM, DEPTH, HEADS, args.fusion, MAX_LEN, vision_ids=vision_ids
)
print(f"VLM ({args.fusion} fusion): {model.num_parameters():,} parameters")


# --- train: cross entropy on the answer tokens only --------------------------------------------
def loss_fn(model, image, ids, targets, mask):
    """Cross entropy over the answer tokens of all six questions about each image of the batch.
    The images are encoded once; the descriptions (long) and the other questions (short) are
    decoded as two batches, each cut to its longest turn, so little time goes to padding."""
    z_img = model.image_tokens(train.scenes.images[image])  # (B, N_img, D)
    describe = QUESTION_TYPES.index("describe")
    losses, hits = [], []
    for kinds in ([k for k in range(len(QUESTION_TYPES)) if k != describe], [describe]):
        rows = np.repeat(np.arange(len(image)), len(kinds))  # image of each question
        i, t, m = (a[:, kinds].reshape(len(rows), -1) for a in (ids, targets, mask))  # (B k, L)
        length = int(m.any(axis=0).sum())  # drop the all-padding columns
        logits = model.decode(z_img[rows], i[:, :length], m[:, :length])  # (B k, L, vocab)
        answer = t[:, :length] != -100
        # ignore_index: no loss on the prompt and the padding; weighted by answer tokens
        losses.append(F.cross_entropy(logits, t[:, :length]) * float(answer.sum()))
        hits.append((logits.data.argmax(-1) == t[:, :length])[answer])
    n_tokens = sum(len(h) for h in hits)
    return (losses[0] + losses[1]) / n_tokens, float(np.concatenate(hits).mean())


def answer(split, images=None, batch=256) -> list[str]:
    """Greedy answers to every question of a split (about `images`, default its own)."""
    images = split.scenes.images[split.image] if images is None else images
    prompts = [chat_prompt(tokenizer, q) for q in split.questions]
    out = [""] * len(split)
    for kind in range(len(QUESTION_TYPES)):  # a question type at a time: similar lengths
        rows = np.flatnonzero(split.kind == kind)
        new = 24 if QUESTION_TYPES[kind] == "describe" else 4
        for i in range(0, len(rows), batch):
            r = rows[i : i + batch]
            ids = model.generate(images[r], [prompts[j] for j in r], new, eos_id=tokenizer.eos_id)
            for j, generated in zip(r, ids, strict=True):
                out[j] = decode_answer(tokenizer, generated)
    return out


def objects_match(caption: str, truth: str) -> bool:
    """The description is right when it names the same set of objects as the truth."""
    try:
        return set(parse_caption(caption)) == set(parse_caption(truth))
    except ValueError:
        return False


def scores(split, answers: list[str]) -> dict[str, float]:
    right = np.array([a == t for a, t in zip(answers, split.answers, strict=True)])
    kinds = np.array(QUESTION_TYPES)[split.kind]
    short = kinds != "describe"
    out = {"vqa_accuracy": float(right[short].mean())}
    out |= {f"vqa_{k}": float(right[kinds == k].mean()) for k in SHORT_TYPES}
    describe = np.flatnonzero(~short)
    out["caption_objects_exact"] = float(
        np.mean([objects_match(answers[i], split.answers[i]) for i in describe])
    )
    return out


def evaluate():
    model.eval()
    s = scores(val, answer(val))
    model.train()
    per_type = {k: s[f"vqa_{k}"] for k in SHORT_TYPES}
    return {"val_vqa": s["vqa_accuracy"], **per_type, "val_caption": s["caption_objects_exact"]}


def learning_rate(step: int) -> float:
    """Warm up, hold the peak for the first half, then a cosine to LR / 20: finding objects by
    shape comes late and suddenly, and comes sooner while the rate is still high."""
    hold = STEPS // 2
    if step < hold:
        return (
            optim.cosine_schedule(step, STEPS, STEPS // 20, LR, LR / 20)
            if step < STEPS // 20
            else LR
        )
    return optim.cosine_schedule(step - hold, STEPS - hold, 0, LR, LR / 20)


optimizer = optim.AdamW(optim.weight_decay_groups(model, WEIGHT_DECAY), lr=LR)
history = fit(
    model,
    optimizer,
    loss_fn,
    (np.arange(len(train.scenes)), *per_image(train_ids, train_targets, train_mask)),
    steps=STEPS,
    **checkpointing(args, STEPS),
    batch_size=BATCH,
    seed=args.seed,
    lr=learning_rate,
    clip=1.0,
    evaluate=evaluate,
    eval_every=max(STEPS // 4, 1),
    log_every=max(STEPS // 20, 1),
    metric_name="answer-token acc",
)

# --- evaluate on held-out images ----------------------------------------------------------------
model.eval()
answers = answer(test)
results = scores(test, answers)
swap = (test.image + len(QUESTION_TYPES)) % len(test.image)  # the next image's question row
swapped_images = test.scenes.images[test.image[swap]]  # each question about another image
swapped = answer(test, swapped_images)
short = test.kind != QUESTION_TYPES.index("describe")
right_swapped = np.array([a == t for a, t in zip(swapped, test.answers, strict=True)])
swapped_accuracy = float(right_swapped[short].mean())
prior = {}  # the most common training answer of each question type
for kind in range(len(QUESTION_TYPES)):
    values, counts = np.unique(np.array(train.answers)[train.kind == kind], return_counts=True)
    prior[kind] = values[counts.argmax()]
prior_accuracy = float(
    np.mean([prior[k] == a for k, a, s in zip(test.kind, test.answers, short, strict=True) if s])
)
print(f"\nheld-out images ({len(test.scenes)} images, {len(test)} questions):")
for key, value in results.items():
    print(f"  {key:<24} {value:.3f}")
print(
    f"  asked about another image: {swapped_accuracy:.3f} (answer prior "
    f"{prior_accuracy:.3f}: the most common training answer of each question type)"
)

# the KV cache: the same prompts decoded with and without it
describe = np.flatnonzero(test.kind == QUESTION_TYPES.index("describe"))[:64]
prompts = [chat_prompt(tokenizer, test.questions[i]) for i in describe]
speed, generated = {}, {}
for use_cache in (True, False):
    t0 = time.perf_counter()
    ids = model.generate(test.scenes.images[test.image[describe]], prompts, 24, use_cache=use_cache)
    speed[use_cache] = ids.size / (time.perf_counter() - t0)
    generated[use_cache] = ids
same_answers = bool(np.array_equal(generated[True], generated[False]))
print(
    f"decoding {len(describe)} descriptions x 24 tokens: {speed[True]:.0f} tokens/s with the KV "
    f"cache, {speed[False]:.0f} without ({speed[True] / speed[False]:.1f}x); same tokens: "
    f"{same_answers}"
)

# --- figures --------------------------------------------------------------------------------------
out = args.out
paths = [viz.training_curves(history, out / "loss.png", title=f"VLM ({args.fusion})")]
show = [int(np.flatnonzero(test.kind == k)[j]) for j in range(2) for k in range(6)]
paths.append(
    viz.dialogue_panel(
        test.scenes.images[test.image[show]],
        [test.questions[i] for i in show],
        [answers[i] for i in show],
        [test.answers[i] for i in show],
        out / "dialogue.png",
        ncols=6,
    )
)
# attention of each answer token over the patches: run the answer back through the model
first = 1 if model.vision_ids else 0  # skip <|vision_start|>
rows, labels, maps = [], [], []
focus = [int(np.flatnonzero(test.kind == k)[0]) for k in range(len(QUESTION_TYPES))]
for i in focus:
    prompt = chat_prompt(tokenizer, test.questions[i])
    written = tokenizer.encode(f" {answers[i]}", add_eos=False)[:10]
    image = test.scenes.images[test.image[[i]]]
    with tm.no_grad():
        _, weights = model(image, np.array([prompt + written]), return_weights=True)
        z_img, to_patches = model.image_tokens(image, return_weights=True)
    # the query that wrote token j sits one position before it; mean over blocks and heads
    w = weights[:, 0].mean(axis=(0, 1))[len(prompt) - 1 : len(prompt) - 1 + len(written)]
    if to_patches is None:  # image tokens are the patches
        maps.append(w[:, first : first + vision.num_patches])
    else:  # through the resampler's queries: (T, M) @ (M, N_p)
        m = model.resampler.num_queries
        maps.append(w[:, first : first + m] @ np.asarray(to_patches)[0].mean(axis=0))
    labels.append([tokenizer.decode([t]) for t in written])
    rows.append(f"{test.questions[i]} -> {answers[i]}")
paths.append(
    viz.token_attention(
        test.scenes.images[test.image[focus]],
        labels,
        maps,
        vision.grid,
        out / "answer_attention.png",
        row_titles=rows,
    )
)
i = focus[QUESTION_TYPES.index("colour")]
prompt = chat_prompt(tokenizer, test.questions[i])
ids = np.array([prompt + tokenizer.encode(f" {answers[i]}")])
with tm.no_grad():
    _, weights = model(test.scenes.images[test.image[[i]]], ids, return_weights=True)
w = weights[-1, 0].mean(axis=0)  # last block, mean of heads: (L, N_img + L)
n_img = w.shape[1] - ids.shape[1]
text_labels = [tokenizer.decode([t], skip_special=False) for t in ids[0]]
image_labels = [f"i{k}" for k in range(n_img)]
if model.vision_ids:
    image_labels[0], image_labels[-1] = "<v>", "</v>"
paths.append(
    viz.fused_attention(
        w, n_img, text_labels, image_labels + text_labels, out / "fused_attention.png"
    )
)
print("figures:", ", ".join(str(p) for p in paths))

result_line(
    {
        **results,
        "swapped_image_accuracy": swapped_accuracy,
        "answer_prior_accuracy": prior_accuracy,
        "cache_same_tokens": float(same_answers),
        "tokens_per_s_cached": round(speed[True], 1),
        "tokens_per_s_uncached": round(speed[False], 1),
        "vision_readout_shape": vision_readout,
        "fusion": args.fusion,
        "train_steps": STEPS,
    },
    time.perf_counter() - t_start,
    args.seed,
)
