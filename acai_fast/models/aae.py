"""Adversarial autoencoder (brain-research/acai aae.py; SPEC.md section 6) on the shared networks.

An MLP discriminator (flattened latent -> 100 -> 100 -> 1 logit, leaky ReLU 0.2, tf.layers.dense
init) learns to tell the encoder's latents (label 0) from prior samples z ~ N(0, I) (label 1); the
autoencoder minimises its reconstruction MSE plus the GAN loss of its latents labelled 1 (weight 1):
    ae objective    mean((dec(enc(x)) - x)^2) + BCE(D(enc(x)), 1)
    disc objective  BCE(D(enc(x)), 0) + BCE(D(prior), 1)
Each objective's gradient reaches only its own group; the discriminator's Adam uses the trainer's
lr, which is the paper's adversary_lr (1e-4) at the default --lr.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ae import Autoencoder
from .base import Randomness, StepOutput
from .vae import dense

DISC_SIZES = (100, 100)  # the paper's --disc_layer_sizes
LEAKY_SLOPE = 0.2  # tf.nn.leaky_relu's default


class LatentDiscriminator(nn.Module):
    """(N, latent, w, w) -> (N,) logits: flatten, dense layers with leaky ReLU, dense to 1."""

    def __init__(self, dims: int, sizes=DISC_SIZES):
        super().__init__()
        widths = [dims, *sizes]
        self.hidden = nn.ModuleList(dense(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = dense(widths[-1], 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z.flatten(1)
        for layer in self.hidden:
            h = F.leaky_relu(layer(h), LEAKY_SLOPE)
        return self.out(h).squeeze(1)


class AAE(Autoencoder):
    """Encoder, decoder and latent discriminator; groups "ae" and "disc"."""

    name = "aae"

    def __init__(self, config):
        super().__init__(config)
        self.discriminator = LatentDiscriminator(config.latent_dims)

    def param_groups(self):
        return dict(ae=[*self.encoder.parameters(), *self.decoder.parameters()],
                    disc=list(self.discriminator.parameters()))

    def objectives(self, x: torch.Tensor, rand: Randomness) -> StepOutput:
        z = self.encoder(x)
        loss_ae = F.mse_loss(self.decoder(z), x)
        prior = torch.randn(z.shape, generator=rand.generator, device=z.device, dtype=z.dtype)
        logit_latent = self.discriminator(z)
        logit_prior = self.discriminator(prior)
        bce = F.binary_cross_entropy_with_logits
        loss_adv_latent = bce(logit_latent, torch.zeros_like(logit_latent))
        loss_adv_prior = bce(logit_prior, torch.ones_like(logit_prior))
        loss_ae_latent = bce(logit_latent, torch.ones_like(logit_latent))
        accuracy = 0.5 * ((logit_latent <= 0).float().mean() + (logit_prior > 0).float().mean())
        return StepOutput(
            objectives=dict(ae=loss_ae + loss_ae_latent, disc=loss_adv_latent + loss_adv_prior),
            logged=dict(loss_ae=loss_ae, loss_adv_latent=loss_adv_latent, loss_adv_prior=loss_adv_prior,
                        loss_ae_latent=loss_ae_latent, adversary_accuracy=accuracy),
            latent=z)
