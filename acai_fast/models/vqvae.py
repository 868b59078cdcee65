"""VQ-VAE (brain-research/acai vqvae.py with its lib/discretization.py; SPEC.md section 6).

Between the shared encoder and decoder sits the paper's discrete bottleneck: the flattened latent
(D = latent * w * w values) goes through a dense layer to 10 vectors of D ("10 latents"), each
replaced by its nearest code of a 2^14-entry codebook; the straight-through estimator
(q = h + stop_gradient(code - h)) carries the decoder's gradient to h; then relu -> dense 512 ->
relu -> dense D, reshaped to the latent map, is decoded. Minimised (one group "ae"):
    mean((dec(...) - x)^2) + beta * mean((h - stop_gradient(code))^2)        beta = 10 (commitment)
The codebook is not trained by gradients but by exponential moving averages (decay 0.999) of the
code counts and of the sums of the vectors assigned to each code, applied in `after_update` with the
paper's smoothing (epsilon 1e-5); codebook and EMA state are buffers, so checkpoints carry them.

`encode` is the conv encoder's output (interpolations mix it, as in the paper's code) and `decode`
runs the bottleneck and the decoder. The paper's probe reads the bottleneck's output; this one
reads `encode`'s latent, the code `acai_fast.eval.probe` tests it on.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..networks import autoencoder
from .base import Model, Randomness, StepOutput
from .vae import dense

CODEBOOK_BITS = 14  # the paper's --z_log_size: 2^14 codes
COMMITMENT = 10.0  # the paper's --beta
NUM_LATENTS = 10  # the paper's --num_latents
EMA_DECAY = 0.999
EMA_EPSILON = 1e-5
FILTER_SIZE = 512  # hidden width of the dense layers after the bottleneck


def nearest_code(h: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean) for every row of h: (M, D) -> (M,)."""
    dist = h.square().sum(1, keepdim=True) + codebook.square().sum(1)[None] - 2 * h @ codebook.T
    return dist.argmin(1)


def ema_codebook_update(codebook, ema_count, ema_means, counts, sums, decay=EMA_DECAY,
                        epsilon=EMA_EPSILON) -> None:
    """The paper's EMA codebook step, in place (lib/discretization.py):
        ema_count <- decay * ema_count + (1 - decay) * counts        counts: (K,) codes' uses
        ema_means <- decay * ema_means + (1 - decay) * sums          sums: (K, D) assigned vectors
        n = sum(ema_count); smoothed = (ema_count + eps) / (n + K * eps) * n
        codebook <- ema_means / smoothed"""
    ema_count.mul_(decay).add_(counts, alpha=1 - decay)
    ema_means.mul_(decay).add_(sums, alpha=1 - decay)
    n = ema_count.sum()
    smoothed = (ema_count + epsilon) / (n + codebook.shape[0] * epsilon) * n
    codebook.copy_(ema_means / smoothed[:, None])


class VQVAE(Model):
    """Encoder, dense -> vector quantiser (EMA codebook) -> dense 512 -> dense, decoder."""

    name = "vqvae"
    commitment = COMMITMENT
    num_latents = NUM_LATENTS

    def __init__(self, config):
        super().__init__(config)
        dims = config.latent_dims
        self.encoder, self.decoder = autoencoder(config)
        self.to_latents = dense(dims, dims * self.num_latents)
        self.from_codes = nn.Sequential(nn.ReLU(), dense(dims * self.num_latents, FILTER_SIZE),
                                        nn.ReLU(), dense(FILTER_SIZE, dims))
        codes = 2 ** CODEBOOK_BITS
        # tf.uniform_unit_scaling_initializer on the [1, 1, K, D] "means": U(+-sqrt(3 / K)).
        bound = math.sqrt(3.0 / codes)
        codebook = torch.empty(codes, dims).uniform_(-bound, bound)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.zeros(codes))
        self.register_buffer("ema_means", codebook.clone())
        self._pending_ema = None  # (counts, sums) of the last training forward, for after_update

    def param_groups(self):
        return dict(ae=[*self.encoder.parameters(), *self.to_latents.parameters(),
                        *self.from_codes.parameters(), *self.decoder.parameters()])

    def bottleneck(self, z: torch.Tensor):
        """(N, latent, w, w) -> (the decoder's input (N, latent, w, w), the pre-quantisation
        vectors h (N * 10, D), their code indices (N * 10,), the chosen codes (N * 10, D))."""
        dims = self.config.latent_dims
        h = self.to_latents(z.flatten(1)).view(-1, dims)  # (N, 10 D) -> (N * 10, D)
        idx = nearest_code(h.detach(), self.codebook)
        codes = self.codebook[idx]
        q = h + (codes - h).detach()  # straight through: forward = codes, gradient -> h
        out = self.from_codes(q.view(z.shape[0], -1))  # (N, 10 D) -> (N, D)
        return out.view_as(z), h, idx, codes

    def objectives(self, x: torch.Tensor, rand: Randomness) -> StepOutput:
        z = self.encoder(x)
        z_q, h, idx, codes = self.bottleneck(z)
        loss_ae = F.mse_loss(self.decoder(z_q), x)
        loss_commit = F.mse_loss(h, codes.detach())
        with torch.no_grad():  # the EMA statistics of this forward, applied after the update
            # index_add_, not bincount: no host sync, so the step stays CUDA-graph capturable
            counts = torch.zeros_like(self.ema_count).index_add_(0, idx, torch.ones_like(idx, dtype=h.dtype))
            sums = torch.zeros_like(self.codebook).index_add_(0, idx, h.detach())
            self._pending_ema = (counts, sums)
        return StepOutput(
            objectives=dict(ae=loss_ae + self.commitment * loss_commit),
            logged=dict(loss_ae=loss_ae, loss_commit=loss_commit,
                        codes_used=(counts > 0).sum().to(h.dtype)),
            latent=z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(z)[0])

    @torch.no_grad()
    def after_update(self) -> None:
        """Move the codebook toward the vectors assigned to it in the last training forward."""
        if self._pending_ema is None:
            return
        counts, sums = self._pending_ema
        self._pending_ema = None
        ema_codebook_update(self.codebook, self.ema_count, self.ema_means, counts, sums)
