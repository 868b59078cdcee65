"""The models acai_fast trains, one file each, on the shared networks (acai_fast.networks).

`build_model(name, config)` makes one; MODELS lists the names. ACAI is the default."""
from __future__ import annotations

from ..config import ACAIConfig
from .acai import ACAI
from .base import Model, Randomness, StepOutput

MODELS: dict[str, type[Model]] = {ACAI.name: ACAI}


def build_model(name: str, config: ACAIConfig) -> Model:
    """A freshly initialised model `name` (one of MODELS); seed torch first for reproducible weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name](config)


__all__ = ["ACAI", "MODELS", "Model", "Randomness", "StepOutput", "build_model"]
