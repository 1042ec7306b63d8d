"""Diffusion: the noising process, its training target, the samplers, classifier-free guidance.

The lecture: "Diffusion is all about making an image step by step. On each step we do not
require the model to make the final image, but take the image from the previous step and make
it better (more clear, less noisy). Starting from the pure white noise image we do N steps and
get the final image based on a text condition."

1. Forward process (fixed, no parameters). A schedule of variances beta_1..beta_T adds a little
   Gaussian noise per step; with alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s
   (`Schedule.alphas_cumprod`) any step has a closed form:
       x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)          q_sample
   abar_t falls from ~1 (the picture) to ~0 (white noise). Two schedules: DDPM's linear betas
   1e-4 .. 0.02 over T = 1000 (`Schedule.linear`), and the cosine schedule of Nichol & Dhariwal,
   abar_t = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2), s = 0.008
   (`Schedule.cosine`), which destroys the picture more evenly over t.
2. Training target: draw t uniformly, noise x_0 to x_t, ask the network for the noise:
       L = || eps - eps_theta(x_t, t, text) ||^2                                diffusion_loss
3. Reverse process, DDPM ancestral sampling (all T steps), from x_T ~ N(0, I):    ddpm_sample
       x_{t-1} = 1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta) + sigma_t z
       sigma_t^2 = beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t,   z ~ N(0, I)
4. DDIM (Song et al.): the same trained network, any sub-sequence of steps tau_1 > ... > tau_S:
       x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)               ddim_sample
       x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_theta + sigma z
       sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
   eta = 0: deterministic (one noise image, one picture); eta = 1: DDPM's variance.
5. Classifier-free guidance: training replaces the caption by the empty caption with
   probability ~0.1, so one network predicts both eps(x_t, text) and eps(x_t, "").
   Sampling extrapolates from the unconditional prediction towards the conditional one:
       eps = eps_uncond + s (eps_cond - eps_uncond)                             guidance
   s = 1 is the plain conditional model; s > 1 trades variety for agreement with the text.

Samplers take a noise predictor `eps_fn(x_t, t) -> eps` on NumPy arrays (t an int, the same for
the whole batch), so the loop reads like the equations; `guided_eps_fn` builds one from a
conditional network, batching the conditional and the unconditional pass together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import functional as F
from .tensor import Tensor, no_grad

NoisePredictor = Callable[[np.ndarray, int], np.ndarray]
StepCallback = Callable[[int, np.ndarray, np.ndarray], None]


class Schedule:
    """A noise schedule: betas (T,) and what follows from them, all float64 NumPy arrays.

    alphas = 1 - betas;  alphas_cumprod[t] = abar_t = prod_{s <= t} alphas[s]  (t = 0..T-1).
    """

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-d array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError(f"betas must lie in (0, 1), got min {betas.min()}, max {betas.max()}")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)

    @property
    def T(self) -> int:  # noqa: N802 (the papers' name)
        return len(self.betas)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:  # noqa: N803
        """DDPM's schedule: betas evenly spaced from beta_start to beta_end."""
        _check_steps(T, "T")
        return cls(np.linspace(beta_start, beta_end, T))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:  # noqa: N803
        """Nichol & Dhariwal: abar_t = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2);
        betas = 1 - abar_t / abar_{t-1}, clipped at max_beta (the last steps would reach 1)."""
        _check_steps(T, "T")
        f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
        return cls(np.minimum(1 - f[1:] / f[:-1], max_beta))

    def __repr__(self) -> str:
        return (
            f"Schedule(T={self.T}, beta {self.betas[0]:.2e}..{self.betas[-1]:.2e}, "
            f"abar {self.alphas_cumprod[0]:.4f}..{self.alphas_cumprod[-1]:.2e})"
        )


def _check_steps(n: Any, name: str) -> None:
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")


def _check_t(t: np.ndarray, schedule: Schedule) -> np.ndarray:
    t = np.asarray(t)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"t must hold integer steps, got dtype {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= schedule.T):
        raise IndexError(f"t must lie in [0, {schedule.T - 1}], got {t.min()}..{t.max()}")
    return t


def q_sample(x0: np.ndarray, t: Any, noise: np.ndarray, schedule: Schedule) -> np.ndarray:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, per example.

    x0, noise (N, ...) ; t (N,) integer steps in [0, T) or one int. Returns x_t in x0's dtype.
    """
    x0, noise = np.asarray(x0), np.asarray(noise)
    if x0.shape != noise.shape:
        raise ValueError(f"q_sample: x0 {x0.shape} and noise {noise.shape} differ in shape")
    t = _check_t(t, schedule)
    if t.ndim == 1 and len(t) != len(x0):
        raise ValueError(f"q_sample: t has {len(t)} steps for {len(x0)} examples")
    abar = schedule.alphas_cumprod[t].reshape(t.shape + (1,) * (x0.ndim - t.ndim))
    return (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise).astype(x0.dtype)


def diffusion_loss(
    eps_model: Callable[[np.ndarray, np.ndarray], Tensor],
    x0: np.ndarray,
    schedule: Schedule,
    rng: np.random.Generator,
) -> Tensor:
    """L = mean || eps - eps_theta(x_t, t) ||^2, t ~ U{0..T-1}, eps ~ N(0, I), per example.

    eps_model(x_t, t) -> Tensor of x0's shape (close over the text condition)."""
    t = rng.integers(schedule.T, size=len(x0))
    noise = rng.standard_normal(x0.shape).astype(x0.dtype)
    return F.mse_loss(eps_model(q_sample(x0, t, noise, schedule), t), noise)


def guidance(eps_cond: Any, eps_uncond: Any, scale: float) -> Any:
    """Classifier-free guidance: eps = eps_uncond + s (eps_cond - eps_uncond)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_eps_fn(
    eps_model: Callable[[np.ndarray, np.ndarray, Any], Any],
    cond: np.ndarray,
    uncond: np.ndarray,
    scale: float,
) -> NoisePredictor:
    """A noise predictor for the samplers from eps_model(x_t, t (N,), context) -> eps.

    cond, uncond: the contexts (N, ...) of the captions and of the empty caption. With s = 1
    only the conditional pass runs; otherwise both run as one batch of 2N and are combined by
    `guidance`. No graph is built."""
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    cond, uncond = np.asarray(cond), np.asarray(uncond)
    if cond.shape != uncond.shape:
        raise ValueError(f"cond {cond.shape} and uncond {uncond.shape} must have one shape")
    both = np.concatenate([cond, uncond])

    def eps_fn(x: np.ndarray, t: int) -> np.ndarray:
        n = len(x)
        with no_grad():
            if scale == 1:
                return np.asarray(eps_model(x, np.full(n, t), cond))
            eps = np.asarray(eps_model(np.concatenate([x, x]), np.full(2 * n, t), both))
        return guidance(eps[:n], eps[n:], scale)

    return eps_fn


def ddpm_sample(
    eps_fn: NoisePredictor,
    shape: tuple[int, ...],
    schedule: Schedule,
    rng: np.random.Generator,
    on_step: StepCallback | None = None,
    dtype: Any = np.float32,
) -> np.ndarray:
    """Ancestral sampling through all T steps, from x_T ~ N(0, I) to x_0:

        x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z,
        sigma_t^2 = (1 - abar_{t-1}) / (1 - abar_t) beta_t   (no noise at the last step).

    on_step(t, x_t, x0_hat) is called before each step (for the reverse-process figure)."""
    x = rng.standard_normal(shape).astype(dtype)
    abar = schedule.alphas_cumprod
    for t in reversed(range(schedule.T)):
        eps = eps_fn(x, t)
        if on_step is not None:
            on_step(t, x, (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t]))
        mean = (x - schedule.betas[t] / np.sqrt(1 - abar[t]) * eps) / np.sqrt(schedule.alphas[t])
        if t > 0:
            sigma = np.sqrt((1 - abar[t - 1]) / (1 - abar[t]) * schedule.betas[t])
            x = mean + sigma * rng.standard_normal(shape)
        else:
            x = mean
        x = x.astype(dtype)
    return x


def ddim_timesteps(T: int, steps: int) -> np.ndarray:  # noqa: N803
    """`steps` evenly spaced steps from T-1 down to 0 (int64, decreasing)."""
    _check_steps(steps, "steps")
    if steps > T:
        raise ValueError(f"steps must be <= T = {T}, got {steps}")
    return np.linspace(T - 1, 0, steps).round().astype(np.int64)


def ddim_sample(
    eps_fn: NoisePredictor,
    shape: tuple[int, ...],
    schedule: Schedule,
    rng: np.random.Generator,
    steps: int = 50,
    eta: float = 0.0,
    x_T: np.ndarray | None = None,  # noqa: N803
    on_step: StepCallback | None = None,
    dtype: Any = np.float32,
) -> np.ndarray:
    """DDIM over `steps` of the T steps (abar_prev = 1 after the last):

        x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z

    x_T: the starting noise (default: drawn from rng). on_step(t, x_t, x0_hat) per step."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x = rng.standard_normal(shape).astype(dtype) if x_T is None else np.asarray(x_T, dtype)
    if x.shape != tuple(shape):
        raise ValueError(f"x_T has shape {x.shape}, expected {tuple(shape)}")
    abar = schedule.alphas_cumprod
    timesteps = ddim_timesteps(schedule.T, steps)
    for i, t in enumerate(timesteps):
        abar_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        eps = eps_fn(x, int(t))
        x0_hat = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
        if on_step is not None:
            on_step(int(t), x, x0_hat)
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar[t]) * (1 - abar[t] / abar_prev))
        x = np.sqrt(abar_prev) * x0_hat + np.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * rng.standard_normal(shape)
        x = x.astype(dtype)
    return x
