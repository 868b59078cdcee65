"""Variational autoencoder (brain-research/acai vae.py; SPEC.md section 6) on the shared networks.

Two dense layers on the flattened encoder output give the posterior mean mu and log-variance (each
of the latent's size); a sample z = mu + exp(logvar / 2) * eps is decoded to Bernoulli logits over
the pixels rescaled to (x + 1) / 2. Minimised: -ELBO = -log p(x | z) + beta * KL(q(z | x) || N(0, I)),
each summed over an image's pixels / latent dimensions and averaged over the batch; beta = 1.
Images are 2 * sigmoid(logits) - 1. `encode` returns mu (deterministic interpolations and probe).

Differences from the paper's code, on purpose: its interpolations encode a posterior *sample* and
its probe reads the conv output before the dense layers; here both read mu, so the probe is trained
and tested on the same code and an evaluation does not depend on a noise draw.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..networks import autoencoder
from .base import Model, Randomness, StepOutput

BETA = 1.0  # weight of the KL term (the paper's --beta)


def dense(n_in: int, n_out: int) -> nn.Linear:
    """tf.layers.dense's defaults, as the paper's code uses them: glorot-uniform kernel, zero bias."""
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sum over pixels of log Bernoulli((x + 1) / 2 | sigmoid(logits)), averaged over the batch
    (tf.distributions.Bernoulli(logits).log_prob with soft targets, as the paper's code)."""
    target = 0.5 * (x + 1)
    return -F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / x.shape[0]


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over dimensions, averaged over the batch."""
    return 0.5 * torch.sum(-logvar - 1 + logvar.exp() + mu.square()) / mu.shape[0]


def logits_to_images(logits: torch.Tensor) -> torch.Tensor:
    """Bernoulli means back in the data's [-1, 1] units: 2 * sigmoid(logits) - 1."""
    return 2 * torch.sigmoid(logits) - 1


class VAE(Model):
    """Encoder, dense mu / log-variance heads, decoder of Bernoulli logits; one group "ae"."""

    name = "vae"
    beta = BETA

    def __init__(self, config):
        super().__init__(config)
        dims = config.latent_dims
        self.encoder, self.decoder = autoencoder(config)
        self.to_mu = dense(dims, dims)
        self.to_logvar = dense(dims, dims)

    def vae_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.to_mu.parameters(), *self.to_logvar.parameters(),
                *self.decoder.parameters()]

    def param_groups(self):
        return dict(ae=self.vae_parameters())

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (N, dims): the dense heads on the flattened encoder output."""
        h = self.encoder(x).flatten(1)  # (N, latent, w, w) -> (N, dims)
        return self.to_mu(h), self.to_logvar(h)

    def vae_terms(self, x: torch.Tensor, rand: Randomness):
        """The forward pass shared with vae_acai: mu and the images of the sample, the objective
        -ELBO and the values to log."""
        mu, logvar = self.posterior(x)
        eps = torch.randn(mu.shape, generator=rand.generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = self.decoder(z.view(-1, *self.config.latent_shape))
        loss_ll = bernoulli_log_likelihood(logits, x)
        loss_kl = gaussian_kl(mu, logvar)
        elbo = loss_ll - self.beta * loss_kl
        ae = logits_to_images(logits)
        logged = dict(loss_ae=F.mse_loss(ae.detach(), x), loss_ll=loss_ll, loss_kl=loss_kl, elbo=elbo)
        return mu.view(-1, *self.config.latent_shape), ae, -elbo, logged

    def objectives(self, x: torch.Tensor, rand: Randomness) -> StepOutput:
        mu, _, neg_elbo, logged = self.vae_terms(x, rand)
        return StepOutput(objectives=dict(ae=neg_elbo), logged=logged, latent=mu)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean mu, shaped like the latent map (N, latent, w, w)."""
        return self.posterior(x)[0].view(-1, *self.config.latent_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return logits_to_images(self.decoder(z))

    @property
    def pixels(self) -> int:
        return self.config.colors * self.config.image_size ** 2
