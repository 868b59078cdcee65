"""ACAIConfig: the hyper-parameters of SPEC.md sections 2-3, with the paper's presets."""
from __future__ import annotations

import dataclasses
import math

# name -> (colors, latent_width, depth, latent); SPEC.md section 3.
_PRESETS = {
    "lines": (1, 2, 16, 16),
    "mnist32": (1, 4, 16, 2),
    "mnist256": (1, 4, 16, 16),
    "svhn32": (3, 4, 64, 2),
    "svhn256": (3, 4, 64, 16),
    "celeba32": (3, 4, 64, 2),
    "celeba256": (3, 4, 64, 16),
    "cifar256": (3, 4, 64, 16),
    "cifar1024": (3, 4, 64, 64),
}
# The probe's number of classes per preset family (CelebA has no labels in the paper's code: 1 class).
_NCLASS = {"lines": 10, "mnist": 10, "svhn": 10, "celeba": 1, "cifar": 10}

PRESETS = tuple(_PRESETS)
IMAGE_SIZE = 32  # every dataset of the paper is 32x32


@dataclasses.dataclass
class ACAIConfig:
    """Hyper-parameters of one ACAI model (defaults: the paper's code, lines preset).

    colors: image channels; latent_width: spatial size of the latent map (a power of 2 dividing 32);
    depth: width of the first encoder/decoder level (doubles per scale); latent: latent channels;
    advdepth: critic width (0 means = depth); advweight: lambda; reg: gamma; lr: Adam learning rate;
    batch: images per step; nclass: classes of the linear probe; dataset: the data family the
    preset was made for (lines, mnist, svhn, celeba, cifar).
    """

    colors: int = 1
    latent_width: int = 2
    depth: int = 16
    latent: int = 16
    advdepth: int = 0
    advweight: float = 0.5
    reg: float = 0.2
    lr: float = 1e-4
    batch: int = 64
    nclass: int = 10
    image_size: int = IMAGE_SIZE
    dataset: str = "lines"

    def __post_init__(self):
        self.validate()

    @classmethod
    def preset(cls, name: str, **overrides) -> "ACAIConfig":
        """The paper's configuration `name` (one of PRESETS), with optional field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        colors, latent_width, depth, latent = _PRESETS[name]
        family = name.rstrip("0123456789")
        base = dict(colors=colors, latent_width=latent_width, depth=depth, latent=latent,
                    nclass=_NCLASS[family], dataset=family)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ACAIConfig fields {sorted(unknown)}; valid fields: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        base.update(overrides)
        return cls(**base)

    @property
    def scales(self) -> int:
        """Number of 2x down-samplings: log2(image_size / latent_width)."""
        return int(round(math.log2(self.image_size // self.latent_width)))

    @property
    def critic_depth(self) -> int:
        return self.advdepth or self.depth

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the latent map."""
        return (self.latent, self.latent_width, self.latent_width)

    @property
    def latent_dims(self) -> int:
        return self.latent * self.latent_width ** 2

    def validate(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ACAIConfig.{name} must be a positive integer, got {v!r}")

        for name in ("colors", "latent_width", "depth", "latent", "batch", "nclass", "image_size"):
            positive_int(name)
        if self.batch < 2:
            raise ValueError(f"ACAIConfig.batch must be >= 2 (mixing pairs image i with image N-1-i), "
                             f"got {self.batch}")
        if not isinstance(self.advdepth, int) or isinstance(self.advdepth, bool) or self.advdepth < 0:
            raise ValueError(f"ACAIConfig.advdepth must be an integer >= 0 (0 = depth), got {self.advdepth!r}")
        size = self.image_size
        if size & (size - 1):
            raise ValueError(f"ACAIConfig.image_size must be a power of 2, got {size}")
        valid_widths = [1 << i for i in range(size.bit_length()) if (1 << i) < size]
        if self.latent_width not in valid_widths:
            raise ValueError(f"ACAIConfig.latent_width must be a power of 2 below image_size={size} "
                             f"(valid: {valid_widths}), got {self.latent_width}")
        for name in ("advweight", "reg", "lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"ACAIConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.dataset not in _NCLASS:
            raise ValueError(f"ACAIConfig.dataset must be one of {sorted(_NCLASS)}, got {self.dataset!r}")
        if self.lr == 0:
            raise ValueError("ACAIConfig.lr must be > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ACAIConfig":
        return cls(**d)
