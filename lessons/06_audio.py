"""Lesson 06: audio, from a wave to a spectrogram the ViT of lesson 02 can read.

The task: tell 8 kinds of synthetic one-second sounds apart (tinymm.data.make_sounds): a steady
tone, a rising and a falling chirp, a chord, a tremolo, a noise burst, a click train and a
two-note siren, each at a random time, pitch and loudness in background noise.

1. Audio is just some waves along the time. A microphone gives pressure samples
       y[n] = y(n / sr),   n = 0 .. N-1,   sr = 16 000 samples a second
   so one second is a vector of 16 000 numbers; frequencies up to sr / 2 = 8 kHz can be held.
   Picture: waveform.png.

2. We can present it as the frequencies and their strength: the spectrum. The discrete Fourier
   transform of the whole clip (np.fft.rfft; audio.fft_frequencies gives the f_k),
       X[k] = sum_n y[n] exp(-2 pi i k n / N),     f_k = k sr / N,     k = 0 .. N/2
   and |X[k]| is how strongly the frequency f_k is present. But the spectrum forgets *when*:
   played backwards, y[N-1-n] has the same |X[k]|, so a rising chirp and a falling chirp have
   the same spectrum, as do a chord and a siren that plays the same notes one at a time.
   Picture: spectrum.png (its last panel overlays a rising chirp and the same clip reversed).

3. For a period of time we can take spectra and combine them into one spectrogram. Cut the
   signal into frames of n_fft samples every hop samples, taper each frame with a window w
   (Hann: w[n] = 0.5 - 0.5 cos(2 pi n / n_fft)) so its edges do not smear the spectrum, and
   take the DFT of each frame: the short-time Fourier transform
       S[k, t] = sum_{n < n_fft} w[n] y[t hop + n] exp(-2 pi i k n / n_fft)      (audio.stft)
   Frequency down, time across: an image. Here n_fft = 512 (32 ms, bins 31.25 Hz apart) and
   hop = 256 (16 ms), so one second gives 1 + 16000 // 256 = 63 frames (centred frames).
   Picture: spectrogram.png, the power |S|^2 in decibels.

4. The mel spectrogram adjusts to the human hearing system: we hear 100 Hz vs 200 Hz as very
   different, 7.1 kHz vs 7.2 kHz hardly. The mel scale is about linear below 1 kHz and
   logarithmic above: HTK's m = 2595 log10(1 + f / 700), or Slaney's (the default here and in
   librosa) m = f / (200/3) below 1 kHz and m = 15 + 27 ln(f / 1000) / ln 6.4 above
   (audio.hz_to_mel). n_mels + 2 band edges f_0 < ... < f_{n_mels+1} are spaced evenly in mels
   and filter m is a triangle rising from f_m to 1 at f_{m+1} and falling to 0 at f_{m+2}
   (audio.mel_filterbank): narrow at low frequencies, wide at high ones (mel_filterbank.png).
   The mel spectrogram sums the power under each filter:
       M = F |S|^2,    F in R^{n_mels x (1 + n_fft/2)}                 (audio.melspectrogram)
   Here n_mels = 32: 257 frequency bins become 32 bands. Picture: mel_spectrogram.png.

5. Loudness is heard logarithmically, so the model sees decibels
       M_dB = 10 log10(M / max M),   clipped at 80 dB below the peak    (audio.power_to_db)
   (relative to the clip's own peak, so how loud a clip was recorded does not matter), then
   standardised with the training set's mean and standard deviation: x = (M_dB - mu) / sigma.

6. The Audio Spectrogram Transformer idea (AST, Gong et al. 2021): a log-mel spectrogram is an
   image with one channel, X in R^{n_mels x frames x 1}. Pad the 63 frames to 64, cut the
   32 x 64 image into 8 x 8 patches (4 bands x 8 time steps = 32 tokens: each token is 128 ms
   of a quarter of the spectrum), and feed them to the ViT of lesson 02 unchanged
   (models.ViT with image_size=(32, 64), channels=1): patch embedding z_p = x_p E, a [CLS]
   token, learned positions, attention softmax(Q K^T / sqrt(d_k)) V, and y~ = MLP(z_cls^L)
   with cross entropy (F.cross_entropy).

What to look at: the spectrum panels of rising_chirp and falling_chirp look alike, their
spectrograms are mirror images: that is why the model reads spectrograms, not spectra.
confusion.png shows which sounds the model still mixes up.
"""

import time

import numpy as np

import tinymm as tm
from tinymm import audio, optim, viz
from tinymm import functional as F
from tinymm.data import SOUND_CLASSES, make_sounds
from tinymm.models import ViT
from tinymm.train import checkpointing, fit, in_batches, lesson_args, result_line

# --- config ---------------------------------------------------------------------------------------
args = lesson_args("06_audio", __doc__)
SR, DURATION = 16_000, 1.0  # samples per second, seconds per clip
N_FFT, HOP, N_MELS = 512, 256, 32  # 32 ms frames every 16 ms, 32 mel bands
STFT_FRAMES = 1 + round(SR * DURATION) // HOP  # 63 centred frames
FRAMES, PATCH = 64, 8  # padded to 64 frames; 8 x 8 patches -> 4 x 8 = 32 tokens
DIM, DEPTH, HEADS, MLP_RATIO = 64, 2, 4, 2
N_TRAIN, N_TEST = (400, 200) if args.quick else (3200, 800)
STEPS = args.steps or (30 if args.quick else 800)
BATCH, LR = 64, 2e-3
tm.manual_seed(args.seed)
t_start = time.perf_counter()


# --- data: waveforms, then log-mel spectrograms -------------------------------------------------
def log_mel(waves: np.ndarray) -> np.ndarray:
    """(n, samples) waveforms -> (n, N_MELS, FRAMES) mel spectrograms in dB below each clip's peak.

    The STFT_FRAMES frames are padded to FRAMES with the clip's quietest value (at most 80 dB
    below its peak): a little silence after the clip.
    """
    out = np.empty((len(waves), N_MELS, FRAMES), dtype=np.float32)
    for i, y in enumerate(waves):
        mel = audio.melspectrogram(y=y, sr=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)
        db = audio.power_to_db(mel, ref=np.max, top_db=80.0)  # (N_MELS, STFT_FRAMES), max 0 dB
        out[i] = np.pad(db, ((0, 0), (0, FRAMES - db.shape[1])), constant_values=db.min())
    return out


train_waves, train_labels = make_sounds(N_TRAIN, seed=2 * args.seed, sr=SR, duration=DURATION)
train_db = log_mel(train_waves)
del train_waves  # 200 MB of waveforms the model never reads (the figures show held-out clips)
test_waves, test_labels = make_sounds(N_TEST, seed=2 * args.seed + 1, sr=SR, duration=DURATION)
test_db = log_mel(test_waves)
mu, sigma = train_db.mean(), train_db.std()  # training statistics only
train_x = ((train_db - mu) / sigma)[..., None]  # (n, N_MELS, FRAMES, 1): a 1-channel image
test_x = ((test_db - mu) / sigma)[..., None]
print(
    f"{N_TRAIN} training and {N_TEST} held-out clips; log-mel images {train_x.shape[1:]}, "
    f"mean {mu:.1f} dB, std {sigma:.1f} dB ({time.perf_counter() - t_start:.1f}s)"
)

# --- model: the ViT of lesson 02 on spectrogram patches ------------------------------------------
model = ViT(
    (N_MELS, FRAMES), PATCH, channels=1, dim=DIM, depth=DEPTH, heads=HEADS,
    mlp_ratio=MLP_RATIO, num_classes=len(SOUND_CLASSES),
)  # fmt: skip
print(model)


# --- train ---------------------------------------------------------------------------------------
def loss_fn(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits, y), float((logits.data.argmax(-1) == y).mean())


def predict(x: np.ndarray) -> np.ndarray:
    return in_batches(model, x).argmax(-1)  # (N, classes) logits -> class ids


def held_out_accuracy() -> dict[str, float]:
    return {"test_acc": float((predict(test_x) == test_labels).mean())}


optimizer = optim.AdamW(optim.weight_decay_groups(model, 0.05), lr=LR)  # matrices only
history = fit(
    model,
    optimizer,
    loss_fn,
    (train_x, train_labels),
    steps=STEPS,
    **checkpointing(args, STEPS),
    batch_size=BATCH,
    seed=args.seed,
    lr=lambda step: optim.cosine_schedule(
        step, STEPS, warmup=STEPS // 20, base_lr=LR, min_lr=LR / 50
    ),
    clip=1.0,
    evaluate=held_out_accuracy,
    eval_every=max(STEPS // 5, 1),
    log_every=max(STEPS // 10, 1),
)

# --- evaluate ------------------------------------------------------------------------------------
model.eval()
predicted = predict(test_x)
test_accuracy = float((predicted == test_labels).mean())
per_class = {
    name: float((predicted[test_labels == k] == k).mean()) for k, name in enumerate(SOUND_CLASSES)
}
print("held-out accuracy per class:", "  ".join(f"{k} {v:.2f}" for k, v in per_class.items()))

# --- figures: the lecture's pictures for one held-out clip of each class ------------------------
examples = np.array([np.flatnonzero(test_labels == k)[0] for k in range(len(SOUND_CLASSES))])
waves = test_waves[examples]  # (8, samples)
figures = [
    viz.waveforms(
        waves,
        SR,
        SOUND_CLASSES,
        args.out / "waveform.png",
        f"1. waveform y[n], sr = {SR} Hz (orange: 20 ms around each clip's loudest sample)",
        zoom=0.02,
    )
]

# 2. the spectrum of the whole clip, |X[k]| in dB below its peak; and a rising chirp reversed
clip_freqs = audio.fft_frequencies(sr=SR, n_fft=waves.shape[1])


def spectrum_db(y: np.ndarray) -> np.ndarray:
    return audio.amplitude_to_db(np.fft.rfft(y), ref=np.max, top_db=80.0)


chirp = waves[SOUND_CLASSES.index("rising_chirp")]
panels = [[(spectrum_db(y), name)] for y, name in zip(waves, SOUND_CLASSES, strict=True)]
reversed_chirp = chirp[::-1]  # y[N-1-n]: a falling chirp, |X[k]| unchanged
difference = np.abs(spectrum_db(chirp) - spectrum_db(reversed_chirp)).max()
panels.append([(spectrum_db(chirp), "rising chirp"), (spectrum_db(reversed_chirp), "reversed")])
figures.append(
    viz.spectra(
        clip_freqs,
        panels,
        [*SOUND_CLASSES, f"rising chirp, reversed: diff {difference:.0e} dB"],
        args.out / "spectrum.png",
        "2. spectrum of the whole clip, 20 log10 |X[k]| / max: when a sound happens is lost",
        ylabel="dB",
        ylim=(-80, 2),
        xscale="log",
        xlim=(50, SR / 2),
        ncols=3,
    )
)

# 3. the STFT spectrogram, |S[k, t]|^2 in dB
stft_db = np.stack(
    [audio.power_to_db(np.abs(audio.stft(y, N_FFT, HOP)) ** 2, ref=np.max) for y in waves]
)
figures.append(
    viz.spectrograms(
        stft_db,
        SOUND_CLASSES,
        args.out / "spectrogram.png",
        extent=(0, DURATION, 0, SR / 2),
        title=f"3. STFT spectrogram, n_fft={N_FFT}, hop={HOP}, Hann window: power in dB",
        colorbar_label="dB below the clip's peak",
        vmin=-80.0,
        vmax=0.0,
    )
)

# 4. the mel spectrogram (what the model reads, before standardising), and the filters
edges = audio.mel_frequencies(N_MELS + 2, fmin=0.0, fmax=SR / 2)  # band edges, Hz
ticks = [0, 8, 16, 24, N_MELS - 1]
figures.append(
    viz.spectrograms(
        test_db[examples, :, :STFT_FRAMES],
        SOUND_CLASSES,
        args.out / "mel_spectrogram.png",
        extent=(0, STFT_FRAMES * HOP / SR, 0, N_MELS),
        ylabel="mel band (centre Hz)",
        yticks=([m + 0.5 for m in ticks], [f"{edges[m + 1]:.0f}" for m in ticks]),
        title=f"4. mel spectrogram, {N_MELS} mel bands: 10 log10(F |S|^2 / max)",
        colorbar_label="dB below the clip's peak",
        vmin=-80.0,
        vmax=0.0,
    )
)
figures.append(
    viz.mel_filters(
        audio.mel_filterbank(SR, N_FFT, N_MELS, norm=None),
        audio.fft_frequencies(sr=SR, n_fft=N_FFT),
        edges,
        args.out / "mel_filterbank.png",
        f"mel filterbank F: sr={SR} Hz, n_fft={N_FFT}, n_mels={N_MELS} (Slaney mel scale)",
    )
)
figures.append(
    viz.confusion_matrix(
        test_labels,
        predicted,
        SOUND_CLASSES,
        args.out / "confusion.png",
        f"held-out clips: accuracy {test_accuracy:.3f}",
    )
)
figures.append(viz.training_curves(history, args.out / "loss.png", title="spectrogram ViT"))
print("figures:", ", ".join(str(f) for f in figures))

result_line(
    {"test_accuracy": test_accuracy, "train_steps": STEPS},
    time.perf_counter() - t_start,
    args.seed,
)
