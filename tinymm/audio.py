"""Audio features: waveform -> spectrum -> STFT spectrogram -> mel spectrogram -> decibels.

This module follows the audio part of the lecture step by step. Names, defaults and numerics
are librosa's (>= 0.10), so what you learn here carries over to ``librosa`` unchanged.
It is plain NumPy (no autograd): features are computed once, before the model sees them.

1. Waveform. A microphone gives pressure samples ``y[n] = y(n / sr)``, ``n = 0 .. N-1``, taken
   ``sr`` times a second (16 kHz for speech, 22.05 kHz is librosa's default). Frequencies up to
   the Nyquist frequency ``sr / 2`` can be represented.

2. Spectrum. The discrete Fourier transform of a frame of ``n_fft`` samples,
   ``X[k] = sum_n x[n] exp(-2 pi i k n / n_fft)``, says how much of the frequency
   ``f_k = k * sr / n_fft`` (``fft_frequencies``) the frame holds. For a real signal only
   ``k = 0 .. n_fft // 2`` are needed (``np.fft.rfft``). A tone of f Hz peaks near bin
   ``round(f * n_fft / sr)``. Parseval: ``sum_n x[n]^2 = (1 / n_fft) sum_k |X[k]|^2`` (all bins).

3. STFT spectrogram. Sound changes over time, so cut the signal into overlapping frames
   (``frame``) of ``n_fft`` samples every ``hop_length`` samples, taper each frame with a
   window ``w`` (``get_window``, Hann by default) and take the spectrum of each:
   ``S[k, t] = sum_n w[n] y[t * hop + n] exp(-2 pi i k n / n_fft)``   (``stft``).
   ``|S|^2`` is the power spectrogram: frequency on one axis, time on the other, an image.
   With ``center=True`` the signal is first padded by ``n_fft // 2`` on both sides so frame t
   is centred on sample ``t * hop``. The STFT is invertible (``istft``): overlap-add the windowed
   inverse FFTs and divide by the sum of the squared windows.

4. Mel spectrogram. Hearing resolves low frequencies finely and high ones coarsely: 100 Hz vs
   200 Hz sounds very different, 10.1 kHz vs 10.2 kHz hardly. The mel scale (``hz_to_mel``)
   is roughly linear below 1 kHz and logarithmic above. A mel filterbank (``mel_filterbank``)
   places ``n_mels`` triangular filters evenly on the mel scale, so they are narrow at low
   frequencies and wide at high ones, and sums the power under each:
   ``M = F @ |S|^2`` with ``F`` of shape ``(n_mels, 1 + n_fft // 2)`` (``melspectrogram``).

5. Decibels. Loudness is perceived logarithmically, and power spans many orders of magnitude,
   so the model sees ``10 log10(M / ref)`` clipped to ``top_db`` below the peak (``power_to_db``).

Shapes: a signal is ``(samples,)``; a spectrogram is ``(1 + n_fft // 2, frames)``; a mel
spectrogram is ``(n_mels, frames)``. float32 in gives float32 (complex64) out, float64 gives
float64 (complex128).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np

# Slaney's mel scale (Auditory Toolbox, librosa's default): linear below 1 kHz, log above.
_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0  # where the log part starts
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # = 15 mel
_LOGSTEP = math.log(6.4) / 27.0  # log(Hz) per mel in the log part

_PAD_MODES = ("constant", "edge", "reflect", "symmetric")


def _as_float(x: np.ndarray | float) -> np.ndarray:
    """x as an array that keeps float32 / float64 and turns anything else into float64."""
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# The mel scale
# ---------------------------------------------------------------------------------------------


def hz_to_mel(f: np.ndarray | float, htk: bool = False) -> np.ndarray:
    """Convert frequencies in Hz to mels.

    Slaney (default): ``m = f / (200/3)`` below 1 kHz (so 1 kHz = 15 mel), and
    ``m = 15 + log(f / 1000) / (log(6.4) / 27)`` above.
    HTK: ``m = 2595 log10(1 + f / 700)``.
    Any shape in, same shape out (a NumPy scalar for scalar input).
    """
    f = _as_float(f)
    if htk:
        return (2595.0 * np.log10(1.0 + f / 700.0))[()]
    linear = f / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log, linear)[()]


def mel_to_hz(m: np.ndarray | float, htk: bool = False) -> np.ndarray:
    """Convert mels to frequencies in Hz: the inverse of ``hz_to_mel``.

    Slaney: ``f = (200/3) m`` below 15 mel, ``f = 1000 exp((log(6.4) / 27) (m - 15))`` above.
    HTK: ``f = 700 (10^(m / 2595) - 1)``.
    """
    m = _as_float(m)
    if htk:
        return (700.0 * (10.0 ** (m / 2595.0) - 1.0))[()]
    linear = _F_SP * m
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log, linear)[()]


def mel_frequencies(
    n_mels: int = 128, fmin: float = 0.0, fmax: float = 11025.0, htk: bool = False
) -> np.ndarray:
    """``n_mels`` frequencies (Hz) evenly spaced on the mel scale from fmin to fmax, inclusive.

    ``mel_to_hz(linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels))``. Shape ``(n_mels,)``.
    """
    if isinstance(n_mels, bool) or not isinstance(n_mels, int | np.integer) or n_mels < 0:
        raise ValueError(f"n_mels must be an integer >= 0, got n_mels={n_mels!r}")
    mels = np.linspace(hz_to_mel(float(fmin), htk=htk), hz_to_mel(float(fmax), htk=htk), n_mels)
    return mel_to_hz(mels, htk=htk)


def fft_frequencies(sr: float = 22050, n_fft: int = 2048) -> np.ndarray:
    """Centre frequency of each rfft bin: ``f_k = k * sr / n_fft``, shape ``(1 + n_fft // 2,)``."""
    if isinstance(n_fft, bool) or not isinstance(n_fft, int | np.integer) or n_fft < 1:
        raise ValueError(f"n_fft must be an integer >= 1, got n_fft={n_fft!r}")
    if not sr > 0:
        raise ValueError(f"the sample rate sr must be > 0, got sr={sr!r}")
    return np.fft.rfftfreq(n=n_fft, d=1.0 / sr)


def mel_filterbank(
    sr: float,
    n_fft: int,
    n_mels: int = 128,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
    norm: str | None = "slaney",
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Triangular mel filters that turn a power spectrum into ``n_mels`` band energies.

    Band edges ``f_0 < f_1 < ... < f_{n_mels+1}`` are ``mel_frequencies(n_mels + 2, fmin, fmax)``.
    Filter m rises linearly from 0 at ``f_m`` to 1 at its centre ``f_{m+1}`` and falls back to 0
    at ``f_{m+2}``, evaluated at the FFT bin frequencies ``f_k``:
        ``rising[m, k] = (f_k - f_m) / (f_{m+1} - f_m)``,
        ``falling[m, k] = (f_{m+2} - f_k) / (f_{m+2} - f_{m+1})``,
        ``F[m, k] = max(0, min(rising, falling))``.
    ``norm="slaney"`` multiplies filter m by ``2 / (f_{m+2} - f_m)`` so each triangle has unit
    area in Hz (wide high filters do not dominate); ``norm=None`` leaves the peaks at 1.
    Same values as ``librosa.filters.mel``. Shape ``(n_mels, 1 + n_fft // 2)``, ``dtype``.
    """
    if fmax is None:
        fmax = sr / 2
    if n_fft < 2:
        raise ValueError(f"n_fft must be at least 2, got n_fft={n_fft}")
    if fmax > sr / 2:
        raise ValueError(f"fmax={fmax} Hz is above the Nyquist frequency sr / 2 = {sr / 2} Hz")
    if not 0 <= fmin < fmax:
        raise ValueError(f"need 0 <= fmin < fmax, got fmin={fmin}, fmax={fmax}")
    if norm not in ("slaney", None):
        raise ValueError(f'norm must be "slaney" or None, got norm={norm!r}')

    fft_freqs = fft_frequencies(sr=sr, n_fft=n_fft)  # (F,)
    edges = mel_frequencies(n_mels + 2, fmin=fmin, fmax=fmax, htk=htk)  # (n_mels + 2,)
    widths = np.diff(edges)  # (n_mels + 1,)
    ramps = edges[:, None] - fft_freqs[None, :]  # (n_mels + 2, F): f_j - f_k
    rising = -ramps[:-2] / widths[:-1, None]  # (f_k - f_m) / (f_{m+1} - f_m)
    falling = ramps[2:] / widths[1:, None]  # (f_{m+2} - f_k) / (f_{m+2} - f_{m+1})
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(dtype)  # (n_mels, F)

    if norm == "slaney":
        weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    if not np.all((edges[:-2] == 0) | (weights.max(axis=1) > 0)):
        warnings.warn(
            f"some of the n_mels={n_mels} mel filters are empty (they fall between FFT bins); "
            "use a larger n_fft or fewer mels",
            stacklevel=2,
        )
    return weights


# ---------------------------------------------------------------------------------------------
# Windows, frames, the STFT and its inverse
# ---------------------------------------------------------------------------------------------


def get_window(window: str | np.ndarray, n: int) -> np.ndarray:
    """A periodic window of length n (scipy's ``fftbins=True``, as librosa uses for the STFT).

    ``"hann"``: ``w[j] = 0.5 - 0.5 cos(2 pi j / n)``, ``j = 0 .. n - 1``;
    ``"hamming"``: ``0.54 - 0.46 cos(2 pi j / n)``; ``"boxcar"`` / ``"rectangular"``: ones.
    An array of length n is returned as is. "Periodic" means one period of the cosine over n
    samples (w[n] would equal w[0]), which makes shifted copies add up to a constant.
    Shape ``(n,)``, float64.
    """
    if not isinstance(window, str):
        window = np.asarray(window, dtype=np.float64)
        if window.shape != (n,):
            raise ValueError(f"window array has shape {window.shape}, expected ({n},)")
        return window
    if n < 1:
        raise ValueError(f"window length must be at least 1, got {n}")
    phase = 2.0 * np.pi * np.arange(n) / n
    if window == "hann":
        w = 0.5 - 0.5 * np.cos(phase)
    elif window == "hamming":
        w = 0.54 - 0.46 * np.cos(phase)
    elif window in ("boxcar", "rectangular"):
        w = np.ones(n)
    else:
        raise ValueError(
            f"unknown window {window!r}; expected 'hann', 'hamming', 'boxcar', 'rectangular' "
            "or an array of the window's length"
        )
    return w if n > 1 else np.ones(1)  # scipy: a window of one sample is [1.]


def frame(x: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """Overlapping frames of the last axis as a read-only strided view (no copy).

    ``frames[..., j, t] = x[..., t * hop_length + j]``, ``t = 0 .. (N - frame_length) // hop``.
    Shape ``(..., N)`` -> ``(..., frame_length, n_frames)``, frames along the last axis as librosa.
    """
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"frame: x must have a time axis (..., N), got shape {x.shape}")
    n = x.shape[-1]
    if frame_length < 1:
        raise ValueError(f"frame_length must be a positive integer, got {frame_length}")
    if hop_length < 1:
        raise ValueError(f"hop_length must be a positive integer, got hop_length={hop_length}")
    if n < frame_length:
        raise ValueError(
            f"audio of {n} samples is shorter than one frame (frame_length={frame_length})"
        )
    n_frames = 1 + (n - frame_length) // hop_length
    step = x.strides[-1]  # bytes from one sample to the next
    return np.lib.stride_tricks.as_strided(
        x,
        shape=x.shape[:-1] + (frame_length, n_frames),
        strides=x.strides[:-1] + (step, hop_length * step),
        writeable=False,
    )


def _stft_window(
    window: str | np.ndarray, n_fft: int, win_length: int | None, hop_length: int | None
) -> tuple[np.ndarray, int]:
    """Check the STFT sizes; return the window zero-padded (centred) to n_fft, and the hop."""
    if n_fft < 2:
        raise ValueError(f"n_fft must be at least 2, got n_fft={n_fft}")
    win_length = n_fft if win_length is None else win_length
    if not 1 <= win_length <= n_fft:
        raise ValueError(f"win_length={win_length} must be between 1 and n_fft={n_fft}")
    hop_length = win_length // 4 if hop_length is None else hop_length
    if hop_length < 1:
        raise ValueError(f"hop_length must be a positive integer, got hop_length={hop_length}")
    w = get_window(window, win_length)
    left = (n_fft - win_length) // 2
    return np.pad(w, (left, n_fft - win_length - left)), hop_length


def stft(
    y: np.ndarray,
    n_fft: int = 2048,
    hop_length: int | None = None,
    win_length: int | None = None,
    window: str | np.ndarray = "hann",
    center: bool = True,
    pad_mode: str = "constant",
) -> np.ndarray:
    """Short-time Fourier transform: the spectrum of each windowed frame.

    ``S[k, t] = sum_{n < n_fft} w[n] y[t * hop + n] exp(-2 pi i k n / n_fft)``, ``k <= n_fft // 2``.
    Defaults as librosa: ``win_length = n_fft``, ``hop_length = win_length // 4``, the window is
    zero-padded (centred) to n_fft; ``center=True`` pads ``n_fft // 2`` samples on both sides
    (with ``np.pad(mode=pad_mode)``) so frame t is centred on ``y[t * hop]``.
    Shape ``(N,)`` -> ``(1 + n_fft // 2, 1 + (N + 2 (n_fft // 2) - n_fft) // hop)``
    (``1 + (N - n_fft) // hop`` frames if not centred); complex64 for float32 y, else complex128.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D (mono) signal of shape (samples,), got shape {y.shape}")
    if y.dtype not in (np.float32, np.float64):
        raise ValueError(f"audio y must be float32 or float64, got {y.dtype}; use y.astype(float)")
    if not np.all(np.isfinite(y)):
        raise ValueError("audio y contains NaN or infinity")
    fft_window, hop_length = _stft_window(window, n_fft, win_length, hop_length)
    if center:
        if pad_mode not in _PAD_MODES:
            raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
        if len(y) == 0:
            raise ValueError("audio y is empty (0 samples)")
        y = np.pad(y, n_fft // 2, mode=pad_mode)
    elif len(y) < n_fft:
        raise ValueError(
            f"audio of {len(y)} samples is shorter than one frame (n_fft={n_fft}) with "
            "center=False; pass at least n_fft samples or use center=True"
        )
    frames = frame(y, frame_length=n_fft, hop_length=hop_length)  # (n_fft, T)
    return np.fft.rfft(fft_window.astype(y.dtype)[:, None] * frames, axis=0)  # (1 + n_fft//2, T)


def istft(
    stft_matrix: np.ndarray,
    hop_length: int | None = None,
    win_length: int | None = None,
    window: str | np.ndarray = "hann",
    center: bool = True,
    length: int | None = None,
    n_fft: int | None = None,
) -> np.ndarray:
    """Inverse STFT by weighted overlap-add.

    Each column is turned back into a windowed frame ``w[n] x_t[n] = w[n] irfft(S[:, t])[n]``;
    the frames are added at offsets ``t * hop`` and divided by the window-square sum
    ``sum_t w[n - t * hop]^2`` wherever that sum is above the smallest normal float:
        ``y[n] = sum_t w[n - t hop] x_t[n - t hop] / sum_t w[n - t hop]^2``.
    This undoes ``stft`` exactly wherever the frames cover the signal.
    ``n_fft`` defaults to ``2 (F - 1)`` (pass it for odd n_fft). Shape ``(F, T)`` ->
    ``(length,)``, or ``(n_fft + hop (T - 1) - 2 (n_fft // 2),)`` if centred and no length.
    """
    stft_matrix = np.asarray(stft_matrix)
    if stft_matrix.ndim != 2 or stft_matrix.shape[0] < 2:
        raise ValueError(
            f"expected a spectrogram of shape (1 + n_fft // 2, frames), got {stft_matrix.shape}"
        )
    n_bins, n_frames = stft_matrix.shape
    n_fft = 2 * (n_bins - 1) if n_fft is None else n_fft
    window, hop_length = _stft_window(window, n_fft, win_length, hop_length)
    real = np.float32 if stft_matrix.dtype == np.complex64 else np.float64
    window = window.astype(real)

    frames = window[:, None] * np.fft.irfft(stft_matrix, n=n_fft, axis=0).astype(real)
    y = np.zeros(n_fft + hop_length * (n_frames - 1), dtype=real)
    window_square_sum = np.zeros_like(y)
    for t in range(n_frames):  # overlap-add
        y[t * hop_length : t * hop_length + n_fft] += frames[:, t]
        window_square_sum[t * hop_length : t * hop_length + n_fft] += window**2
    covered = window_square_sum > np.finfo(real).tiny
    y[covered] /= window_square_sum[covered]

    start = n_fft // 2 if center else 0
    if length is None:
        return y[start : len(y) - start]
    y = y[start : start + length]
    return np.pad(y, (0, length - len(y)))  # zeros past the last frame, as librosa


# ---------------------------------------------------------------------------------------------
# Mel spectrogram and decibels
# ---------------------------------------------------------------------------------------------


def melspectrogram(
    y: np.ndarray | None = None,
    sr: float = 22050,
    S: np.ndarray | None = None,
    n_fft: int = 2048,
    hop_length: int = 512,
    win_length: int | None = None,
    window: str | np.ndarray = "hann",
    center: bool = True,
    pad_mode: str = "constant",
    power: float = 2.0,
    n_mels: int = 128,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
    norm: str | None = "slaney",
) -> np.ndarray:
    """Mel spectrogram: mel filterbank applied to the power spectrogram.

    ``M = F @ |stft(y)|^power`` with ``F = mel_filterbank(sr, n_fft, n_mels, fmin, fmax)``.
    Pass either the signal ``y`` or a precomputed spectrogram ``S`` (already raised to the
    power; n_fft is then read from its shape, as librosa does).
    Shape ``(N,)`` or ``S: (1 + n_fft // 2, T)`` -> ``(n_mels, T)``.
    """
    if S is None:
        if y is None:
            raise ValueError("pass either a signal y or a spectrogram S")
        S = np.abs(stft(y, n_fft, hop_length, win_length, window, center, pad_mode)) ** power
    else:
        S = np.asarray(S)
        if S.ndim < 2:
            raise ValueError(f"S must have shape (1 + n_fft // 2, frames), got {S.shape}")
        if n_fft // 2 + 1 != S.shape[-2]:
            n_fft = 2 * (S.shape[-2] - 1)
    dtype = S.dtype if S.dtype in (np.float32, np.float64) else np.float64
    mel_basis = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk, norm, dtype=dtype)
    return mel_basis @ S  # (n_mels, F) @ (F, T) -> (n_mels, T)


def power_to_db(
    S: np.ndarray,
    ref: float | Callable[[np.ndarray], float] = 1.0,
    amin: float = 1e-10,
    top_db: float | None = 80.0,
) -> np.ndarray:
    """Power to decibels: ``10 log10(max(amin, S)) - 10 log10(max(amin, ref))``.

    ``ref`` may be a function of S, e.g. ``np.max`` puts the loudest entry at 0 dB.
    With ``top_db``, values are clipped to at least ``max - top_db``. Same shape as S.
    """
    S = np.asarray(S)
    if amin <= 0:
        raise ValueError(f"amin must be strictly positive, got amin={amin}")
    if top_db is not None and top_db < 0:
        raise ValueError(f"top_db must be non-negative, got top_db={top_db}")
    if np.iscomplexobj(S):
        warnings.warn("power_to_db got complex input; using np.abs(S)", stacklevel=2)
        S = np.abs(S)
    ref_value = ref(S) if callable(ref) else np.abs(ref)
    log_spec = 10.0 * np.log10(np.maximum(amin, S))
    log_spec -= 10.0 * np.log10(np.maximum(amin, ref_value))  # in place: keeps float32
    if top_db is not None and log_spec.size:  # (an empty S has no maximum)
        log_spec = np.maximum(log_spec, log_spec.max() - top_db)
    return log_spec


def amplitude_to_db(
    S: np.ndarray,
    ref: float | Callable[[np.ndarray], float] = 1.0,
    amin: float = 1e-5,
    top_db: float | None = 80.0,
) -> np.ndarray:
    """Amplitude (e.g. ``|stft|``) to decibels: ``20 log10(|S| / ref)``.

    Computed as ``power_to_db(|S|^2, ref^2, amin^2, top_db)``. Same shape as S.
    """
    magnitude = np.abs(np.asarray(S))
    ref_value = ref(magnitude) if callable(ref) else np.abs(ref)
    return power_to_db(magnitude**2, ref=ref_value**2, amin=amin**2, top_db=top_db)
