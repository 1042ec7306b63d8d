"""Lesson 03: CLIP, contrastive image-text training, and zero-shot classification.

The data: captioned shapes, "a large red circle in the top left". Six (shape, colour) pairs
(tinymm.data.HELDOUT_PAIRS: green circle, red square, blue triangle, yellow star, magenta cross,
cyan heart) never appear in a training image or caption; every score below is on images of
exactly those unseen pairs (tinymm.data.splits(..., heldout_pairs=HELDOUT_PAIRS)).

1. Image embedding: a ViT turns the image into patch tokens plus a [CLS] token; the [CLS] state
   after the final LayerNorm, projected (no bias) and L2-normalised, is the image's vector:
       v = normalize(LN(z_cls) W_img) in R^d         (models.ViT.encode, CLIP.encode_image)
2. Text embedding: a causal transformer reads the BPE tokens; its state at [EOS] has seen the
   whole caption. Projected and normalised:
       t = normalize(z_eos W_txt) in R^d             (models.TextTransformer, CLIP.encode_text,
                                                      data.BPETokenizer, models.clip.tokenize)
3. Similarity matrix of a batch, V = [v_1..v_N], T = [t_1..t_N]:
       S_ij = v_i . t_j  (unit vectors: the cosine)  (CLIP.forward; similarity.png)
4. Symmetric contrastive loss with a learned temperature tau = 1 / exp(logit_scale):
       L_image->text = -1/N sum_i log( exp(S_ii / tau) / sum_j exp(S_ij / tau) )
       L_text->image = -1/N sum_j log( exp(S_jj / tau) / sum_i exp(S_ij / tau) )
       L = (L_image->text + L_text->image) / 2       (F.clip_loss)
   Every other caption in the batch is a negative, so a batch holding the same caption twice
   would push apart two texts that are identical: the loss keeps only the first image of each
   caption in a batch. tau starts at 0.07 and is learned; after each step logit_scale is
   clamped to at most ln 100 (CLIP.clamp_logit_scale, via fit(after_step=...); temperature.png).
5. Zero-shot: encode a prompt per class and predict y~ = argmax_k v . t_k
   (models.zero_shot_classifier). The text tower only ever read captions, so the prompt that
   works is one in their form; as the CLIP paper's prompt ensembling, a class's text vector is
   the renormalised mean over the words it does not name:
       shape "circle":        "a {size} {colour} circle in the {position}"  (2 x 8 x 9 prompts)
       colour "red":          "a {size} red {shape} in the {position}"      (2 x 6 x 9)
       pair "green circle":   "a {size} green circle in the {position}"     (2 x 9)
   The pair task (48 classes, scored on the held-out pairs) needs composition: "green circle"
   was never read nor seen, yet its text vector must land on the green circles' image vectors.
   The lecture's literal "a photo of a {shape}" is scored too (zero_shot_*_photo_prompt): its
   words "photo of" were never trained, which is the CLIP paper's point about prompts.
   Retrieval: within batches of 64 held-out images and their captions, image->text and
   text->image recall@1 (a retrieved caption that is word for word the true one counts).

Composition comes out of plain CLIP training here, given enough distinct images (20k, so the
pairs cannot be memorised) and big enough batches. Shape is the hard part: a caption differs
from the others of its batch mostly by colour, size or position, and only the few that differ
by shape alone push the towers to read shapes (for an image, a batch of 128 holds ~0.7 such
captions on average, a batch of 256 ~1.5). With batches of 128 the loss is ~0 after 2400 steps
and more steps do not help: seed 1's zero-shot shape was 0.924-0.936 at 2400 steps, 0.893 at
3200 and 0.924 at 4000. With batches of 256 (the CLIP paper's lesson: the batch is where the
negatives come from), 1600 steps: 0.971 / 0.998 / 0.959 on seeds 0 / 1 / 2, and 0.979 / 0.996
/ 0.949 once self-attention took Q, K and V from one product (other float32 rounding; seed 2
was still rising: 0.885, 0.910, 0.949 at steps 800, 1200, 1600); 2000 steps: 0.979 / 1.000 /
0.986, unseen pairs 0.943 / 0.957 / 0.912. Batches of 512
for 600 steps (the same images seen) were too few steps (0.68). Colour dropout (grey images
whose captions lose the colour word) was tried and did not clearly help.
On the held-out images each colour comes with one shape only, so retrieval there can succeed on
colour, size and position alone; the shape and pair scores are the test of shape.

The trained model is saved under runs/03_clip/clip/ (weights, tokenizer, config;
models.clip.load_clip reads it back): lesson 04 can start its vision tower from it.

What to look at: runs/03_clip/similarity.png (the lecture's matrix, bright diagonal),
zero_shot.png (unseen pairs, top-3 of 48 colour-shape prompts), temperature.png, loss.png.
"""

import time

import numpy as np

import tinymm as tm
from tinymm import functional as F
from tinymm import optim, viz
from tinymm.data import COLOURS, HELDOUT_PAIRS, POSITIONS, SHAPES, SIZES, BPETokenizer, splits
from tinymm.models import CLIP, TextTransformer, ViT, zero_shot_classifier
from tinymm.models.clip import save_clip, tokenize
from tinymm.train import checkpointing, fit, in_batches, lesson_args, result_line

# --- config ---------------------------------------------------------------------------------------
args = lesson_args("03_clip", __doc__)
IMAGE_SIZE, PATCH = 32, 8  # 4 x 4 = 16 patches + [CLS]
DIM, VIT_DEPTH, TEXT_DEPTH, HEADS, EMBED_DIM = 64, 4, 2, 4, 64
MAX_LEN, VOCAB_SIZE = 24, 320
BATCH, LR, WEIGHT_DECAY = 256, 1e-3, 0.1
STEPS = args.steps or (30 if args.quick else 2000)
N_TRAIN, N_VAL, N_TEST = (1_000, 128, 128) if args.quick else (20_000, 512, 512)
tm.manual_seed(args.seed)
t_start = time.perf_counter()

# --- data: captioned shapes, held-out (shape, colour) pairs only in test -------------------------
data = splits(N_TRAIN, N_VAL, N_TEST, args.seed, IMAGE_SIZE, heldout_pairs=HELDOUT_PAIRS)
train, val, test = data["train"], data["val"], data["test"]

PROMPTS = {  # task -> templates; "{}" is the class name
    "shape": [f"a {z} {c} {{}} in the {p}" for z in SIZES for c in COLOURS for p in POSITIONS],
    "colour": [f"a {z} {{}} {s} in the {p}" for z in SIZES for s in SHAPES for p in POSITIONS],
    "pair": [f"a {z} {{}} in the {p}" for z in SIZES for p in POSITIONS],
    "shape_photo": ["a photo of a {}"],
    "colour_photo": ["a photo of a {} shape"],
}
PAIR_NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # class c * 6 + s
tokenizer = BPETokenizer.train(
    train.captions + [t.format("") for t in PROMPTS["shape_photo"] + PROMPTS["colour_photo"]],
    VOCAB_SIZE,
)
train_ids, train_eos = tokenize(tokenizer, train.captions, MAX_LEN)
print(
    f"{len(train)} training pairs, {len(set(train.captions))} distinct captions, "
    f"vocabulary {tokenizer.vocab_size}, {train_ids.shape[1]} tokens per caption"
)

# --- model: two towers, one embedding space ------------------------------------------------------
vision = ViT(IMAGE_SIZE, PATCH, 3, DIM, VIT_DEPTH, HEADS)
text = TextTransformer(tokenizer.vocab_size, MAX_LEN, DIM, TEXT_DEPTH, HEADS)
model = CLIP(vision, text, EMBED_DIM)
print(f"CLIP: {model.num_parameters():,} parameters, tau = {model.temperature:.3f}")


# --- train ---------------------------------------------------------------------------------------
def loss_fn(model, images, ids, eos):
    """Symmetric InfoNCE on the batch, one image per distinct caption (no false negatives)."""
    _, first = np.unique(ids, axis=0, return_index=True)
    keep = np.sort(first)
    image_embeds, text_embeds = model(images[keep], ids[keep], eos[keep])
    loss = F.clip_loss(image_embeds, text_embeds, model.logit_scale)
    similarity = image_embeds.data @ text_embeds.data.T  # (N, N)
    return loss, float((similarity.argmax(1) == np.arange(len(keep))).mean())


def embed_images(images: np.ndarray) -> np.ndarray:
    return in_batches(model.encode_image, images)  # (N, d) unit vectors


@tm.no_grad()
def embed_texts(captions: list[str]) -> np.ndarray:
    return model.encode_text(*tokenize(tokenizer, captions, MAX_LEN)).data


def zero_shot(image_embeds: np.ndarray, names: list, task: str, labels: np.ndarray) -> float:
    weights = zero_shot_classifier(model, tokenizer, names, PROMPTS[task])  # (d, K)
    return float(((image_embeds @ weights).argmax(1) == labels).mean())


def recall_at_1(image_embeds, text_embeds, captions, batch=64):
    """Image->text and text->image recall@1 within batches; an identical caption counts."""
    hits = []
    for i in range(0, len(captions) - batch + 1, batch):
        s = image_embeds[i : i + batch] @ text_embeds[i : i + batch].T
        c = np.asarray(captions[i : i + batch])
        hits.append(((c[s.argmax(1)] == c).mean(), (c[s.argmax(0)] == c).mean()))
    return tuple(np.mean(hits, axis=0))


def evaluate(split=test):
    v = embed_images(split.images)
    pairs = split.colour * len(SHAPES) + split.shape
    return {
        "zero_shot_shape": zero_shot(v, SHAPES, "shape", split.shape),
        "zero_shot_colour": zero_shot(v, COLOURS, "colour", split.colour),
        "zero_shot_pairs": zero_shot(v, PAIR_NAMES, "pair", pairs),
    }


optimizer = optim.AdamW(optim.weight_decay_groups(model, WEIGHT_DECAY), lr=LR)
temperature = []


def after_step(done: int) -> None:
    model.clamp_logit_scale()  # exp(logit_scale) <= 100
    temperature.append(model.temperature)


history = fit(
    model,
    optimizer,
    loss_fn,
    (train.images, train_ids, train_eos),
    steps=STEPS,
    **checkpointing(args, STEPS),
    batch_size=BATCH,
    seed=args.seed,
    lr=lambda step: optim.cosine_schedule(step, STEPS, STEPS // 20, LR, LR / 20),
    clip=1.0,
    evaluate=evaluate,
    eval_every=max(STEPS // 4, 1),
    log_every=max(STEPS // 20, 1),
    metric_name="batch recall@1",
    after_step=after_step,
)

# --- evaluate on the held-out pairs -------------------------------------------------------------
model.eval()
image_embeds, text_embeds = embed_images(test.images), embed_texts(test.captions)
results = evaluate(test)
recall_i2t, recall_t2i = recall_at_1(image_embeds, text_embeds, test.captions)
seen = evaluate(val)
print(
    f"seen pairs (val): shape {seen['zero_shot_shape']:.3f}, colour "
    f"{seen['zero_shot_colour']:.3f}, pairs {seen['zero_shot_pairs']:.3f}"
)
photo_shape = zero_shot(image_embeds, SHAPES, "shape_photo", test.shape)
photo_colour = zero_shot(image_embeds, COLOURS, "colour_photo", test.colour)
print(
    f"'a photo of a {{shape}}': {photo_shape:.3f}, 'a photo of a {{colour}} shape': "
    f"{photo_colour:.3f}, final tau {model.temperature:.4f}"
)

# --- save: lesson 04 can start its vision tower from this CLIP (--vision-from runs/03_clip/clip) --
config = dict(image_size=IMAGE_SIZE, patch_size=PATCH, dim=DIM, vit_depth=VIT_DEPTH)
config |= dict(text_depth=TEXT_DEPTH, heads=HEADS, embed_dim=EMBED_DIM, max_len=MAX_LEN)
config["vocab_size"] = tokenizer.vocab_size
print(f"model saved to {save_clip(model, tokenizer, args.out / 'clip', config)}/")

# --- figures -------------------------------------------------------------------------------------
viz.training_curves(history, args.out / "loss.png", title="CLIP", metric_name="batch recall@1")
viz.temperature_curve(history.step, temperature, args.out / "temperature.png")
_, distinct = np.unique(test.captions, return_index=True)  # 10 images, 10 different captions
show = np.sort(distinct)[:10]
viz.similarity_matrix(
    image_embeds[show] @ text_embeds[show].T,
    test.images[show],
    [test.captions[i] for i in show],
    args.out / "similarity.png",
    title="held-out pairs: S_ij = v_i . t_j",
)
pair_weights = zero_shot_classifier(model, tokenizer, PAIR_NAMES, PROMPTS["pair"])
logits = np.exp(model.logit_scale.item()) * image_embeds[:12] @ pair_weights
probs = F.softmax(tm.tensor(logits), axis=-1).data  # the zero-shot class probabilities
path = viz.zero_shot_grid(
    test.images[:12],
    probs,
    PAIR_NAMES,
    args.out / "zero_shot.png",
    labels=(test.colour * len(SHAPES) + test.shape)[:12],
    title="zero-shot on unseen (colour, shape) pairs: top 3 of 48 prompts",
)
print(f"figures: {args.out}/loss.png, temperature.png, similarity.png, zero_shot.png")

result_line(
    {
        "zero_shot_shape": results["zero_shot_shape"],
        "zero_shot_colour": results["zero_shot_colour"],
        "zero_shot_heldout_pairs": results["zero_shot_pairs"],
        "recall_i2t": recall_i2t,
        "recall_t2i": recall_t2i,
        "zero_shot_shape_photo_prompt": photo_shape,
        "zero_shot_colour_photo_prompt": photo_colour,
    },
    time.perf_counter() - t_start,
    args.seed,
)
