"""Lesson 01: attention, the recap the whole lecture builds on.

The task: read sixteen digits, a separator, then write the digits in reverse order.

    3 1 4 1 5 9 2 6 5 3 5 8 9 7 9 3 | 3 9 7 9 8 5 3 5 6 2 9 5 1 4 1 3

No fixed weighting of the input can do this: the model must, at every output step, find *which*
input position to copy from. That lookup is attention.

1. Each token has three representations, as a query, a key and a value:
       Q = Z W^Q,   K = Z W^K,   V = Z W^V                    (nn.MultiHeadAttention: q/k/v_proj)
   computed as one product, Z [W^Q | W^K | W^V], the three side by side.
2. Every query is compared with every key; the scores become weights that sum to 1:
       attn(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V         (F.scaled_dot_product_attention)
   The sqrt(d_k) keeps the scores' spread independent of the head size.
3. Several heads do this in parallel on d_k = D / heads slices; their outputs are concatenated
   (F.multi_head_attention) and projected back (out_proj). A pre-norm block adds an MLP:
   x + attn(ln(x)), x + mlp(ln(x))                                         (nn.TransformerBlock)
4. The tokens carry no order by themselves (attention is permutation-equivariant), so a learned
   position embedding is added: Z = E_tok[ids] + E_pos (models.TextTransformer).
5. Causal mask: position i may only attend to positions <= i, so the model can be trained on all
   output positions at once and then generate one token at a time (causal=True).
6. Loss: cross entropy of the next token, only on the answer half (F.cross_entropy, ignore_index).

What to look at: runs/01_attention/attention.png. To reverse, the output position n+i must attend
to input position n-1-i: the learned pattern is an anti-diagonal.

And runs/01_attention/attention_graph.png (viz.draw_graph): the graph the engine records for
one block of step 3, x = x + attn(ln1(x)); x = x + mlp(ln2(x)). Every op with the shape it
makes, every weight with its name in the model (text.blocks.0.attn.q_proj.weight is W^Q of
step 1, concatenated with W^K and W^V for the one product). Each op node is what
`tensor.grad_fn` shows (op, inputs, saved); backward walks these arrows the other way.
attention_graph_reference.png is the same block in reference mode (tm.reference_mode(), what
`--reference` runs everywhere): each fused node (layer_norm, multi_head_attention, gelu,
linear) opens into the composition functional.py writes, e.g. multi_head_attention into each
head's columns of Q, K and V, Q K^T / sqrt(d), softmax's max, exp, sum and divide, the product
with V, and the heads put side by side.
"""

import time

import numpy as np

import tinymm as tm
from tinymm import functional as F
from tinymm import nn, optim, viz
from tinymm.models import TextTransformer
from tinymm.train import checkpointing, fit, lesson_args, result_line

# --- config ---------------------------------------------------------------------------------------
args = lesson_args("01_attention", __doc__)
N_DIGITS = 16
SEP = 10  # token ids 0-9 are digits, 10 is the separator
VOCAB = 11
DIM, DEPTH, HEADS = 64, 2, 4
STEPS = args.steps or (40 if args.quick else 400)
BATCH = 64
tm.manual_seed(args.seed)
rng = np.random.default_rng(args.seed)
t_start = time.perf_counter()


# --- data: digits, separator, reversed digits ---------------------------------------------------
def reversal_task(digits: np.ndarray) -> np.ndarray:
    """(n, N_DIGITS) digits -> (n, 2 N_DIGITS + 1) sequences: digits, SEP, digits reversed."""
    sep = np.full((len(digits), 1), SEP)
    return np.concatenate([digits, sep, digits[:, ::-1]], axis=1)


N_TRAIN, N_TEST = (5_000, 200) if args.quick else (50_000, 1_000)
test_digits = rng.integers(0, 10, size=(N_TEST, N_DIGITS))
train_digits = rng.integers(0, 10, size=(N_TRAIN, N_DIGITS))
seen = {row.tobytes() for row in test_digits}
train_digits = train_digits[[row.tobytes() not in seen for row in train_digits]]  # held out
train_seq, test_seq = reversal_task(train_digits), reversal_task(test_digits)

# input: the sequence without its last token; target: the next token, only on the answer half
inputs, targets = train_seq[:, :-1], train_seq[:, 1:].copy()
targets[:, :N_DIGITS] = -100  # ignore_index: the digits to reverse are not predictable


# --- model: a tiny causal transformer and a head that scores the next token -----------------------
class DigitReverser(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = TextTransformer(VOCAB, 2 * N_DIGITS, DIM, DEPTH, HEADS)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        return self.head(self.text.encode(ids))  # (N, L, D) -> (N, L, VOCAB) next-token logits


model = DigitReverser()
print(model)


# --- train -------------------------------------------------------------------------------------
def loss_fn(model, ids, target):
    logits = model(ids)
    loss = F.cross_entropy(logits, target)
    answer = target != -100
    accuracy = float((logits.data.argmax(-1) == target)[answer].mean())
    return loss, accuracy


def sequence_accuracy(seq: np.ndarray) -> float:
    """Fraction of sequences whose whole reversed half is predicted right.

    With teacher forcing every answer position sees the true earlier tokens; if all of them are
    predicted right, greedy generation would write exactly this sequence, so this equals the
    whole-sequence accuracy of generation (checked below on a few examples).
    """
    with tm.no_grad():
        predicted = model(seq[:, :-1]).data.argmax(-1)[:, N_DIGITS:]
    return float(np.all(predicted == seq[:, N_DIGITS + 1 :], axis=1).mean())


optimizer = optim.AdamW(optim.weight_decay_groups(model, 0.01), lr=3e-3)
history = fit(
    model,
    optimizer,
    loss_fn,
    (inputs, targets),
    steps=STEPS,
    **checkpointing(args, STEPS),
    batch_size=BATCH,
    seed=args.seed,
    lr=lambda step: optim.cosine_schedule(
        step, STEPS, warmup=STEPS // 20, base_lr=3e-3, min_lr=1e-4
    ),
    clip=1.0,
    evaluate=lambda: {"test_seq_acc": sequence_accuracy(test_seq[:200])},
    eval_every=max(STEPS // 5, 1),
    log_every=max(STEPS // 15, 1),
)


# --- evaluate: held-out sequences, and real generation one token at a time ----------------------
model.eval()
test_accuracy = sequence_accuracy(test_seq)


@tm.no_grad()
def generate(prompt: np.ndarray) -> np.ndarray:
    """Greedy decoding: append the most likely next token, N_DIGITS times."""
    ids = prompt
    for _ in range(N_DIGITS):
        next_token = model(ids).data[:, -1].argmax(-1)
        ids = np.concatenate([ids, next_token[:, None]], axis=1)
    return ids[:, N_DIGITS + 1 :]


generated = generate(test_seq[:64, : N_DIGITS + 1])
generation_accuracy = float(np.all(generated == test_seq[:64, N_DIGITS + 1 :], axis=1).mean())
for row, out in zip(test_seq[:3], generated[:3], strict=True):
    print("input", "".join(map(str, row[:N_DIGITS])), "-> generated", "".join(map(str, out)))


# --- figures -------------------------------------------------------------------------------------
viz.training_curves(history, args.out / "loss.png", title="digit reversal")
with tm.no_grad():
    _, weights = model.text.encode(test_seq[:1, :-1], return_weights=True)
labels = [str(t) if t != SEP else "|" for t in test_seq[0, :-1]]
path = viz.attention_maps(
    weights[:, 0],
    args.out / "attention.png",
    labels,
    title="attention of each head (query row attends to key column)",
)
# the graph of one block, on the first test sequence: what backward would walk through
model.zero_grad()  # (no gradients left from training in the labels)
with tm.no_grad():
    ids = test_seq[:1, :-1]
    z = model.text.token_embedding(ids) + model.text.pos_embedding[: ids.shape[1]]
z = tm.tensor(z.data, requires_grad=True)
z.name = "Z = E_tok[ids] + E_pos"
block_out = model.text.blocks[0](z, causal=True)
block_out.name = "block output"
graph = viz.draw_graph(
    block_out, args.out / "attention_graph.png", title="one pre-norm transformer block"
)
with tm.reference_mode():  # the same block, every fused op as its plain composition
    block_out = model.text.blocks[0](z, causal=True)
block_out.name = "block output"
viz.draw_graph(
    block_out,
    args.out / "attention_graph_reference.png",
    title="the same block in reference mode: each fused op as its composition",
)
print(f"figures: {args.out / 'loss.png'}, {path}, {graph}, attention_graph_reference.png")

result_line(
    {
        "test_accuracy": test_accuracy,
        "generation_accuracy_64": generation_accuracy,
        "train_steps": STEPS,
    },
    time.perf_counter() - t_start,
    args.seed,
)
