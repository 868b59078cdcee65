"""The models acai_fast trains, one file each, on the shared networks (acai_fast.networks).

`build_model(name, config)` makes one; MODELS lists the names. ACAI is the default."""
from __future__ import annotations

from ..config import ACAIConfig
from .acai import ACAI
from .aae import AAE
from .ae import Autoencoder
from .base import Model, Randomness, StepOutput
from .denoising import DenoisingAutoencoder
from .dropout import DropoutAutoencoder
from .vae import VAE
from .vae_acai import VAEACAI
from .vqvae import VQVAE

MODELS: dict[str, type[Model]] = {ACAI.name: ACAI}
# The paper's baselines (SPEC.md section 6) and the ACAI regulariser on a VAE, in the paper's order.
MODELS.update({m.name: m for m in (Autoencoder, DropoutAutoencoder, DenoisingAutoencoder, VAE, AAE,
                                   VQVAE, VAEACAI)})


def build_model(name: str, config: ACAIConfig) -> Model:
    """A freshly initialised model `name` (one of MODELS); seed torch first for reproducible weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name](config)


__all__ = ["AAE", "ACAI", "MODELS", "VAE", "VAEACAI", "VQVAE", "Autoencoder", "DenoisingAutoencoder",
           "DropoutAutoencoder", "Model", "Randomness", "StepOutput", "build_model"]
