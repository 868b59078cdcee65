"""acai_fast: ACAI autoencoders (Berthelot et al., ICLR 2019) trained fast."""
from .config import ACAIConfig, PRESETS
from .trainer import ACAITrainer

__version__ = "0.1.0"
__all__ = ["ACAIConfig", "ACAITrainer", "PRESETS"]
from ._ext import cuda_extension_available  # noqa: E402

__all__ += ["cuda_extension_available"]
