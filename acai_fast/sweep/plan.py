"""Planning a sweep's runs: the cross product of the swept hyper-parameters and the seeds (Run,
plan_runs), how they are described, and how many runs fit one array (run_memory_bytes,
default_array_size) and their checkpoints on disk (checkpoint_room)."""
from __future__ import annotations

import dataclasses
import itertools
import numbers
from typing import Sequence

import torch

from ..config import ACAIConfig

SWEPT = ("advweight", "reg", "lr")  # hyper-parameters a sweep may vary within one array
CPU_ARRAY = 4  # default array size on the CPU (the reference backend loops over runs: no speed-up)
MAX_ARRAY = 64  # largest default array on a GPU (the benchmark goes up to 64)
MEMORY_FRACTION = 0.8  # share of the GPU's free memory a default array may plan to use


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its seed and the hyper-parameters that may differ within an array."""
    seed: int
    advweight: float
    reg: float
    lr: float

    @property
    def name(self) -> str:
        """Its folder: `advweight=0.5_reg=0.2_lr=0.0001_seed=3` (repr: the shortest exact float)."""
        return f"advweight={self.advweight!r}_reg={self.reg!r}_lr={self.lr!r}_seed={self.seed}"

    @property
    def setting(self) -> tuple[float, float, float]:
        return (self.advweight, self.reg, self.lr)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_runs(config: ACAIConfig, seeds, advweight=None, reg=None, lr=None) -> list[Run]:
    """The cross product of the hyper-parameter lists (None: the config's value) and the seeds, as
    runs ordered by lr, advweight, reg, seed (runs of one lr share an array's single Adam).
    ValueError for an empty list, a repeated value, a seed outside [0, 2^63) or a value that
    ACAIConfig refuses (negative, non-finite; lr 0)."""
    seeds = _distinct("seeds", seeds)
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2 ** 63:
            raise ValueError(f"seeds must be integers in [0, 2^63), got {s!r}")
    values = {}
    for key, given in zip(SWEPT, (advweight, reg, lr)):
        values[key] = [getattr(config, key)] if given is None else _distinct(key, given)
        for v in values[key]:
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise ValueError(f"{key} values must be numbers, got {v!r}")
            dataclasses.replace(config, **{key: float(v)})  # ACAIConfig.validate says what is wrong
        values[key] = [float(v) for v in values[key]]
    return [Run(seed, aw, r, rate) for rate, aw, r, seed in
            itertools.product(values["lr"], values["advweight"], values["reg"], seeds)]


def _distinct(name: str, values) -> list:
    values = [values] if isinstance(values, (int, float)) else list(values)
    if not values:
        raise ValueError(f"{name}: an empty list")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: a value is listed twice in {values}")
    return values


def describe(runs: Sequence[Run]) -> str:
    """The settings of some runs in a few words: `advweight=0,0.5 reg=0.2 lr=0.0001 seed=0-3`."""
    parts = [f"{k}=" + ",".join(f"{v:g}" for v in sorted({getattr(r, k) for r in runs})) for k in SWEPT]
    return " ".join(parts + ["seed=" + seed_ranges(sorted({r.seed for r in runs}))])


def seed_ranges(values: list[int]) -> str:
    spans, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            spans.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(spans)


# ------------------------------------------------------------------------------------------------
# How many runs fit one array, and their checkpoints on disk
# ------------------------------------------------------------------------------------------------


def _conv_outputs(config: ACAIConfig, width: int) -> int:
    """Elements per image of every conv output of an Encoder of `width` (SPEC.md section 1); the
    Decoder's are about as many (the same levels, mirrored)."""
    s, w = config.image_size, config.latent_width
    total = width * s * s  # the 1x1 conv
    for i in range(config.scales):
        total += 2 * (width << i) * (s >> i) ** 2
    return total + (width << config.scales) * w * w + config.latent * w * w


def run_memory_bytes(config: ACAIConfig, model: str = "acai", activation_bytes: int = 4) -> int:
    """A simple upper estimate of one run's device memory in an array, in bytes:

        16 * parameters                   fp32 weights, gradients and Adam's two moments
      + batch * activation_bytes * 3 * (3 * E(depth) + 2 * E(critic depth))

    E(width) = elements per image of an encoder's conv outputs (_conv_outputs). An ACAI step runs
    the encoder once, the decoder twice (reconstruction, mix) and the critic twice (mix, real
    blend); each conv keeps its input and output for the backward pass and the backward pass
    needs a gradient buffer as large (the 3). Lines at batch 64 in fp32: ~330 MB per run. The
    other models run fewer passes, so the estimate holds for them too. Unmeasured on a GPU."""
    passes = 3 * _conv_outputs(config, config.depth) + 2 * _conv_outputs(config, config.critic_depth)
    return 16 * parameter_count(config, model) + config.batch * activation_bytes * 3 * passes


def parameter_count(config: ACAIConfig, model: str = "acai") -> int:
    """Parameters of one run: the model's networks and the linear probe."""
    from ..models import build_model
    from ..networks import LinearProbe

    with torch.random.fork_rng(devices=[]):
        params = sum(p.numel() for p in build_model(model, config).parameters())
        return params + sum(p.numel() for p in LinearProbe(config.latent_dims, config.nclass).parameters())


def default_array_size(config: ACAIConfig, device, model: str = "acai", backend: str = "reference") -> int:
    """Runs per array when none is asked for: on a GPU as many as MEMORY_FRACTION of its free
    memory holds by run_memory_bytes (bf16 activations on the fused backend), at most MAX_ARRAY;
    on the CPU, CPU_ARRAY."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_ARRAY
    free, _ = torch.cuda.mem_get_info(device)
    per_run = run_memory_bytes(config, model, activation_bytes=2 if backend == "fused" else 4)
    return max(1, min(MAX_ARRAY, int(MEMORY_FRACTION * free // per_run)))


def checkpoint_room(config: ACAIConfig, model: str, runs: int) -> int:
    """Bytes of disk `runs` runs' checkpoints take (fp32 weights + Adam's two moments each), plus
    one being written."""
    return (runs + 1) * (12 * parameter_count(config, model) + 2 ** 20)
