"""The plain autoencoder ("baseline" of the paper, brain-research/acai baseline.py): the shared
encoder and decoder of SPEC.md section 1 trained on the reconstruction MSE alone.

`Autoencoder` is also the base of the other MSE baselines (denoising, dropout): they change only
what the decoder sees during training, never the networks or what `encode`/`decode` do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..networks import autoencoder
from .base import Model, Randomness, StepOutput


class Autoencoder(Model):
    """Encoder + decoder (SPEC.md section 1), one parameter group "ae" minimising
    mean((dec(enc(x)) - x)^2)."""

    name = "baseline"

    def __init__(self, config):
        super().__init__(config)
        self.encoder, self.decoder = autoencoder(config)

    def param_groups(self):
        return dict(ae=[*self.encoder.parameters(), *self.decoder.parameters()])

    def objectives(self, x: torch.Tensor, rand: Randomness) -> StepOutput:
        z = self.encoder(x)
        loss_ae = F.mse_loss(self.decoder(z), x)
        return StepOutput(objectives=dict(ae=loss_ae), logged=dict(loss_ae=loss_ae), latent=z)
