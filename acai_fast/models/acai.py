"""ACAI (Berthelot et al., ICLR 2019): an autoencoder trained with a critic that predicts the mixing
coefficient of decoded latent interpolations, the SPEC.md section 2 step in plain autograd.

This file is the oracle: `acai_fast.engine.fused_step` runs the same step as an explicit schedule
on the fused ops, and tests hold the two equal from one seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..networks import Critic, autoencoder
from ..ops.acai_loss import LOSS_NAMES  # noqa: F401 (the names of the logged losses)
from ..ops.philox import draw_alpha
from .base import Model, Randomness, StepOutput



class ACAI(Model):
    """Encoder, decoder and critic (SPEC.md section 1) and the ACAI objectives."""

    name = "acai"

    def __init__(self, config):
        super().__init__(config)
        self.encoder, self.decoder = autoencoder(config)
        self.critic = Critic(config.colors, config.critic_depth, config.scales, config.latent)

    def param_groups(self):
        return dict(ae=[*self.encoder.parameters(), *self.decoder.parameters()],
                    critic=list(self.critic.parameters()))

    def objectives(self, x: torch.Tensor, rand: Randomness) -> StepOutput:
        """SPEC.md section 2, line by line."""
        cfg = self.config
        z = self.encoder(x)
        ae = self.decoder(z)
        alpha = draw_alpha(rand.alpha_state, x.shape[0]).view(-1, 1, 1, 1)  # 0.5 - |u - 0.5|
        z_mix = alpha * z + (1 - alpha) * z.flip(0)  # item i mixed with item N-1-i
        x_mix = self.decoder(z_mix)
        critic_mix = self.critic(x_mix)  # (N,)
        critic_real = self.critic(ae + cfg.reg * (x - ae))

        loss_ae = F.mse_loss(ae, x)
        loss_ae_disc = critic_mix.square().mean()
        loss_disc = (critic_mix - alpha.flatten()).square().mean()
        loss_disc_real = critic_real.square().mean()
        return StepOutput(
            objectives=dict(ae=loss_ae + cfg.advweight * loss_ae_disc, critic=loss_disc + loss_disc_real),
            logged=dict(loss_ae=loss_ae, loss_ae_disc=loss_ae_disc, loss_disc=loss_disc,
                        loss_disc_real=loss_disc_real),
            latent=z)
