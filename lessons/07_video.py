"""Lesson 07: video, the temporal axis, tubelets, and a soundtrack.

The lecture: "Video is a sequence of images and optionally audio. The difference: there is the
temporal axis to track the sequence of frames." This lesson makes a task only the temporal axis
can solve, and a second one that needs the sound as well.

Data (tinymm.data.videos.make_videos): clips of T = 8 frames of 32x32x3, X in R^{T x H x W x C},
a shape of the shapes world (any shape, colour, size) moving in a straight line at 1 .. 2.5 px a
frame, from a random start point, in one of six compass directions (north-east, north,
north-west and their opposites). Each clip has a 1 s soundtrack at 4 kHz: a sine whose pitch
follows the object's height, f = 200 Hz * 2^(3 h) (h = 0 at the bottom, 1 at the top).
The models read the pixels standardised with the training clips' mean and standard deviation,
x = (X - mu) / sigma. (Without it the tubelet transformer sat at chance for 300 to 900 steps,
depending on the seed, before it found the motion; with it, for 50 to 150.)

Task A, motion: is the object rising or falling? Every clip is in the data twice, as drawn
and played backwards (`videos.reverse`: frame k -> frame T-1-k), and the two have opposite
labels but the same frames. A model that ignores frame order gives both the same answer, so it
is right on exactly half: chance. (Why not "which of 8 directions": a bag of frames still shows
the line the object moves along, so it would get the axis for free; only the sense along the
line needs the order.)

1. The order-blind baseline (models.video.FrameBag): the ViT of lesson 02 on each frame alone,
   averaged over time:   y~ = MLP( (1/T) sum_k ViT_cls(X_k) )
   A mean does not care about the order of its terms: it cannot tell a clip from its reversal.

2. The video transformer (models.video.VideoTransformer, ViViT's "tubelet embedding"):
   a. cut X into tubelets of t x p x p = 2 x 8 x 8 pixels: (8/2)(32/8)(32/8) = 64 tubelets,
      numbered by time, then row, then column, each flattened to x_i in R^{t p^2 C} = R^384
                                                                   (models.video.tubeletify)
   b. project each:  z_i = x_i E,  E in R^{384 x D}       (TubeletEmbedding.tubelet_embedding)
      which is a 3-D convolution with kernel 2 x 8 x 8 and stride = kernel: every output voxel
      sees exactly one tubelet (tests/test_video.py checks it against one written with loops)
   c. add learned positions for where and for when:
         z_i = z_i + E_space[s(i)] + E_time[tau(i)],  E_space in R^{16 x D}, E_time in R^{4 x D}
      (spatial_embedding, temporal_embedding): E_time is the only thing that tells attention
      which tokens came first
   d. prepend [CLS]:  Z = [z_cls; z_1; ...; z_64]                      (VideoTransformer.cls_token)
   e. joint space-time attention, every token to every token of every frame:
         attn(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V                       (nn.TransformerBlock)
   f. y~ = MLP(z_cls^L), cross entropy against rising / falling      (head, F.cross_entropy)
   The proof that it uses the order: the same held-out clips with their frames shuffled
   (each clip a random permutation) fall to chance.

Task B, sound: does this soundtrack belong to this clip? Negatives are soundtracks of other
clips, half of them the clip's own soundtrack played backwards (the soundtrack of its reversed
clip). Neither stream alone can tell: every soundtrack is a real soundtrack, every clip a real
clip; only whether the pitch moves with the object says "match".

3. The sound stream, as lesson 06: waveform -> STFT (n_fft = 256, hop = 125: 32 frames, 4 per
   video frame) -> mel filterbank (32 bands up to 2 kHz) -> dB below the clip's peak
   (audio.melspectrogram, audio.power_to_db), standardised: a 32 x 32 one-channel image, cut
   into 8 x 8 patches (4 bands x 4 time steps = 16 tokens, each 2 video frames long) and read
   by the ViT of lesson 02 (models.ViT, channels=1), the sound encoder.
4. Each stream first learns to embed, as CLIP (lesson 03) does for images and captions: the
   video encoder (a VideoTransformer, started from task A's weights) and the sound encoder
   map a clip and a soundtrack to unit vectors v_i, a_i, and with S_ij = v_i . a_j the
   symmetric contrastive loss (F.clip_loss, temperature tau = 0.1)
       L = 1/2 (CE(S / tau, rows) + CE(S^T / tau, columns))
   pulls each clip towards its own soundtrack and away from the batch's others. (Trained
   from scratch on match / no-match alone, the fused model below stayed at chance for all of
   1500 steps when tried (seed 0, raw pixels): the answer is independent of either stream
   alone, so at the start no feature of one stream has a gradient until the other stream has
   a matching one. The contrastive loss gives each encoder a direct signal.)
5. Fusion as the lecture's Z_joint = [Z_img, Z_text], with the sound as the second modality:
       Z = [z_cls; Z_video + m_video; Z_audio + m_audio]          (AudioVisualTransformer)
   Z_video = [v; the 64 tubelet token states], Z_audio = [a; the 16 patch token states]
   (models.video.stream_tokens), a learned modality embedding m per stream, joint attention
   over all 83 tokens, and a match / no-match head on [CLS] with cross entropy. The encoders
   stay fixed here (their tokens are computed once).

What to look at (runs/07_video/):
  clip.png           clips as strips of frames, with the label and the prediction
  tubelets.png       one clip cut into 2 x 8 x 8 tubelets, the token numbers
  cls_attention.png  where [CLS] looks, over space and time (last layer; rollout through all)
  temporal_embedding.png  cosine similarity of the learned E_time: neighbours in time alike
  soundtrack.png     the mel spectrogram of soundtracks next to the object's height
  loss_*.png         training curves: video (task A), frame_bag, contrastive, av (task B)

What the numbers show (default runs, seeds 0, 1, 2; 800 held-out clips, 1600 held-out pairs):
the tubelet transformer gets 0.999, 1.000, 0.999 of the clips right; with each clip's frames
shuffled it falls to 0.51, 0.51, 0.51, chance: it reads the order, not the frames. The frame
bag trains to a loss of ln 2 and scores 0.500 exactly, on every seed: on each clip and its
reversal it gives the same answer. Matching soundtracks to clips: 0.93, 0.93, 0.94. The
clip's own soundtrack played backwards is refused 1.00 of the time (the pitch moves against
the object); another clip's soundtrack 0.80 - 0.84 of the time: a clip moving the same way at
a similar height sounds almost the same, and these are the negatives the model still misses.
"""

import time

import numpy as np

import tinymm as tm
from tinymm import audio, optim, viz
from tinymm import functional as F
from tinymm.data import videos
from tinymm.models import ViT
from tinymm.models.video import AudioVisualTransformer, FrameBag, VideoTransformer, stream_tokens
from tinymm.models.vit import attention_rollout
from tinymm.train import checkpointing, fit, in_batches, lesson_args, result_line

# --- config ---------------------------------------------------------------------------------------
args = lesson_args("07_video", __doc__)
FRAMES, IMAGE, TUBELET, PATCH = 8, 32, (2, 8), 8  # clips 8 x 32 x 32 x 3; tubelets 2 x 8 x 8
DIM, DEPTH, HEADS, MLP_RATIO = 64, 2, 4, 2
SR, N_FFT, HOP, N_MELS = 4000, 256, 125, 32  # 64 ms frames every 31.25 ms: 4 per video frame
MEL_FRAMES, AUDIO_PATCH = 32, 8  # 1 s -> 33 centred STFT frames, the first 32 kept
N_TRAIN, N_TEST = (96, 48) if args.quick else (2000, 400)  # clips, each also played backwards
VIDEO_STEPS = args.steps or (20 if args.quick else 600)
BAG_STEPS = args.steps or (10 if args.quick else 200)
CLIP_STEPS = args.steps or (10 if args.quick else 1000)
AV_STEPS = args.steps or (20 if args.quick else 1600)
BATCH, CLIP_BATCH, LR = 32, 64, 2e-3
TAU = 0.1  # temperature of the contrastive loss, fixed
tm.manual_seed(args.seed)
t_start = time.perf_counter()

# --- data: clips and their reversals ------------------------------------------------------------
train_seed, test_seed = np.random.SeedSequence(args.seed).spawn(2)
# the training reversals are indexed, not copied (videos.ReversedClips): 200 MB instead of 400
train = videos.with_reversals(videos.make_videos(N_TRAIN, train_seed), copy_clips=False)
test = videos.with_reversals(videos.make_videos(N_TEST, test_seed))
print(
    f"{len(train)} training and {len(test)} held-out clips {train.clips.shape[1:]} "
    f"(half of each played backwards), rising {train.rising.mean():.2f} "
    f"({time.perf_counter() - t_start:.1f}s)"
)
drawn = train.clips.drawn  # the N clips as drawn: their reversals hold the same pixels
pixel_mu, pixel_sigma = drawn.mean(), drawn.std()  # training statistics only
# what the models read: standardised pixels. The training clips in place (from here on
# train.clips holds train_x), the test clips into a copy (the figures show them as they are)
drawn -= pixel_mu
drawn /= pixel_sigma
train_x = train.clips
test_x = (test.clips - pixel_mu) / pixel_sigma


def log_mel(waves: np.ndarray) -> np.ndarray:
    """(n, samples) soundtracks -> (n, N_MELS, MEL_FRAMES) mel spectrograms, dB below the peak."""
    out = np.empty((len(waves), N_MELS, MEL_FRAMES), dtype=np.float32)
    for i, y in enumerate(waves):
        mel = audio.melspectrogram(y=y, sr=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)
        out[i] = audio.power_to_db(mel, ref=np.max, top_db=80.0)[:, :MEL_FRAMES]
    return out


train_db, test_db = log_mel(train.soundtracks), log_mel(test.soundtracks)
mu, sigma = train_db.mean(), train_db.std()  # training statistics only
train_mel, test_mel = ((train_db - mu) / sigma)[..., None], ((test_db - mu) / sigma)[..., None]


def pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Task B: for each of n clips (the first n/2 drawn, the rest their reversals) one matching
    pair and one not: half the negatives the clip's own reversed soundtrack, half another clip's.
    Returns (clip index, soundtrack index, match) arrays of length 2n."""
    r = np.random.default_rng(seed)
    clip = np.arange(n)
    reversed_sound = (clip + n // 2) % n
    other = (clip + r.integers(1, n, size=n)) % n  # any clip but itself
    negative = np.where(r.uniform(size=n) < 0.5, reversed_sound, other)
    return (
        np.concatenate([clip, clip]),
        np.concatenate([clip, negative]),
        np.concatenate([np.ones(n, np.int64), np.zeros(n, np.int64)]),
    )


# two draws for training: each clip twice with its soundtrack and with two drawn negatives
train_pairs = tuple(
    np.concatenate(halves)
    for halves in zip(pairs(len(train), args.seed), pairs(len(train), args.seed + 1), strict=True)
)
test_pairs = pairs(len(test), args.seed + 1000)
print(f"task B: {len(train_pairs[0])} training and {len(test_pairs[0])} held-out pairs")


# --- train ----------------------------------------------------------------------------------------
def classify_loss(model, clips, labels):
    logits = model(clips)
    return F.cross_entropy(logits, labels), float((logits.data.argmax(-1) == labels).mean())


def accuracy(model, clips: np.ndarray, labels: np.ndarray) -> float:
    return float((in_batches(model, clips).argmax(-1) == labels).mean())


def train_model(model, loss_fn, data, steps, name, part, evaluate=None, batch=BATCH):
    """AdamW with warmup + cosine; `part` names its file under --checkpoint."""
    print(f"\n--- {name}\n{model}")
    optimizer = optim.AdamW(optim.weight_decay_groups(model, 0.05), lr=LR)
    return fit(
        model,
        optimizer,
        loss_fn,
        data,
        steps=steps,
        **checkpointing(args, steps, part),
        batch_size=batch,
        seed=args.seed,
        lr=lambda step: optim.cosine_schedule(
            step, steps, warmup=max(steps // 20, 1), base_lr=LR, min_lr=LR / 30
        ),
        clip=1.0,
        evaluate=evaluate,
        eval_every=max(steps // 4, 1),
        log_every=max(steps // 8, 1),
    )


# task A: the tubelet transformer and the frame bag, on the same clips
labels = ("falling", "rising")
video_model = VideoTransformer(FRAMES, IMAGE, TUBELET, 3, DIM, DEPTH, HEADS, MLP_RATIO, 2)
video_history = train_model(
    video_model, classify_loss, (train_x, train.rising), VIDEO_STEPS,
    "task A: tubelet video transformer (joint space-time attention)", "video",
    lambda: {"test_acc": accuracy(video_model, test_x, test.rising)},
)  # fmt: skip
bag = FrameBag(IMAGE, PATCH, 3, DIM, DEPTH, HEADS, MLP_RATIO, 2)
bag_history = train_model(
    bag, classify_loss, (train_x, train.rising), BAG_STEPS,
    "task A: frame bag (a ViT per frame, averaged over time)", "bag",
    lambda: {"test_acc": accuracy(bag, test_x, test.rising)},
)  # fmt: skip

# task B, step 1: a video encoder and a sound encoder embed a clip and its soundtrack close
# together (CLIP's symmetric contrastive loss, lesson 03). The video encoder starts from task A.
video_encoder = VideoTransformer(FRAMES, IMAGE, TUBELET, 3, DIM, DEPTH, HEADS, MLP_RATIO, DIM)
video_encoder.load_state_dict(
    {**video_encoder.state_dict(), **{k: v for k, v in video_model.state_dict().items()
                                       if not k.startswith("head.")}}
)  # fmt: skip
sound_encoder = ViT((N_MELS, MEL_FRAMES), AUDIO_PATCH, 1, DIM, DEPTH, HEADS, MLP_RATIO, DIM)


class ClipAndSound(tm.nn.Module):
    """The two encoders side by side: unit-norm embeddings of clips and of soundtracks."""

    def __init__(self, video, sound):
        super().__init__()
        self.video, self.sound = video, sound

    def forward(self, clips, mels):
        v, a = self.video(clips), self.sound(mels)  # (N, D) each
        return v / (v * v).sum(axis=-1, keepdims=True).sqrt(), a / (a * a).sum(
            axis=-1, keepdims=True
        ).sqrt()


pair_model = ClipAndSound(video_encoder, sound_encoder)
contrastive_history = train_model(
    pair_model,
    lambda model, clips, mels: F.clip_loss(*model(clips, mels), np.log(1 / TAU)),
    (train_x, train_mel),
    CLIP_STEPS,
    "task B, step 1: video and sound encoders, contrastive (CLIP) loss",
    "contrastive",
    batch=CLIP_BATCH,
)

# task B, step 2: the fused transformer on [CLS; video tokens; sound tokens] -> match?
# The encoders stay as they are: their tokens are computed once.
pair_model.eval()
train_video_tokens = in_batches(lambda c: stream_tokens(video_encoder, c), train_x)
train_sound_tokens = in_batches(lambda m: stream_tokens(sound_encoder, m), train_mel)
test_video_tokens = in_batches(lambda c: stream_tokens(video_encoder, c), test_x)
test_sound_tokens = in_batches(lambda m: stream_tokens(sound_encoder, m), test_mel)
av_model = AudioVisualTransformer(DIM, DEPTH, HEADS, MLP_RATIO)


def match_loss(model, clip_index, sound_index, match):
    logits = model(train_video_tokens[clip_index], train_sound_tokens[sound_index])
    return F.cross_entropy(logits, match), float((logits.data.argmax(-1) == match).mean())


def av_predict(clip_index: np.ndarray, sound_index: np.ndarray) -> np.ndarray:
    return in_batches(
        lambda c, s: av_model(test_video_tokens[c], test_sound_tokens[s]), clip_index, sound_index
    ).argmax(-1)


av_history = train_model(
    av_model, match_loss, train_pairs, AV_STEPS,
    "task B, step 2: audio-visual transformer, [CLS; video; sound] -> match?", "av",
    lambda: {"test_acc": float((av_predict(*test_pairs[:2]) == test_pairs[2]).mean())},
)  # fmt: skip

# --- evaluate -------------------------------------------------------------------------------------
for m in (video_model, bag, av_model):
    m.eval()
predicted = in_batches(video_model, test_x).argmax(-1)
motion_accuracy = float((predicted == test.rising).mean())
frame_bag_accuracy = accuracy(bag, test_x, test.rising)
shuffle_rng = np.random.default_rng(args.seed + 2000)
order = np.argsort(shuffle_rng.uniform(size=(len(test), FRAMES)), axis=1)  # a permutation each
shuffled = np.take_along_axis(test_x, order[:, :, None, None, None], axis=1)
shuffled_accuracy = accuracy(video_model, shuffled, test.rising)
bag_shuffled = accuracy(bag, shuffled, test.rising)

clip_index, sound_index, match = test_pairs
av_predicted = av_predict(clip_index, sound_index)
av_accuracy = float((av_predicted == match).mean())
n_test = len(test)
own_reversed = (match == 0) & (sound_index == (clip_index + n_test // 2) % n_test)
kinds = {
    "matching pairs": match == 1,
    "own soundtrack reversed": own_reversed,
    "another clip's soundtrack": (match == 0) & ~own_reversed,
}
print(f"\nheld-out results ({len(test)} clips, chance 0.50)")
print(f"  task A  tubelet transformer      {motion_accuracy:.3f}")
print(f"          ... frames shuffled      {shuffled_accuracy:.3f}")
print(f"          frame bag                {frame_bag_accuracy:.3f}  (shuffled {bag_shuffled:.3f})")
print(f"  task B  audio-visual match       {av_accuracy:.3f}")
for kind, mask in kinds.items():
    print(f"          {kind:<25} {float((av_predicted[mask] == match[mask]).mean()):.3f}")

# --- figures --------------------------------------------------------------------------------------
out = args.out
sample = np.array([0, 1, 2, n_test // 2, n_test // 2 + 1])  # three clips, two of them reversed
paths = [
    viz.clip_strips(
        test.clips[sample],
        [
            f"{videos.COMPASS[test.direction[i]]}: {labels[test.rising[i]]} -> predicted "
            f"{labels[predicted[i]]}" + ("  (clip 0 played backwards)" if i == n_test // 2 else "")
            for i in sample
        ],
        out / "clip.png",
        "held-out clips, frame by frame: label -> the tubelet transformer's prediction",
    ),
    viz.tubelets(test.clips[0], TUBELET, out / "tubelets.png"),
]
with tm.no_grad():
    _, weights = video_model.encode(test_x[sample[:3]], return_weights=True)
grid = video_model.embedding.grid  # (time steps, rows, columns)
last_layer = weights[-1].mean(axis=1)[:, 0, 1:].reshape(-1, *grid)  # [CLS] row, mean of heads
rollout = attention_rollout(weights)[:, 0, 1:].reshape(-1, *grid)
paths.append(
    viz.space_time_attention(
        test.clips[sample[:3]],
        [last_layer, rollout],
        ["last layer", "rollout"],
        TUBELET,
        out / "cls_attention.png",
        titles=[labels[test.rising[i]] for i in sample[:3]],
        title="where [CLS] looks, over space and time (one heat map per frame, shared by the "
        "2 frames of a tubelet)",
    )
)
paths.append(
    viz.temporal_similarity(
        video_model.embedding.temporal_embedding.data,
        out / "temporal_embedding.png",
        frames_per_step=TUBELET[0],
        title="learned temporal position embeddings E_time: cosine similarity",
    )
)
edges = audio.mel_frequencies(N_MELS + 2, fmin=0.0, fmax=SR / 2)  # band edges, Hz
centres = edges[1:-1]  # filter m peaks at edges[m + 1]


def band_of(hz: np.ndarray) -> np.ndarray:
    """Frequency in Hz -> position in mel-band units (band m drawn from m to m + 1)."""
    return np.interp(hz, centres, np.arange(N_MELS)) + 0.5


shown = np.array([0, n_test // 2, 2])  # a clip, the same clip backwards, another clip
paths.append(
    viz.soundtrack_and_height(
        test_db[shown],
        test.heights[shown],
        band_of(videos.pitch(test.heights[shown])),
        FRAMES / test.fps,
        out / "soundtrack.png",
        [
            f"{videos.COMPASS[test.direction[i]]} ({labels[test.rising[i]]})"
            + (", clip 0 reversed" if i == n_test // 2 else "")
            for i in shown
        ],
        title="soundtrack: log-mel spectrogram (pitch f = 200 Hz * 2^(3 h)) and the object's "
        "height h",
    )
)
for name, history in [
    ("video", video_history),
    ("frame_bag", bag_history),
    ("contrastive", contrastive_history),
    ("av", av_history),
]:
    paths.append(viz.training_curves(history, out / f"loss_{name}.png", title=name))
print("figures:", ", ".join(str(p) for p in paths))

result_line(
    {
        "motion_accuracy": motion_accuracy,
        "frame_bag_accuracy": frame_bag_accuracy,
        "shuffled_frames_accuracy": shuffled_accuracy,
        "av_match_accuracy": av_accuracy,
        "chance": 0.5,
    },
    time.perf_counter() - t_start,
    args.seed,
)
