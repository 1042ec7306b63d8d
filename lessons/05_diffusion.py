"""Lesson 05: Kandinsky style text-to-image: a KL-AE, a U-Net with text cross-attention, guidance.

The data: captioned single shapes, "a large red circle in the top left" (tinymm.data.splits).
The lecture: "Kandinsky 2.0 encodes texts ..., then uses U-Net to denoise the image and get the
intermediate final image representation. The final image is decoded by KL-AE from intermediate
representation." Three models, trained in turn:

1. KL-AE (models.autoencoder.KLAutoencoder): 32x32x3 pixels -> 8x8x4 latents (f = 4) and back.
       mu, log sigma^2 = E(x);  z = mu + sigma e;  x^ = D(z)
       L = mean (x - x^)^2 + beta KL(N(mu, sigma^2) || N(0, I))         (kl_divergence)
   The latents are scaled by 1 / std(latents), the latent scale factor, so diffusion sees unit
   variance (scale = SCALE below; ae_psnr is the held-out reconstruction quality).
2. Text encoder: a causal TextTransformer over the BPE tokens, trained jointly with the U-Net
   (default); with --clip PATH, lesson 03's CLIP text tower, frozen, as Kandinsky uses CLIP's.
   Its token states (N, L, D) are the keys and values the image reads.
3. The denoiser, a U-Net (models.unet.UNet) on the 8x8x4 latents: ResBlocks that "convolve",
   a stride-2 down-sampling and an "up-sampling" back, skips by concatenation, and
   CrossAttention where "layer output [are] Queries, and text token Keys and Values" (each
   query also knows its place, unet.position_features, and the input its coordinates):
       eps_theta(z_t, t, text)
   Training (tinymm.diffusion): t ~ U{0..T-1}, eps ~ N(0, I), linear betas 1e-4..0.02, T = 1000,
       z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps                      (q_sample)
       L = || eps - eps_theta(z_t, t, text) ||^2                          (diffusion_loss)
   and with probability P_UNCOND the caption is replaced by the empty caption, so the same
   network also learns eps_theta(z_t, t, "").
4. Sampling, "starting from the pure white noise image we do N steps": DDIM with 50 steps
   (eta = 0, diffusion.ddim_sample), or DDPM through all 1000 (diffusion.ddpm_sample), with
   classifier-free guidance (diffusion.guided_eps_fn):
       eps = eps_theta(z_t, t, "") + s (eps_theta(z_t, t, text) - eps_theta(z_t, t, ""))
   then decode: x = D(z_0 / SCALE).
5. Judging the pictures: an attribute classifier (shape, colour, size, position) trained here on
   real images only; judge_accuracy is its worst attribute on real test images. It reads the
   generated images of 256 prompts covering every attribute value: gen_<attribute> is the
   fraction it reads as the prompt said, gen_all all four right; at the default guidance scale
   and at s = 1 (gen_all_unguided). samples.npz holds those pictures and their prompts.

What made it work, and what did not. For a long time the U-Net drew the object in a random
cell whatever the caption said (position 0.09-0.13, chance) and shapes came out as blobs
(0.47-0.69), while colour and size followed the caption. The cause was the text encoder's
start: GPT-2/CLIP start word embeddings at N(0, 0.02^2), fine when a loss trains them directly;
here they are trained only through the U-Net's cross-attention, and words 50x smaller than what
the blocks add were drowned: the later words of the caption (shape, then position) never got
through. Starting them at N(0, 1) (TextTransformer(embedding_std=1.0), PyTorch's nn.Embedding
default) fixed it; on a toy (a blob placed by the caption's position word, 1200 steps) the
position was right 0.07 of the time with 0.02 and 0.81 with 1.0. Tried before that, none of
which moved position off chance: a wider U-Net (64, 128) for 900 steps; CoordConv input
channels; position features in every cross-attention query (both kept: they are cheap and
make "top left" easy to attach); whole-word tokens; a bidirectional text encoder; the cosine
schedule (worse: its abar_T ~ 0 makes DDIM's first x0_hat explode without clipping: colour
0.26). Also: a conv-net judge read 0.23 of real shapes (a ViT judge 0.98); a KL-AE trained 300
steps of 64 with KL weight 1e-4 and log-variance starting at 0 turned every shape into a round
blob (the judge read 0.44 of reconstructed shapes); 800 steps of 32, KL weight 1e-5, log sigma^2
starting at -8: 0.86-0.88 (three changes made together, their shares not measured).
Measured: README.md (seeds 0, 1 and 2).

What to look at, under runs/05_diffusion/: forward.png (a picture noised to white noise, in
pixels and in the latent space), reverse.png (one sample, z_t and the prediction x0_hat decoded
at several steps: "each clearer"), samples.png (prompts x seeds), guidance.png (a sweep over s),
reconstructions.png (KL-AE), cross_attention.png (which positions attend to which word),
schedules.png (abar_t of the linear and cosine schedules), loss curves.
"""

import time

import numpy as np

import tinymm as tm
from tinymm import diffusion, nn, optim, viz
from tinymm import functional as F
from tinymm.data import COLOURS, POSITIONS, SHAPES, SIZES, BPETokenizer, splits
from tinymm.data.shapes import Attributes, make_caption
from tinymm.models import TextTransformer, ViT
from tinymm.models.autoencoder import KLAutoencoder
from tinymm.models.clip import load_clip
from tinymm.models.unet import UNet
from tinymm.train import checkpointing, fit, in_batches, lesson_args, result_line

# --- config ---------------------------------------------------------------------------------------
args = lesson_args(
    "05_diffusion",
    __doc__,
    options=lambda parser: parser.add_argument(
        "--clip", default=None, help="lesson 03's saved CLIP folder: its text tower, frozen"
    ),
)
QUICK = args.quick
IMAGE_SIZE, LATENT_CHANNELS = 32, 4
AE_CHANNELS, AE_STEPS, AE_BATCH, AE_LR, KL_WEIGHT = (16, 32, 64), 800, 32, 2e-3, 1e-5
JUDGE_STEPS, JUDGE_BATCH, JUDGE_LR, JUDGE_DIM = 1500, 64, 2e-3, 48
TEXT_DIM, TEXT_DEPTH, TEXT_HEADS, VOCAB_SIZE = 64, 2, 4, 360  # every word one token
UNET_CHANNELS, UNET_HEADS = (48, 96), 4
STEPS = args.steps or 1500
BATCH, LR, P_UNCOND = 64, 1e-3, 0.1
GUIDANCE, SWEEP = 3.0, (1.0, 2.0, 3.0, 5.0, 8.0)
DDIM_STEPS, N_PROMPTS, N_DDPM = 50, 256, 8
N_TRAIN, N_VAL, N_TEST = 20_000, 512, 1024
if QUICK:
    AE_STEPS, JUDGE_STEPS, STEPS, JUDGE_DIM = 6, 6, args.steps or 6, 16
    AE_CHANNELS, UNET_CHANNELS, TEXT_DIM, VOCAB_SIZE = (8, 8, 16), (16, 32), 16, 280
    DDIM_STEPS, N_PROMPTS, N_DDPM, N_TRAIN, N_VAL, N_TEST = 4, 16, 2, 400, 64, 64
tm.manual_seed(args.seed)
t_start = time.perf_counter()
phase_seconds = {}


def phase(name: str, since: float) -> float:
    now = time.perf_counter()
    phase_seconds[name] = now - since
    print(f"[{name}: {now - since:.1f} s]", flush=True)
    return now


# --- data: captioned shapes -----------------------------------------------------------------------
data = splits(N_TRAIN, N_VAL, N_TEST, args.seed, IMAGE_SIZE)
train, val, test = data["train"], data["val"], data["test"]
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
print(f"{len(train)} training images, {len(set(train.captions))} distinct captions")
t_phase = phase("data", t_start)

# --- 1. the KL-AE: pixels <-> 8x8x4 latents -------------------------------------------------------
ae = KLAutoencoder(3, LATENT_CHANNELS, AE_CHANNELS)
print(f"KL-AE: {ae.num_parameters():,} parameters, f = {ae.factor}")


def ae_loss(ae, images):
    loss, mse, kl = ae.loss(images, KL_WEIGHT)
    return loss, float(mse.item())


ae_history = fit(
    ae,
    optim.AdamW(optim.weight_decay_groups(ae, 0.0), lr=AE_LR),
    ae_loss,
    (train.images,),
    steps=AE_STEPS,
    **checkpointing(args, AE_STEPS, "ae"),
    batch_size=AE_BATCH,
    seed=args.seed,
    lr=lambda step: optim.cosine_schedule(step, AE_STEPS, AE_STEPS // 20, AE_LR, AE_LR / 20),
    log_every=max(AE_STEPS // 5, 1),
    metric_name="mse",
)
ae.eval()


def encode(images: np.ndarray) -> np.ndarray:
    return in_batches(lambda x: ae.encode(x)[0], images)  # the latent means (N, 8, 8, 4)


def decode(latents: np.ndarray) -> np.ndarray:
    return in_batches(ae.decode, latents.astype(np.float32))  # (N, 32, 32, 3) in [0, 1]


train_latents = encode(train.images)
SCALE = float(1 / train_latents.std())  # the latent scale factor
train_latents *= SCALE
recon = decode(encode(test.images))
ae_psnr = float(np.mean(-10 * np.log10(((recon - test.images) ** 2).mean(axis=(1, 2, 3)))))
print(f"KL-AE held-out PSNR {ae_psnr:.2f} dB, latent scale factor {SCALE:.3f}")
t_phase = phase("kl-ae", t_phase)


# --- 5 (trained early). the judge: an attribute classifier on real images only --------------------
class Judge(nn.Module):
    """Lesson 02's ViT with one output per attribute value; read() takes the argmax of each."""

    def __init__(self):
        super().__init__()
        classes = sum(len(v) for v in ATTRIBUTES.values())
        self.vit = ViT(IMAGE_SIZE, 4, 3, JUDGE_DIM, 4, 4, 2, num_classes=classes)

    def forward(self, images):
        logits = self.vit(images)  # (N, 6 + 8 + 2 + 9)
        cuts = np.cumsum([0] + [len(v) for v in ATTRIBUTES.values()])
        return [logits[:, a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    def read(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The attribute indices it sees in each image."""
        self.eval()
        logits = in_batches(self.vit, images)
        cuts = np.cumsum([len(v) for v in ATTRIBUTES.values()])[:-1]
        return {a: p.argmax(1) for a, p in zip(ATTRIBUTES, np.split(logits, cuts, 1), strict=True)}


def judge_loss(judge, images, *labels):
    logits = judge(images)
    loss = sum(F.cross_entropy(lg, y) for lg, y in zip(logits, labels, strict=True))
    right = np.mean([(lg.data.argmax(1) == y).mean() for lg, y in zip(logits, labels, strict=True)])
    return loss, float(right)


def scores(read: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    hits = {a: read[a] == labels[a] for a in ATTRIBUTES}
    return {
        **{a: float(h.mean()) for a, h in hits.items()},
        "all": float(np.all(list(hits.values()), 0).mean()),
    }


judge = Judge()
fit(
    judge,
    optim.AdamW(optim.weight_decay_groups(judge, 0.05), lr=JUDGE_LR),
    judge_loss,
    (train.images, train.shape, train.colour, train.size, train.position),
    steps=JUDGE_STEPS,
    **checkpointing(args, JUDGE_STEPS, "judge"),
    batch_size=JUDGE_BATCH,
    seed=args.seed,
    lr=lambda step: optim.cosine_schedule(
        step, JUDGE_STEPS, JUDGE_STEPS // 20, JUDGE_LR, JUDGE_LR / 30
    ),
    log_every=max(JUDGE_STEPS // 5, 1),
    metric_name="attribute acc",
)
test_labels = {a: getattr(test, a) for a in ATTRIBUTES}
judge_real = scores(judge.read(test.images), test_labels)
judge_recon = scores(judge.read(recon), test_labels)
print("judge on real test images:   " + ", ".join(f"{k} {v:.3f}" for k, v in judge_real.items()))
print(
    "judge on KL-AE reconstructions: " + ", ".join(f"{k} {v:.3f}" for k, v in judge_recon.items())
)
t_phase = phase("judge", t_phase)

# --- 2. the text encoder: jointly trained, or CLIP's frozen text tower ----------------------------
if args.clip is None:
    tokenizer = BPETokenizer.train(train.captions, VOCAB_SIZE)
    max_len = max(len(tokenizer.encode(c)) for c in train.captions)
    # words start as N(0, 1), not GPT-2's N(0, 0.02^2): see the docstring
    text = TextTransformer(
        tokenizer.vocab_size, max_len, TEXT_DIM, TEXT_DEPTH, TEXT_HEADS, embedding_std=1.0
    )
else:  # lesson 03's saved model (tinymm.models.clip.save_clip)
    clip_model, tokenizer = load_clip(args.clip)
    text, max_len = clip_model.text, clip_model.text.max_len
    for p in text.parameters():
        p.requires_grad = False  # frozen: it is read, never trained


def tokenize(captions: list[str]) -> np.ndarray:
    """(N, max_len) ids, right-padded: the caption, [EOS], then padding (attended as is)."""
    return tokenizer.pad_batch([tokenizer.encode(c) for c in captions], max_len)[0]


EMPTY = tokenize([""])  # the unconditional "caption": only [EOS]


class TextToImage(nn.Module):
    """The text encoder and the U-Net: eps_theta(z_t, t, ids)."""

    def __init__(self, text: TextTransformer, unet: UNet):
        super().__init__()
        self.text, self.unet = text, unet

    def context(self, ids: np.ndarray) -> tm.Tensor:
        """The text token states (N, L, D): the keys and values of the cross-attention."""
        return self.text.encode(ids)

    def forward(self, z_t, t, ids, return_weights=False):
        return self.unet(z_t, t, self.context(ids), return_weights=return_weights)


model = TextToImage(text, UNet(LATENT_CHANNELS, text.dim, UNET_CHANNELS, (True,) * 2, UNET_HEADS))
trained = [p for p in model.parameters() if p.requires_grad]
print(
    f"U-Net: {model.unet.num_parameters():,} parameters; text encoder: "
    f"{text.num_parameters():,} ({'frozen CLIP' if args.clip else 'trained jointly'})"
)

# --- 3. the U-Net in the latent space, with guidance dropout --------------------------------------
schedule = diffusion.Schedule.linear(1000)
train_ids = tokenize(train.captions)
noise_rng = np.random.default_rng([args.seed, 5])


def denoise_loss(model, latents, ids):
    drop = noise_rng.random(len(ids)) < P_UNCOND  # classifier-free guidance: "" instead
    ids = np.where(drop[:, None], EMPTY, ids)
    return diffusion.diffusion_loss(lambda z_t, t: model(z_t, t, ids), latents, schedule, noise_rng)


weights = {id(p) for p in trained}
groups = [
    {**g, "params": [p for p in g["params"] if id(p) in weights]}
    for g in optim.weight_decay_groups(model, 0.01)
]
history = fit(
    model,
    optim.AdamW(groups, lr=LR),
    denoise_loss,
    (train_latents, train_ids),
    steps=STEPS,
    **checkpointing(args, STEPS, "unet"),
    batch_size=BATCH,
    seed=args.seed,
    lr=lambda step: optim.cosine_schedule(step, STEPS, STEPS // 20, LR, LR / 20),
    clip=1.0,
    log_every=max(STEPS // 20, 1),
    generators=(noise_rng,),  # in the checkpoint: a resumed run draws the same noise
)
model.eval()
t_phase = phase("u-net", t_phase)


# --- 4. sampling: DDIM from white noise, with guidance, batched -------------------------------
def eps_model(z_t, t, context):
    return model.unet(z_t, t, context)


@tm.no_grad()
def generate(captions, scale, seed, sampler="ddim", steps=DDIM_STEPS, on_step=None, chunk=128):
    """Pictures (N, 32, 32, 3) for the captions: DDIM (or DDPM) on latents, then the decoder."""
    rng = np.random.default_rng([args.seed, seed])
    out = []
    for i in range(0, len(captions), chunk):
        part = captions[i : i + chunk]
        cond = model.context(tokenize(part)).data
        uncond = model.context(np.repeat(EMPTY, len(part), axis=0)).data
        eps_fn = diffusion.guided_eps_fn(eps_model, cond, uncond, scale)
        shape = (len(part), *train_latents.shape[1:])
        if sampler == "ddim":
            z = diffusion.ddim_sample(eps_fn, shape, schedule, rng, steps, on_step=on_step)
        else:
            z = diffusion.ddpm_sample(eps_fn, shape, schedule, rng, on_step=on_step)
        out.append(decode(z / SCALE))
    return np.concatenate(out)


# 256 prompts, every attribute value about equally often, in a seeded random combination
prompt_rng = np.random.default_rng([args.seed, 256])
prompts = {
    a: prompt_rng.permutation(np.resize(np.arange(len(v)), N_PROMPTS))
    for a, v in ATTRIBUTES.items()
}
captions = [
    make_caption([Attributes(*(ATTRIBUTES[a][prompts[a][i]] for a in ATTRIBUTES))])
    for i in range(N_PROMPTS)
]
guided = generate(captions, GUIDANCE, seed=1)
unguided = generate(captions, 1.0, seed=1)
gen = scores(judge.read(guided), prompts)
gen_unguided = scores(judge.read(unguided), prompts)
print(f"generated, s = {GUIDANCE}: " + ", ".join(f"{k} {v:.3f}" for k, v in gen.items()))
print("generated, s = 1:   " + ", ".join(f"{k} {v:.3f}" for k, v in gen_unguided.items()))
np.savez(
    args.out / "samples.npz",
    images=guided.astype(np.float32),
    **{a: prompts[a].astype(np.int64) for a in ATTRIBUTES},
    captions=np.array(captions),
    guidance=np.float32(GUIDANCE),
)
t_phase = phase("sampling ddim", t_phase)

# DDIM-50 against DDPM-1000 on the first prompts
small = {a: p[:N_DDPM] for a, p in prompts.items()}
ddpm = scores(judge.read(generate(captions[:N_DDPM], GUIDANCE, seed=2, sampler="ddpm")), small)
ddim_small = scores(judge.read(guided[:N_DDPM]), small)
print(
    f"{N_DDPM} prompts, gen_all: DDIM-{DDIM_STEPS} {ddim_small['all']:.3f}, "
    f"DDPM-1000 {ddpm['all']:.3f}"
)
t_phase = phase("sampling ddpm", t_phase)

# --- figures -------------------------------------------------------------------------------------
SEEDS, SHOW = 6, 8
show = captions[:SHOW]
grid = generate([c for c in show for _ in range(SEEDS)], GUIDANCE, seed=3).reshape(
    SHOW, SEEDS, IMAGE_SIZE, IMAGE_SIZE, 3
)
sample_std = float(grid.std(axis=1).mean())  # pixel std across seeds of one prompt
print(f"mean pixel std across {SEEDS} seeds of one prompt: {sample_std:.3f} (no collapse if > 0)")
viz.image_grid(grid, args.out / "samples.png", show, None, f"prompts x seeds, s = {GUIDANCE}")

sweep = np.stack([generate(captions[:4], s, seed=4) for s in SWEEP], axis=1)  # same noise per s
viz.image_grid(sweep, args.out / "guidance.png", captions[:4], [f"s = {s:g}" for s in SWEEP])

# the forward process: one picture (pixels in [-1, 1], and its latent) noised at t = 0 .. T-1
ts = np.array([0, 50, 100, 200, 400, 600, 800, 999])
eps_pixels = np.random.default_rng(7).standard_normal((len(ts), IMAGE_SIZE, IMAGE_SIZE, 3))
noised = diffusion.q_sample(
    np.repeat(test.images[:1] * 2 - 1, len(ts), 0), ts, eps_pixels, schedule
)
z0 = np.repeat(encode(test.images[:1]) * SCALE, len(ts), 0)
z_t = diffusion.q_sample(z0, ts, np.random.default_rng(7).standard_normal(z0.shape), schedule)
viz.image_grid(
    np.stack([(noised + 1) / 2, decode(z_t / SCALE)]),
    args.out / "forward.png",
    ["pixels x_t", "latent z_t, decoded"],
    [f"t = {t}" for t in ts],
    "forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps",
)

# the reverse process: one sample, z_t and x0_hat decoded along the DDIM steps
trajectory = []
first = generate(captions[:1], GUIDANCE, seed=5, on_step=lambda *step: trajectory.append(step))
picked = np.linspace(0, len(trajectory) - 1, min(8, len(trajectory))).round().astype(int)
viz.image_grid(
    np.stack(
        [
            decode(np.concatenate([trajectory[i][1] for i in picked]) / SCALE),
            decode(np.concatenate([trajectory[i][2] for i in picked]) / SCALE),
        ]
    ),
    args.out / "reverse.png",
    ["z_t decoded", "x0_hat decoded"],
    [f"t = {trajectory[i][0]}" for i in picked],
    f"reverse process (DDIM): {captions[0]!r}",
)

viz.image_grid(
    np.stack([test.images[:8], recon[:8]]),
    args.out / "reconstructions.png",
    ["real", "KL-AE"],
    None,
    f"KL-AE reconstructions, {ae_psnr:.1f} dB",
)
viz.noise_schedules(
    {
        "linear (DDPM)": schedule.alphas_cumprod,
        "cosine (Nichol & Dhariwal)": diffusion.Schedule.cosine(1000).alphas_cumprod,
    },
    args.out / "schedules.png",
)

# cross-attention at the full latent resolution, averaged over heads, at a middle step
ids = tokenize(captions[:1])
t_mid, z_mid, _ = trajectory[len(trajectory) // 2]
with tm.no_grad():
    _, attn = model(z_mid, np.array([t_mid]), ids, return_weights=True)
n_tokens = int(np.argmax(ids[0] == tokenizer.eos_id)) + 1
maps = attn["up 0"][0].mean(0)[:, :n_tokens].T  # (L, h * w)
side = train_latents.shape[1]
viz.cross_attention_maps(
    first[0],
    maps.reshape(n_tokens, side, side),
    [tokenizer.decode([i], skip_special=False) for i in ids[0, :n_tokens]],
    args.out / "cross_attention.png",
    f"U-Net cross-attention at t = {t_mid} (8x8 positions -> words): {captions[0]!r}",
)
viz.training_curves(ae_history, args.out / "ae_loss.png", title="KL-AE", metric_name="mse")
viz.training_curves(history, args.out / "loss.png", title="U-Net: eps-prediction MSE")
phase("figures", t_phase)
print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in phase_seconds.items()))

result_line(
    {
        "gen_colour": gen["colour"],
        "gen_shape": gen["shape"],
        "gen_size": gen["size"],
        "gen_position": gen["position"],
        "gen_all": gen["all"],
        "gen_all_unguided": gen_unguided["all"],
        "judge_accuracy": min(judge_real[a] for a in ATTRIBUTES),
        "judge_on_reconstructions_all": judge_recon["all"],
        "ddim_all_small": ddim_small["all"],
        "ddpm_all_small": ddpm["all"],
        "sample_std": sample_std,
        "ae_psnr": ae_psnr,
        "guidance": GUIDANCE,
    },
    time.perf_counter() - t_start,
    args.seed,
)
