"""Tests for tinymm.data.sounds: reproducibility, shapes, balance, and each class's defining
property measured on its spectrogram with tinymm.audio."""

import tracemalloc

import numpy as np
import pytest
import scipy.signal

from tinymm import audio
from tinymm.data.sounds import CLASS_NAMES, make_sounds

SR = 16000
TONAL = ("tone", "rising_chirp", "falling_chirp", "chord", "tremolo", "siren")


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    """12 clips of every class, from two seeds, as float64: {class name: (12, samples)}."""
    by_class = {name: [] for name in CLASS_NAMES}
    for seed in (0, 1):
        waves, labels = make_sounds(6 * len(CLASS_NAMES), seed=seed, sr=SR)
        for name, label in zip(CLASS_NAMES, range(len(CLASS_NAMES)), strict=True):
            by_class[name].append(waves[labels == label])
    return {name: np.concatenate(w).astype(np.float64) for name, w in by_class.items()}


def power(wave: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Power spectrogram (1 + n_fft // 2, frames)."""
    return np.abs(audio.stft(wave, n_fft=n_fft, hop_length=hop)) ** 2


def loud_frames(S: np.ndarray) -> np.ndarray:
    """Frames whose strongest bin is within 6 dB of the clip's strongest: the event, not noise."""
    strongest = S.max(axis=0)
    return strongest >= 0.25 * strongest.max()


def event_span(energy: np.ndarray, fraction: float) -> slice:
    """Frames from the first to the last one with at least `fraction` of the peak energy."""
    above = np.flatnonzero(energy >= fraction * energy.max())
    return slice(above[0], above[-1] + 1)


def spectral_flatness(p: np.ndarray) -> float:
    """Geometric over arithmetic mean of a power spectrum: ~0.56 for white noise, ~0 for a tone."""
    p = p + 1e-30
    return float(np.exp(np.mean(np.log(p))) / np.mean(p))


def loudest_frame_flatness(wave: np.ndarray) -> float:
    S = power(wave, 512, 128)
    return spectral_flatness(S[:, S.sum(axis=0).argmax()])


def peak_hz(S: np.ndarray, n_fft: int) -> np.ndarray:
    """Frequency of the strongest bin in each loud frame."""
    return S.argmax(axis=0)[loud_frames(S)] * SR / n_fft


def count_peaks(wave: np.ndarray) -> int:
    """Number of prominent peaks of the average magnitude spectrum over the loud frames."""
    S = power(wave, 2048, 256)
    spectrum = np.sqrt(S[:, loud_frames(S)].mean(axis=1))
    peaks, _ = scipy.signal.find_peaks(spectrum, prominence=0.1 * spectrum.max())
    return len(peaks)


# ----------------------------------------------------------------------------------------------
# The data set
# ----------------------------------------------------------------------------------------------


def test_same_seed_same_clips_different_seed_different_clips():
    waves, labels = make_sounds(24, seed=7)
    again, labels_again = make_sounds(24, seed=7)
    assert np.array_equal(waves, again) and np.array_equal(labels, labels_again)
    other, _ = make_sounds(24, seed=8)
    assert not np.allclose(waves, other)


def test_shapes_dtypes_and_levels():
    waves, labels = make_sounds(50, seed=0, sr=8000, duration=0.5)
    assert waves.shape == (50, 4000) and waves.dtype == np.float32
    assert labels.shape == (50,) and labels.dtype == np.int64
    assert np.all(np.isfinite(waves))
    peak_db = 20 * np.log10(np.abs(waves).max(axis=1))
    assert np.all((peak_db >= -20.01) & (peak_db <= -0.99))  # random loudness, never clipped
    assert peak_db.max() - peak_db.min() > 10


def test_memory_beyond_the_waves_does_not_grow_with_n():
    """Clips are made one at a time: besides the float32 waves it returns, make_sounds holds a few
    float64 arrays of one clip (lesson 06 makes 3200; made a class at once, they took 800 MB)."""
    clip_bytes = SR * np.dtype(np.float64).itemsize  # one second at SR, float64
    for n in (16, 160):
        tracemalloc.start()
        try:
            waves, labels = make_sounds(n, seed=0, sr=SR)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - waves.nbytes - labels.nbytes < 16 * clip_bytes, (n, peak)


def test_labels_are_balanced_and_shuffled():
    _, labels = make_sounds(203, seed=0)
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    assert counts.max() - counts.min() <= 1
    assert not np.array_equal(labels[:16], np.arange(16) % len(CLASS_NAMES))


def test_classes_selects_a_subset_and_labels_index_it():
    waves, labels = make_sounds(30, seed=0, classes=("noise_burst", "tone"))
    assert set(labels.tolist()) == {0, 1}
    flatness = np.array([loudest_frame_flatness(w.astype(np.float64)) for w in waves])
    # label 0 is now the noise burst: broadband; label 1 the tone
    assert flatness[labels == 0].min() > 0.3 > flatness[labels == 1].max()


@pytest.mark.parametrize("snr", [10.0, 25.0])
def test_background_noise_is_at_the_requested_snr(snr):
    waves, _ = make_sounds(20, seed=1, classes=("tone",), snr_db=(snr, snr))
    chunk_power = (waves.astype(np.float64).reshape(20, -1, 400) ** 2).mean(axis=-1)  # 25 ms
    # the event fills 50 .. 90 % of the clip: the quietest chunks are noise, the loudest event
    noise = np.percentile(chunk_power, 5, axis=1)
    event = np.percentile(chunk_power, 95, axis=1) - noise
    np.testing.assert_allclose(10 * np.log10(event / noise), snr, atol=1.5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(classes=("tone", "whistle")), "unknown sound classes.*whistle"),
        (dict(sr=4000), "sr must be at least 8000"),
        (dict(duration=0.1), "duration must be at least 0.25"),
        (dict(n=-1), "n must be non-negative"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sounds(**{"n": 4, **kwargs})


# ----------------------------------------------------------------------------------------------
# What makes each class what it is, measured with tinymm.audio
# ----------------------------------------------------------------------------------------------


def test_steady_tone_keeps_its_frequency(clips):
    for wave in clips["tone"]:
        f = peak_hz(power(wave, 512, 128), 512)
        assert np.ptp(f) <= 2 * SR / 512  # within two bins


@pytest.mark.parametrize("name,sign", [("rising_chirp", 1), ("falling_chirp", -1)])
def test_chirps_sweep_up_or_down(clips, name, sign):
    for wave in clips[name]:
        f = peak_hz(power(wave, 512, 128), 512)
        frames = np.arange(len(f))
        assert sign * np.corrcoef(frames, np.log(f))[0, 1] > 0.9  # one steady sweep
        third = len(f) // 3
        ratio = np.median(f[-third:]) / np.median(f[:third])
        assert (ratio if sign > 0 else 1 / ratio) > 1.5  # r^(2/3) with r >= 3
    # the single spectrum of the whole clip cannot tell the direction: a falling chirp is a
    # rising one played backwards, and |rfft| of y[::-1] equals |rfft| of y
    y = clips[name][0]
    np.testing.assert_allclose(np.abs(np.fft.rfft(y[::-1])), np.abs(np.fft.rfft(y)), atol=1e-9)


def test_chord_has_three_peaks_siren_two_tone_one(clips):
    assert [count_peaks(w) for w in clips["chord"]] == [3] * len(clips["chord"])
    assert [count_peaks(w) for w in clips["siren"]] == [2] * len(clips["siren"])
    assert [count_peaks(w) for w in clips["tone"]] == [1] * len(clips["tone"])


def test_siren_alternates_between_its_two_notes(clips):
    for wave in clips["siren"]:
        f = peak_hz(power(wave, 512, 128), 512)
        assert 1.15 < f.max() / f.min() < 1.7
        high = f > np.sqrt(f.min() * f.max())
        assert np.count_nonzero(np.diff(high.astype(int))) >= 2  # one note at a time, in turn


def band_energy_span(wave: np.ndarray) -> np.ndarray:
    """Energy per 2 ms frame in the strongest tone's band (+-3 bins), over the event's span."""
    S = power(wave, 256, 32)
    k = int(S.mean(axis=1).argmax())
    energy = S[max(k - 3, 0) : k + 4].sum(axis=0)
    return energy[event_span(energy, 0.5)]


def test_tremolo_energy_pulses_steady_tone_does_not(clips):
    for wave in clips["tremolo"]:
        energy = band_energy_span(wave)
        assert energy.min() / energy.max() < 0.25
    for wave in clips["tone"]:
        energy = band_energy_span(wave)
        assert energy.min() / energy.max() > 0.4


def test_noise_burst_is_short_and_spectrally_flat(clips):
    for wave in clips["noise_burst"]:
        assert loudest_frame_flatness(wave) > 0.3
        span = event_span(power(wave, 512, 128).sum(axis=0), 0.25)
        assert (span.stop - span.start) * 128 / SR < 0.35  # seconds
    for name in TONAL:
        for wave in clips[name]:
            assert loudest_frame_flatness(wave) < 0.25


def test_click_train_is_broadband_and_peaky_in_time(clips):
    def peakiness(wave):  # loudest over median frame energy, 8 ms frames every 2 ms
        energy = power(wave, 128, 32).sum(axis=0)
        energy = energy[event_span(energy, 0.1)]
        return energy.max() / np.median(energy)

    for wave in clips["click_train"]:
        assert loudest_frame_flatness(wave) > 0.25
        assert peakiness(wave) > 30
    for wave in clips["noise_burst"]:
        assert peakiness(wave) < 30  # just as broadband, but steady while it lasts
