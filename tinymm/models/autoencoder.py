"""The KL-autoencoder of latent diffusion: pixels <-> a small latent picture.

The lecture: "Kandinsky 2.0 ... uses U-Net to denoise the image and get the intermediate final
image representation. The final image is decoded by KL-AE from intermediate representation."
Diffusion then runs on the latents, f^2 times fewer positions than pixels.

1. Encoder E: convolutions down by a factor f = 2^(levels) (stride-2 convs), to a mean and a
   log-variance per latent position and channel:   x (N, H, W, 3) -> mu, log sigma^2
   (N, H/f, W/f, z)                                                               encode
2. Reparameterised sample: z = mu + sigma * e, e ~ N(0, I) (differentiable in mu, sigma)
3. Decoder D: convolutions and nearest x2 up-sampling back to pixels, a sigmoid to [0, 1]
                                                                                  decode
4. Loss = reconstruction + a small KL weight (the "KL" in KL-AE keeps the latent space smooth
   and near N(0, I) without squeezing out the picture):
       L = mean (x - D(z))^2 + beta * KL,
       KL = mean over latents of 1/2 (mu^2 + sigma^2 - 1 - log sigma^2)          kl_divergence
5. Latent scale factor: diffusion expects data of unit variance; latent diffusion multiplies
   the latents by 1 / std(latents of the training set) before diffusing and divides after.
                                                                          (the lesson measures it)
Shapes are channels-last throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import functional as F
from .. import nn
from ..tensor import Tensor, default_rng


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per element, averaged:
    mean of 1/2 (mu^2 + exp(logvar) - 1 - logvar)."""
    return ((mean * mean + logvar.exp() - 1.0 - logvar) * 0.5).mean()


LOGVAR_INIT = -8.0  # the encoder's first log-variance: sigma = exp(-4) ~ 0.02


class KLAutoencoder(nn.Module):
    """Encoder to (mean, logvar) latents of `latent_channels`, decoder back to pixels.

    channels: widths from the finest level down, e.g. (32, 64, 64): two stride-2 steps
    (f = 4, 32x32x3 -> 8x8x4)."""

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        channels: Sequence[int] = (32, 64, 64),
        groups: int = 8,
    ):
        super().__init__()
        channels = tuple(channels)
        if len(channels) < 1 or any(c < 1 for c in channels):
            raise ValueError(f"KLAutoencoder: channels must be positive widths, got {channels}")
        self.in_channels, self.latent_channels, self.channels = (
            in_channels,
            latent_channels,
            channels,
        )
        self.factor = 2 ** (len(channels) - 1)
        g = [int(np.gcd(groups, c)) for c in channels]
        # encoder: conv in, then per level down: norm, SiLU, stride-2 conv
        self.enc_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.enc_down = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1)
            for i in range(len(channels) - 1)
        )
        self.enc_norms = nn.ModuleList(
            nn.GroupNorm(g[i], channels[i]) for i in range(len(channels) - 1)
        )
        self.enc_mid = nn.Conv2d(channels[-1], channels[-1], 3, padding=1)
        self.enc_norm_out = nn.GroupNorm(g[-1], channels[-1])
        self.enc_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)
        # log sigma^2 starts at LOGVAR_INIT, not 0: sigma = 1 noise would swamp latents of size
        # ~0.1 while the encoder slowly learns to shrink it
        self.enc_out.bias.data[latent_channels:] = LOGVAR_INIT
        # decoder: conv in, then per level up: norm, SiLU, nearest x2, conv
        self.dec_in = nn.Conv2d(latent_channels, channels[-1], 3, padding=1)
        self.dec_mid = nn.Conv2d(channels[-1], channels[-1], 3, padding=1)
        self.dec_mid_norm = nn.GroupNorm(g[-1], channels[-1])
        self.dec_norms = nn.ModuleList(
            nn.GroupNorm(g[i + 1], channels[i + 1]) for i in reversed(range(len(channels) - 1))
        )
        self.dec_up = nn.ModuleList(
            nn.Conv2d(channels[i + 1], channels[i], 3, padding=1)
            for i in reversed(range(len(channels) - 1))
        )
        self.dec_norm_out = nn.GroupNorm(g[0], channels[0])
        self.dec_out = nn.Conv2d(channels[0], in_channels, 3, padding=1)

    def encode(self, x: Any) -> tuple[Tensor, Tensor]:
        """x (N, H, W, C) in [0, 1] -> mean, logvar (N, H/f, W/f, z)."""
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
        if x.ndim != 4 or x.shape[3] != self.in_channels:
            raise ValueError(f"encode: x must be (N, H, W, {self.in_channels}), got {x.shape}")
        if x.shape[1] % self.factor or x.shape[2] % self.factor:
            raise ValueError(f"encode: H and W must be divisible by {self.factor}, got {x.shape}")
        h = self.enc_in(x * 2.0 - 1.0)  # pixels to [-1, 1]
        for norm, down in zip(self.enc_norms, self.enc_down, strict=True):
            h = down(F.silu(norm(h)))
        h = h + self.enc_mid(F.silu(h))
        moments = self.enc_out(F.silu(self.enc_norm_out(h)))  # (N, h, w, 2z)
        z = self.latent_channels
        return moments[..., :z], moments[..., z:].clip(-20.0, 10.0)

    def sample(self, mean: Tensor, logvar: Tensor) -> Tensor:
        """z = mu + sigma * e, e ~ N(0, I) from tinymm's seeded generator."""
        e = default_rng().standard_normal(mean.shape).astype(mean.dtype)
        return mean + (logvar * 0.5).exp() * Tensor(e)

    def decode(self, z: Any) -> Tensor:
        """z (N, h, w, z) -> pixels (N, h f, w f, C) in (0, 1)."""
        z = z if isinstance(z, Tensor) else Tensor(np.asarray(z))
        if z.ndim != 4 or z.shape[3] != self.latent_channels:
            raise ValueError(f"decode: z must be (N, h, w, {self.latent_channels}), got {z.shape}")
        h = self.dec_in(z)
        h = h + self.dec_mid(F.silu(self.dec_mid_norm(h)))
        for norm, up in zip(self.dec_norms, self.dec_up, strict=True):
            h = up(F.upsample_nearest2d(F.silu(norm(h)), 2))
        return F.sigmoid(self.dec_out(F.silu(self.dec_norm_out(h))))

    def forward(self, x: Any) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, mean, logvar), the latent sampled by the reparameterisation."""
        mean, logvar = self.encode(x)
        return self.decode(self.sample(mean, logvar)), mean, logvar

    def loss(self, x: Any, kl_weight: float) -> tuple[Tensor, Tensor, Tensor]:
        """(L, reconstruction MSE, KL) with L = MSE + kl_weight * KL."""
        recon, mean, logvar = self(x)
        mse = F.mse_loss(recon, x if isinstance(x, Tensor) else Tensor(np.asarray(x)))
        kl = kl_divergence(mean, logvar)
        return mse + kl_weight * kl, mse, kl

    def extra_repr(self) -> str:
        return f"channels={self.channels}, latent_channels={self.latent_channels}, f={self.factor}"
