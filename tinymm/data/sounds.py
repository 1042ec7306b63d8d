"""Synthetic sound clips for lesson 06: classes a spectrogram tells apart and a spectrum hardly can.

Every clip is one sound event placed at a random time in a clip of background noise:
    ``clip(t) = g * (envelope(t - t_0) * event(t - t_0) + sigma * noise(t))``
with onset ``t_0``, an event length ``T`` (0.5 .. 0.9 of the clip; 0.1 .. 0.3 for the noise
burst), a smooth 10 ms fade in and out (``envelope``), white Gaussian background noise at a
random signal-to-noise ratio (``snr_db``, 5 .. 30 dB, measured while the event sounds) and a random
loudness ``g`` that puts the clip's peak between -20 and -1 dBFS. Time ``t`` below is time since the
onset, pitches are log-uniform, every sine starts at a random phase ``phi``.

Classes (``CLASS_NAMES``; label k is ``classes[k]``):

- ``tone``: a steady sine, ``sin(2 pi f t + phi)``, f in 150 .. 3000 Hz.
- ``rising_chirp``: an exponential sweep from f_0 to f_1 = r f_0 (f_0 in 150 .. 600 Hz,
  r in 3 .. 6), instantaneous frequency ``f(t) = f_0 r^(t / T)``, so
  ``sin(2 pi f_0 T (r^(t / T) - 1) / ln r + phi)``.
- ``falling_chirp``: the same sweep run from f_1 down to f_0. Its magnitude spectrum is that of the
  rising chirp played backwards, i.e. the same: only the time axis tells them apart.
- ``chord``: three notes of a major or minor triad, root f in 150 .. 800 Hz,
  ``sum_j a_j sin(2 pi f rho_j t + phi_j)`` with ``rho = (1, 2^(4/12) or 2^(3/12), 2^(7/12))``
  and ``a_j`` in 0.6 .. 1.
- ``tremolo``: a tone whose loudness pulses, ``(1 - d (1 + cos(2 pi f_m t + psi)) / 2) sin(2 pi f t
  + phi)``, rate f_m in 4 .. 10 Hz, depth d in 0.7 .. 1: a steady tone with a wobbling envelope.
- ``noise_burst``: a short burst of white Gaussian noise (0.1 .. 0.3 of the clip): flat spectrum.
- ``click_train``: clicks at a rate of 4 .. 16 per second, each a 1 ms decaying noise pulse,
  ``exp(-(t mod P) / tau) n(t)``, ``P = 1 / rate``, ``tau = 1 ms``: broadband like the noise burst,
  but periodic in time.
- ``siren``: two notes f_lo (300 .. 1500 Hz) and f_hi = (1.25 .. 1.6) f_lo that alternate every
  80 .. 200 ms, phase-continuous: ``sin(2 pi sum_{s <= t} f(s) / sr + phi)``. Its spectrum shows two
  peaks like a chord; the spectrogram shows they never sound together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "tone",
    "rising_chirp",
    "falling_chirp",
    "chord",
    "tremolo",
    "noise_burst",
    "click_train",
    "siren",
)

FADE = 0.01  # seconds of fade in and fade out at the ends of an event
PEAK_DB = (-20.0, -1.0)  # range of the clip's peak level, dB relative to full scale (1.0)
CLICK_TAU = 0.001  # seconds, decay of one click


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A value whose logarithm is uniform: equal chances per octave, as pitch is heard."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _phase(rng: np.random.Generator) -> float:
    return rng.uniform(0.0, 2 * np.pi)


# Each event generator maps (rng, t, T, sr) to one event (samples,), where t (samples,) is the
# time since the clip's onset and T the length of the event in seconds.


def _tone(rng, t, T, sr):
    f = _log_uniform(rng, 150.0, 3000.0)
    return np.sin(2 * np.pi * f * t + _phase(rng))


def _chirp(rng, t, T, rising: bool):
    f_low = _log_uniform(rng, 150.0, 600.0)
    f_high = f_low * rng.uniform(3.0, 6.0)
    f_0, f_1 = (f_low, f_high) if rising else (f_high, f_low)
    r = f_1 / f_0  # f(t) = f_0 r^(t / T); its integral gives the phase
    return np.sin(2 * np.pi * f_0 * T * (r ** (t / T) - 1) / np.log(r) + _phase(rng))


def _rising_chirp(rng, t, T, sr):
    return _chirp(rng, t, T, rising=True)


def _falling_chirp(rng, t, T, sr):
    return _chirp(rng, t, T, rising=False)


def _chord(rng, t, T, sr):
    root = _log_uniform(rng, 150.0, 800.0)
    third = 2 ** (4 / 12) if rng.random() < 0.5 else 2 ** (3 / 12)  # major / minor
    notes = root * np.array([1.0, third, 2 ** (7 / 12)])
    amplitudes = rng.uniform(0.6, 1.0, 3)
    phases = rng.uniform(0.0, 2 * np.pi, 3)
    chord = np.zeros_like(t)
    for a, f, phi in zip(amplitudes, notes, phases, strict=True):
        chord += a * np.sin(2 * np.pi * f * t + phi)
    return chord


def _tremolo(rng, t, T, sr):
    f = _log_uniform(rng, 150.0, 3000.0)
    rate = rng.uniform(4.0, 10.0)
    depth = rng.uniform(0.7, 1.0)
    loudness = 1 - depth * (1 + np.cos(2 * np.pi * rate * t + _phase(rng))) / 2
    return loudness * np.sin(2 * np.pi * f * t + _phase(rng))


def _noise_burst(rng, t, T, sr):
    return rng.standard_normal(t.shape)


def _click_train(rng, t, T, sr):
    period = 1 / rng.uniform(4.0, 16.0)
    since_click = np.mod(t, period)
    return np.exp(-since_click / CLICK_TAU) * rng.standard_normal(t.shape)


def _siren(rng, t, T, sr):
    f_low = _log_uniform(rng, 300.0, 1500.0)
    f_high = f_low * rng.uniform(1.25, 1.6)
    half_period = rng.uniform(0.08, 0.2)
    high = np.floor(t / half_period) % 2 == 1  # which note is sounding
    f = np.where(high, f_high, f_low)  # (samples,) instantaneous frequency
    return np.sin(2 * np.pi * np.cumsum(f) / sr + _phase(rng))


_GENERATORS: dict[str, Callable] = {
    "tone": _tone,
    "rising_chirp": _rising_chirp,
    "falling_chirp": _falling_chirp,
    "chord": _chord,
    "tremolo": _tremolo,
    "noise_burst": _noise_burst,
    "click_train": _click_train,
    "siren": _siren,
}


def _envelope(t: np.ndarray, T: float) -> np.ndarray:
    """1 while the event sounds, 0 outside, smooth fades ``3x^2 - 2x^3`` of FADE seconds."""
    fade_in = np.clip(t / FADE, 0.0, 1.0)
    fade_out = np.clip((T - t) / FADE, 0.0, 1.0)
    return fade_in**2 * (3 - 2 * fade_in) * fade_out**2 * (3 - 2 * fade_out)


def _clip(
    rng: np.random.Generator,
    name: str,
    time: np.ndarray,
    sr: int,
    duration: float,
    snr_db: tuple[float, float],
) -> np.ndarray:
    """One clip of class ``name`` at the sample times ``time`` (samples,), float64 (samples,)."""
    short = name == "noise_burst"
    T = duration * rng.uniform(*((0.1, 0.3) if short else (0.5, 0.9)))  # event length, seconds
    onset = rng.uniform(0.0, duration - T)
    t = time - onset  # time since the onset
    envelope = _envelope(t, T)
    event = envelope * _GENERATORS[name](rng, t, T, sr)
    event_power = (event**2).sum() / np.count_nonzero(envelope)  # while the event sounds
    snr = rng.uniform(*snr_db)
    clip = event + rng.standard_normal(len(t)) * np.sqrt(event_power / 10 ** (snr / 10))
    peak = 10 ** (rng.uniform(*PEAK_DB) / 20)
    return clip * (peak / np.abs(clip).max())


def make_sounds(
    n: int,
    seed: int = 0,
    sr: int = 16000,
    duration: float = 1.0,
    classes: Sequence[str] | None = None,
    snr_db: tuple[float, float] = (5.0, 30.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Generate n labelled clips, the same ones for the same arguments.

    ``classes`` picks a subset of ``CLASS_NAMES`` (default: all); label k means ``classes[k]``.
    Labels are as balanced as n allows, in random order. ``snr_db`` is the range of the
    event-to-background-noise ratio in dB.
    Returns ``waves (n, round(sr * duration))`` float32 in [-1, 1] and ``labels (n,)`` int64.
    Clips are made one after the other from one random stream, each in float64 and then stored
    in float32: beyond the returned waves, memory stays at a few arrays of one clip's length.
    """
    names = CLASS_NAMES if classes is None else tuple(classes)
    unknown = [name for name in names if name not in _GENERATORS]
    if unknown or not names:
        raise ValueError(f"unknown sound classes {unknown}; expected some of {CLASS_NAMES}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got n={n}")
    if sr < 8000:
        raise ValueError(f"sr must be at least 8000 Hz (pitches reach 3.6 kHz), got sr={sr}")
    if duration < 0.25:
        raise ValueError(f"duration must be at least 0.25 s, got duration={duration}")

    rng = np.random.default_rng(seed)
    samples = round(sr * duration)
    labels = rng.permutation(np.arange(n) % len(names)).astype(np.int64)
    waves = np.empty((n, samples), dtype=np.float32)
    time = np.arange(samples) / sr
    for i, label in enumerate(labels):  # one clip at a time: float64 while it is made, small
        waves[i] = _clip(rng, names[label], time, sr, duration, snr_db)
    return waves, labels
