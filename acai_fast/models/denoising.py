"""Denoising autoencoder (brain-research/acai denoising.py): the baseline trained to reconstruct x
from x plus Gaussian noise (std 1.0 in the data's [-1, 1] units, SPEC.md section 6).

The linear probe reads the latent of the clean image, as in the paper's code; interpolations
encode clean images too (the noise is a training-time corruption only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ae import Autoencoder
from .base import Randomness, StepOutput

NOISE_STD = 1.0  # the paper's --noise


class DenoisingAutoencoder(Autoencoder):
    """mean((dec(enc(x + noise)) - x)^2), noise ~ N(0, NOISE_STD^2) per pixel, unclipped."""

    name = "denoising"
    noise_std = NOISE_STD

    def objectives(self, x: torch.Tensor, rand: Randomness) -> StepOutput:
        noise = torch.randn(x.shape, generator=rand.generator, device=x.device, dtype=x.dtype)
        loss_ae = F.mse_loss(self.decoder(self.encoder(x + self.noise_std * noise)), x)
        with torch.no_grad():  # only the probe reads the clean latent
            z = self.encoder(x)
        return StepOutput(objectives=dict(ae=loss_ae), logged=dict(loss_ae=loss_ae), latent=z)
