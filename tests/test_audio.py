"""Tests for tinymm.audio: hand-checkable facts, invariants, round trips, errors, librosa."""

import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tinymm import audio

# ----------------------------------------------------------------------------------------------
# The mel scale
# ----------------------------------------------------------------------------------------------


def test_slaney_mel_is_linear_below_1khz_and_1khz_is_15_mel():
    # 1000 / (200 / 3) rounds to 14.999999999999998 in floating point, in librosa too
    assert audio.hz_to_mel(1000.0) == pytest.approx(15.0, rel=1e-15)
    assert audio.hz_to_mel(500.0) == pytest.approx(7.5)  # 500 / (200 / 3)
    assert audio.mel_to_hz(15.0) == pytest.approx(1000.0, rel=1e-15)
    # above 1 kHz: 27 mel per factor 6.4 in frequency
    assert audio.hz_to_mel(6400.0) == pytest.approx(15.0 + 27.0)


def test_htk_mel_of_700hz_is_2595_log10_2():
    assert audio.hz_to_mel(700.0, htk=True) == pytest.approx(2595.0 * np.log10(2.0), rel=1e-12)
    assert audio.hz_to_mel(0.0, htk=True) == 0.0


@given(f=st.floats(0.0, 30000.0), htk=st.booleans())
def test_mel_to_hz_inverts_hz_to_mel(f, htk):
    assert audio.mel_to_hz(audio.hz_to_mel(f, htk=htk), htk=htk) == pytest.approx(f, abs=1e-9)


def test_mel_scale_is_increasing_and_vectorised():
    f = np.linspace(0.0, 11025.0, 2001)
    for htk in (False, True):
        m = audio.hz_to_mel(f, htk=htk)
        assert m.shape == f.shape
        assert np.all(np.diff(m) > 0)


def test_mel_frequencies_are_evenly_spaced_in_mel_and_hit_the_ends():
    hz = audio.mel_frequencies(20, fmin=50.0, fmax=7000.0)
    assert hz[0] == pytest.approx(50.0) and hz[-1] == pytest.approx(7000.0)
    assert np.allclose(np.diff(audio.hz_to_mel(hz)), np.diff(audio.hz_to_mel(hz))[0])


def test_fft_frequencies_are_k_sr_over_n_fft():
    f = audio.fft_frequencies(sr=16000, n_fft=512)
    assert f.shape == (257,)
    assert f[1] == 16000 / 512 and f[-1] == 8000.0


# ----------------------------------------------------------------------------------------------
# Mel filterbank
# ----------------------------------------------------------------------------------------------

FILTERBANK_CASES = [(16000, 512, 40, False), (22050, 2048, 128, False), (16000, 1024, 64, True)]


@pytest.mark.parametrize("sr,n_fft,n_mels,htk", FILTERBANK_CASES)
def test_each_mel_filter_is_a_triangle_peaking_at_its_centre(sr, n_fft, n_mels, htk):
    fb = audio.mel_filterbank(sr, n_fft, n_mels, htk=htk, norm=None, dtype=np.float64)
    assert fb.shape == (n_mels, 1 + n_fft // 2)
    freqs = audio.fft_frequencies(sr=sr, n_fft=n_fft)
    bin_hz = freqs[1]
    edges = audio.mel_frequencies(n_mels + 2, fmax=sr / 2, htk=htk)
    for m, (lo, centre, hi) in enumerate(zip(edges[:-2], edges[1:-1], edges[2:], strict=True)):
        w = fb[m]
        peak = int(w.argmax())
        # the peak is one of the two FFT bins around the centre frequency ...
        assert abs(freqs[peak] - centre) < bin_hz
        # ... and the nearest one when that is clearly nearest (the two sides can differ in slope)
        nearest = int(np.abs(freqs - centre).argmin())
        if abs(freqs[nearest] - centre) < bin_hz / 4:
            assert peak == nearest
        assert np.all(w[(freqs <= lo) | (freqs >= hi)] == 0)  # zero outside (f_m, f_{m+2})
        # straight sides: a line through the rising samples is 0 at f_m and 1 at the centre
        rising = (freqs > lo) & (freqs <= centre)
        falling = (freqs >= centre) & (freqs < hi)
        for side, (zero_at, one_at) in ((rising, (lo, centre)), (falling, (hi, centre))):
            if side.sum() >= 2:
                line = np.polyfit(freqs[side], w[side], 1)
                assert np.polyval(line, [zero_at, one_at]) == pytest.approx([0, 1], abs=1e-9)


@pytest.mark.parametrize("sr,n_fft,n_mels,htk", FILTERBANK_CASES)
def test_unnormalised_filters_sum_to_one_where_they_overlap(sr, n_fft, n_mels, htk):
    fb = audio.mel_filterbank(sr, n_fft, n_mels, htk=htk, norm=None, dtype=np.float64)
    freqs = audio.fft_frequencies(sr=sr, n_fft=n_fft)
    centres = audio.mel_frequencies(n_mels + 2, fmax=sr / 2, htk=htk)[1:-1]
    inside = (freqs >= centres[0]) & (freqs <= centres[-1])
    assert inside.sum() > n_fft // 4
    np.testing.assert_allclose(fb[:, inside].sum(axis=0), 1.0, atol=1e-12)


@pytest.mark.parametrize("sr,n_fft,n_mels,htk", FILTERBANK_CASES)
def test_slaney_filters_have_unit_area_in_hz(sr, n_fft, n_mels, htk):
    fb = audio.mel_filterbank(sr, n_fft, n_mels, htk=htk, dtype=np.float64)
    freqs = audio.fft_frequencies(sr=sr, n_fft=n_fft)
    edges = audio.mel_frequencies(n_mels + 2, fmax=sr / 2, htk=htk)
    wide = (edges[2:] - edges[:-2]) >= 6 * freqs[1]  # sampling a triangle loses ~(bin/width)^2
    assert wide.sum() >= n_mels // 3
    area = np.trapezoid(fb[wide], freqs, axis=1)
    np.testing.assert_allclose(area, 1.0, atol=0.02)


def test_filterbank_dtype_defaults_to_float32_like_librosa():
    assert audio.mel_filterbank(16000, 512).dtype == np.float32
    assert audio.mel_filterbank(16000, 512, dtype=np.float64).dtype == np.float64


def test_filterbank_warns_about_empty_filters():
    with pytest.warns(UserWarning, match="empty"):
        audio.mel_filterbank(16000, 64, n_mels=128)


# ----------------------------------------------------------------------------------------------
# Windows, frames, STFT
# ----------------------------------------------------------------------------------------------


def test_periodic_hann_window_overlap_adds_to_a_constant():
    w = audio.get_window("hann", 16)
    assert w[0] == 0.0 and w[8] == 1.0  # periodic: the peak is at n / 2, w[n] would be w[0]
    assert np.allclose(w[:4] + w[4:8] + w[8:12] + w[12:], 2.0)  # hop n/4: sum = 2
    assert np.allclose(audio.get_window("hamming", 4), [0.08, 0.54, 1.0, 0.54])
    assert np.all(audio.get_window("boxcar", 5) == 1.0)
    assert np.all(audio.get_window("rectangular", 5) == 1.0)
    assert np.all(audio.get_window(np.arange(3.0), 3) == [0.0, 1.0, 2.0])


@given(n=st.integers(1, 300), frame_length=st.integers(1, 64), hop=st.integers(1, 40))
def test_frame_is_a_strided_view_of_the_signal(n, frame_length, hop):
    assume(n >= frame_length)
    x = np.arange(n, dtype=np.float64)
    frames = audio.frame(x, frame_length, hop)
    assert frames.shape == (frame_length, 1 + (n - frame_length) // hop)
    assert np.shares_memory(frames, x)
    for t in range(frames.shape[1]):
        assert np.array_equal(frames[:, t], x[t * hop : t * hop + frame_length])


@pytest.mark.parametrize(
    "sr,n_fft,f", [(16000, 512, 1000.0), (22050, 2048, 1000.0), (8000, 256, 440)]
)
def test_a_tone_peaks_at_bin_f_n_fft_over_sr(sr, n_fft, f):
    t = np.arange(sr) / sr
    S = np.abs(audio.stft(np.sin(2 * np.pi * f * t), n_fft=n_fft))
    peak_bins = S[:, 2:-2].argmax(axis=0)  # every frame away from the zero-padded ends
    assert np.all(peak_bins == round(f * n_fft / sr))


@given(n=st.integers(2, 400), seed=st.integers(0, 2**32 - 1))
def test_parseval_for_one_frame(n, seed):
    x = np.random.default_rng(seed).uniform(-1, 1, n)
    X = audio.stft(x, n_fft=n, hop_length=1, window="boxcar", center=False)[:, 0]
    # sum_n x^2 = (1 / n) sum_k |X_k|^2 over all n bins; rfft keeps k <= n // 2, and bins
    # 1 .. ceil(n / 2) - 1 stand for themselves and their mirror images.
    power = np.abs(X) ** 2
    mirrored = power[0] + 2 * power[1 : (n + 1) // 2].sum() + (power[-1] if n % 2 == 0 else 0)
    assert mirrored / n == pytest.approx(np.sum(x**2), abs=1e-9)


@given(
    length=st.integers(64, 3000),
    n_fft=st.sampled_from([64, 128, 256, 512]),
    hop_fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_stft_istft_round_trip(length, n_fft, hop_fraction, seed):
    hop = max(1, int(hop_fraction * (n_fft // 4)))  # hop <= n_fft / 4 for a Hann window
    y = np.random.default_rng(seed).standard_normal(length)
    S = audio.stft(y, n_fft=n_fft, hop_length=hop)
    assert S.shape == (1 + n_fft // 2, 1 + length // hop)
    y_back = audio.istft(S, hop_length=hop, length=length)
    np.testing.assert_allclose(y_back, y, atol=1e-6)
    y_short = audio.istft(S, hop_length=hop)  # without length: whole hops only
    assert len(y_short) == hop * (S.shape[1] - 1)
    np.testing.assert_allclose(y_short, y[: len(y_short)], atol=1e-6)


@given(length=st.integers(400, 2000), hop=st.integers(1, 100), win_length=st.integers(200, 400))
def test_round_trip_uncentred_hamming_and_short_window(length, hop, win_length):
    y = np.random.default_rng(length).standard_normal(length)
    S = audio.stft(y, 400, hop, win_length, window="hamming", center=False)
    n_frames = S.shape[1]
    assert n_frames == 1 + (length - 400) // hop
    y_back = audio.istft(S, hop, win_length, window="hamming", center=False)
    # a window shorter than n_fft is zero-padded in the middle, so the frames cover only
    # samples lo .. hi of the signal
    lo = (400 - win_length) // 2
    hi = hop * (n_frames - 1) + lo + win_length
    np.testing.assert_allclose(y_back[lo:hi], y[lo:hi], atol=1e-6)


def test_odd_n_fft_round_trip_needs_n_fft():
    y = np.random.default_rng(0).standard_normal(1000)
    S = audio.stft(y, n_fft=255, hop_length=32)
    assert S.shape[0] == 128
    np.testing.assert_allclose(audio.istft(S, 32, length=1000, n_fft=255), y, atol=1e-6)


@given(length=st.integers(512, 5000), hop=st.integers(1, 600))
def test_uncentred_frame_count(length, hop):
    S = audio.stft(np.zeros(length), n_fft=512, hop_length=hop, center=False)
    assert S.shape == (257, 1 + (length - 512) // hop)


def test_stft_defaults_are_librosas():
    y = np.random.default_rng(0).standard_normal(5000)
    S = audio.stft(y)  # n_fft 2048, hop 512, centred with zeros
    assert S.shape == (1025, 1 + 5000 // 512)
    padded = np.pad(y, 1024)
    window = audio.get_window("hann", 2048)
    np.testing.assert_allclose(S[:, 3], np.fft.rfft(window * padded[3 * 512 : 3 * 512 + 2048]))


@pytest.mark.parametrize("real,complex_", [(np.float32, np.complex64), (np.float64, np.complex128)])
def test_dtypes_are_preserved(real, complex_):
    y = np.random.default_rng(0).standard_normal(4000).astype(real)
    S = audio.stft(y, n_fft=256)
    assert S.dtype == complex_
    assert audio.istft(S).dtype == real
    M = audio.melspectrogram(y=y, sr=16000, n_fft=256, hop_length=64, n_mels=20)
    assert M.dtype == real
    assert audio.power_to_db(M).dtype == real
    assert audio.power_to_db(M, ref=np.max).dtype == real
    assert audio.amplitude_to_db(np.abs(S)).dtype == real
    assert audio.hz_to_mel(np.ones(3, real)).dtype == real
    assert audio.mel_to_hz(np.ones(3, real), htk=True).dtype == real
    if real == np.float32:
        np.testing.assert_allclose(audio.istft(S, length=4000), y, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Mel spectrogram and decibels
# ----------------------------------------------------------------------------------------------


def test_melspectrogram_is_the_filterbank_times_the_power_spectrogram():
    y = np.random.default_rng(0).standard_normal(8000)
    S = np.abs(audio.stft(y, n_fft=512, hop_length=128)) ** 2
    fb = audio.mel_filterbank(16000, 512, n_mels=40, dtype=np.float64)
    M = audio.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=128, n_mels=40)
    assert M.shape == (40, S.shape[1])
    np.testing.assert_allclose(M, fb @ S, rtol=1e-12)
    # a precomputed spectrogram gives the same result; n_fft is read from its shape
    np.testing.assert_allclose(audio.melspectrogram(S=S, sr=16000, n_mels=40), M, rtol=1e-12)


def test_power_to_db_hand_values():
    assert audio.power_to_db(100.0, top_db=None) == pytest.approx(20.0)
    assert audio.power_to_db(1.0, ref=10.0) == pytest.approx(-10.0)
    assert audio.power_to_db(0.0, top_db=None) == pytest.approx(-100.0)  # amin = 1e-10
    assert audio.amplitude_to_db(10.0, top_db=None) == pytest.approx(20.0)
    S = np.array([1e-12, 1e-3, 1.0, 4.0])
    db = audio.power_to_db(S, ref=np.max)
    assert db.max() == 0.0  # the loudest entry is the reference
    assert db.min() == pytest.approx(db.max() - 80.0)  # top_db clips the quiet end
    assert db[1] == pytest.approx(10 * np.log10(1e-3 / 4.0))
    # top_db counts down from the loudest value, not from 0 dB
    assert audio.power_to_db([1e-12, 1e-5, 100.0], top_db=40.0) == pytest.approx([-20, -20, 20])


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: audio.stft(np.zeros((2, 1000))), r"1-D.*shape \(2, 1000\)"),
        (lambda: audio.stft(np.zeros(100), n_fft=256, center=False), "shorter than one frame"),
        (lambda: audio.stft(np.zeros(100), n_fft=1), "n_fft must be at least 2"),
        (
            lambda: audio.stft(np.zeros(100), n_fft=64, hop_length=0),
            "hop_length must be a positive integer",
        ),
        (lambda: audio.stft(np.zeros(100), n_fft=64, win_length=65), "win_length=65.*n_fft=64"),
        (lambda: audio.stft(np.zeros(100), n_fft=64, window="kaiser"), "unknown window 'kaiser'"),
        (lambda: audio.stft(np.zeros(100), n_fft=64, window=np.ones(3)), r"expected \(64,\)"),
        (lambda: audio.stft(np.zeros(100, dtype=np.int16)), "float32 or float64"),
        (lambda: audio.stft(np.full(100, np.nan)), "NaN"),
        (lambda: audio.mel_filterbank(16000, 512, fmax=9000), "Nyquist"),
        (lambda: audio.mel_filterbank(16000, 1), "n_fft must be at least 2"),
        (lambda: audio.melspectrogram(sr=16000, fmax=8001.0, y=np.zeros(600)), "Nyquist"),
        (lambda: audio.istft(np.zeros((129, 4), complex), hop_length=-1), "hop_length"),
        (lambda: audio.frame(np.zeros(10), 16, 4), "shorter than one frame"),
        (lambda: audio.melspectrogram(), "either a signal y or a spectrogram S"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------------------
# Reference numbers from librosa
# ----------------------------------------------------------------------------------------------
# Produced with librosa 0.11.0 (numpy 2.4) by
#   librosa.filters.mel(sr=16000, n_fft=512, n_mels=40)                      (float32, slaney)
#   librosa.filters.mel(sr=16000, n_fft=512, n_mels=40, htk=True, norm=None, dtype=np.float64)
#   y = np.sin(2 * np.pi * 440.0 * np.arange(8000) / 16000)                  (float64)
#   M = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=128, n_mels=40)
#   librosa.power_to_db(M, ref=np.max);  librosa.stft(y)                     (all defaults)
# and printed with repr(float(...)). librosa is not needed to run these tests.

LIBROSA_MEL_SLANEY = {
    (0, 1): 0.005773601122200489,
    (0, 2): 0.011547202244400978,
    (0, 4): 0.004090535454452038,
    (5, 14): 0.012868066318333149,
    (20, 53): 0.0017693210393190384,
    (20, 56): 0.0072597903199493885,
    (39, 220): 4.335886387707433e-06,
    (39, 225): 0.0005164205213077366,
}
LIBROSA_MEL_HTK = {(0, 1): 0.7042400001487308, (20, 56): 0.37503213345806846}
LIBROSA_MELSPEC_440 = {
    (5, 30): 275.587072983773,
    (4, 30): 32.45545934606699,
    (5, 0): 98.02991041045374,
}
LIBROSA_DB_440 = {(4, 30): -9.289717255106332, (6, 30): -10.252218369318351, (0, 30): -80.0}
LIBROSA_STFT_440 = {
    (60, 5): 1.7523010633335776 + 2.4119769707751537j,
    (0, 5): -0.0009057895524226325,
}


def _sine_440() -> np.ndarray:
    return np.sin(2 * np.pi * 440.0 * np.arange(8000) / 16000)


def test_filterbank_matches_pinned_librosa_numbers():
    fb = audio.mel_filterbank(sr=16000, n_fft=512, n_mels=40)
    assert fb.shape == (40, 257) and fb.dtype == np.float32
    for index, value in LIBROSA_MEL_SLANEY.items():
        assert fb[index] == pytest.approx(value, rel=1e-6)
    fb = audio.mel_filterbank(16000, 512, 40, htk=True, norm=None, dtype=np.float64)
    for index, value in LIBROSA_MEL_HTK.items():
        assert fb[index] == pytest.approx(value, rel=1e-12)


def test_melspectrogram_stft_and_db_match_pinned_librosa_numbers():
    y = _sine_440()
    M = audio.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=128, n_mels=40)
    assert M.shape == (40, 63)
    for index, value in LIBROSA_MELSPEC_440.items():
        assert M[index] == pytest.approx(value, rel=1e-6)
    db = audio.power_to_db(M, ref=np.max)
    for index, value in LIBROSA_DB_440.items():
        assert db[index] == pytest.approx(value, abs=1e-5)
    S = audio.stft(y)
    assert S.shape == (1025, 16)
    for index, value in LIBROSA_STFT_440.items():
        assert S[index] == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_matches_librosa_when_installed():
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(0)
    for sr, n_fft in ((16000, 512), (22050, 2048), (16000, 400)):
        for htk in (False, True):
            for norm in ("slaney", None):
                ours = audio.mel_filterbank(sr, n_fft, 40, fmin=20.0, htk=htk, norm=norm)
                ref = librosa.filters.mel(
                    sr=sr, n_fft=n_fft, n_mels=40, fmin=20.0, htk=htk, norm=norm
                )
                np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)
    for dtype in (np.float32, np.float64):
        y = rng.standard_normal(7000).astype(dtype)
        tol = 1e-5 if dtype == np.float32 else 1e-10
        for kwargs in ({}, dict(n_fft=512, hop_length=100, win_length=300, pad_mode="reflect")):
            S = audio.stft(y, **kwargs)
            ref = librosa.stft(y, **kwargs)
            assert S.dtype == ref.dtype
            np.testing.assert_allclose(S, ref, rtol=tol, atol=tol * np.abs(ref).max())
            hop, win = kwargs.get("hop_length"), kwargs.get("win_length")
            y_back = audio.istft(ref, hop_length=hop, win_length=win, length=7000)
            y_ref = librosa.istft(ref, hop_length=hop, win_length=win, length=7000)
            np.testing.assert_allclose(y_back, y_ref, atol=10 * tol)
        for kwargs in ({}, dict(n_fft=400, hop_length=160, n_mels=80, fmin=20.0, htk=True)):
            M = audio.melspectrogram(y=y, sr=16000, **kwargs)
            ref = librosa.feature.melspectrogram(y=y, sr=16000, **kwargs)
            # librosa applies a float32 filterbank even to float64 spectrograms: ~5e-8 apart
            np.testing.assert_allclose(M, ref, rtol=1e-5 if dtype == np.float32 else 1e-6)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                db_ref = librosa.power_to_db(ref, ref=np.max)
            np.testing.assert_allclose(audio.power_to_db(ref, ref=np.max), db_ref, atol=1e-4)
            np.testing.assert_allclose(
                audio.amplitude_to_db(np.sqrt(ref)),
                librosa.amplitude_to_db(np.sqrt(ref)),
                atol=1e-4,
            )
