"""What every model of acai_fast is: its networks and its objectives, in plain PyTorch autograd.

A model is the oracle of its own training step. `objectives(x, rand)` runs the forward pass and
returns one scalar objective per parameter group (each minimised by its own Adam over that group's
parameters only, all from the same forward pass), the values to log, and the latent the linear
probe reads. The trainer owns the optimisers, the probe, the random streams and the step loop;
`acai_fast.engine` runs some models' steps faster with the same semantics.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..config import ACAIConfig
from ..networks import ConvChain


class Randomness(NamedTuple):
    """The random streams a step may draw from, both on the trainer's device.

    alpha_state: the int64 Philox state [seed, offset, counter] of `acai_fast.ops.mix` (the mixing
    coefficients; both backends draw the same values from it); generator: a torch.Generator for any
    other noise (denoising noise, dropout masks, VAE samples)."""
    alpha_state: torch.Tensor
    generator: torch.Generator


class StepOutput(NamedTuple):
    """objectives: parameter-group name -> 0-d objective; logged: name -> 0-d value (detached or
    not: the trainer detaches); latent: the (N, latent, w, w) code the linear probe reads."""
    objectives: dict[str, torch.Tensor]
    logged: dict[str, torch.Tensor]
    latent: torch.Tensor


class Model(nn.Module):
    """Base of every model: subclasses set `name`, build their networks in __init__ and define
    `param_groups` and `objectives`; `encode`/`decode` are what evaluations and pictures use."""

    name = ""

    def __init__(self, config: ACAIConfig):
        super().__init__()
        self.config = config

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Objective name -> the parameters it trains (disjoint; one Adam each)."""
        raise NotImplementedError

    def objectives(self, x: torch.Tensor, rand: Randomness) -> StepOutput:
        """The forward pass of one training step on x (N, colors, 32, 32) in [-1, 1]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, rand: Randomness) -> StepOutput:
        """`objectives`: so that torch.func.functional_call can run a model on other parameters
        (one run of an array, acai_fast.trainer.RunArray)."""
        return self.objectives(x, rand)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent used for interpolation and the probe (deterministic: a VAE's mean)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from latents, unclipped, in the data's [-1, 1] units."""
        return self.decoder(z)

    @torch.no_grad()
    def after_update(self) -> None:
        """Non-gradient state updates after the optimisers stepped (a VQ-VAE's EMA codebook)."""

    def conv_chains(self) -> list[ConvChain]:
        """The conv networks whose blocks can run on the fused Triton kernels."""
        return [m for m in self.modules() if isinstance(m, ConvChain)]
