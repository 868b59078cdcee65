"""Dropout autoencoder (brain-research/acai dropout.py): the baseline with dropout on the flattened
latent during training (keep probability 0.5, kept values scaled by 1/0.5 as tf.nn.dropout does;
SPEC.md section 6). The probe, `encode` and `decode` see the latent without dropout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ae import Autoencoder
from .base import Randomness, StepOutput

KEEP_PROB = 0.5  # the paper's --dropout (a keep probability)


class DropoutAutoencoder(Autoencoder):
    """mean((dec(dropout(enc(x))) - x)^2) with an independent keep/drop per latent element."""

    name = "dropout"
    keep_prob = KEEP_PROB

    def objectives(self, x: torch.Tensor, rand: Randomness) -> StepOutput:
        z = self.encoder(x)
        u = torch.rand(z.shape, generator=rand.generator, device=z.device, dtype=z.dtype)
        z_train = z * (u < self.keep_prob).to(z.dtype) / self.keep_prob
        loss_ae = F.mse_loss(self.decoder(z_train), x)
        return StepOutput(objectives=dict(ae=loss_ae), logged=dict(loss_ae=loss_ae), latent=z)
