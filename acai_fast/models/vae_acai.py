"""The ACAI regulariser on a VAE (beyond the paper: the question its readers raised).

The VAE of models/vae.py plus ACAI's critic (SPEC.md section 2) on decoded interpolations of the
posterior means: with alpha = 0.5 - |u - 0.5| drawn from the trainer's Philox stream as ACAI does,
    mu_mix = alpha * mu + (1 - alpha) * mu[reversed batch]     x_mix = 2 sigmoid(dec(mu_mix)) - 1
    VAE (encoder, heads, decoder) minimises  -ELBO + advweight * P * mean(critic(x_mix)^2)
    critic minimises  mean((critic(x_mix) - alpha)^2) + mean(critic(ae + reg * (x - ae))^2)
where ae = 2 sigmoid(logits) - 1 is the VAE's training reconstruction (of the posterior sample)
and P = colors * H * W.

Why the factor P: ACAI adds lambda * critic^2 to a reconstruction loss that is a *mean* over pixels;
the -ELBO is a *sum* over the P pixels of each image, so lambda alone would weigh the critic ~1000x
less, relative to reconstruction, than in ACAI. With P, lambda = 0.5 means what it means in ACAI.
"""
from __future__ import annotations

import torch

from ..networks import Critic
from ..ops.philox import draw_alpha
from .base import Randomness, StepOutput
from .vae import VAE, logits_to_images


class VAEACAI(VAE):
    """VAE + ACAI critic; groups "ae" (the VAE's parameters) and "critic"."""

    name = "vae_acai"

    def __init__(self, config):
        super().__init__(config)
        self.critic = Critic(config.colors, config.critic_depth, config.scales, config.latent)

    def param_groups(self):
        return dict(ae=self.vae_parameters(), critic=list(self.critic.parameters()))

    def objectives(self, x: torch.Tensor, rand: Randomness) -> StepOutput:
        cfg = self.config
        mu, ae, neg_elbo, logged = self.vae_terms(x, rand)
        alpha = draw_alpha(rand.alpha_state, x.shape[0]).view(-1, 1, 1, 1)
        mu_mix = alpha * mu + (1 - alpha) * mu.flip(0)  # item i mixed with item N-1-i
        x_mix = logits_to_images(self.decoder(mu_mix))
        critic_mix = self.critic(x_mix)  # (N,)
        critic_real = self.critic(ae + cfg.reg * (x - ae))

        loss_ae_disc = critic_mix.square().mean()
        loss_disc = (critic_mix - alpha.flatten()).square().mean()
        loss_disc_real = critic_real.square().mean()
        logged.update(loss_ae_disc=loss_ae_disc, loss_disc=loss_disc, loss_disc_real=loss_disc_real)
        return StepOutput(
            objectives=dict(ae=neg_elbo + cfg.advweight * self.pixels * loss_ae_disc,
                            critic=loss_disc + loss_disc_real),
            logged=logged, latent=mu)
