"""What a trainer is asked for, resolved and checked before anything is built: the backend, the
activation dtype and CUDA graphs on a device (`resolve_setup`), and the runs of an array
(`run_settings`). acai_fast.trainer re-exports every name here.
"""
from __future__ import annotations

import dataclasses
import numbers

import torch

from . import _ext
from .config import ACAIConfig

BACKENDS = ("auto", "reference", "fused")
# "auto" picks "fused" on a GPU only once the fused step has been checked there against the
# reference (tests -m gpu), timed (bench/throughput.py) and shown to train as well
# (scripts/gpu_check.sh quality); until then the reference is the default everywhere and "fused"
# must be asked for by name.
AUTO_PICKS_FUSED = False
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
RUN_FIELDS = ("seed", "advweight", "reg", "lr")  # what may differ between the runs of one array


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that `backend` means on `device` ("auto" -> the fastest one verified there)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "auto":
        fused_ok = AUTO_PICKS_FUSED and device.type == "cuda" and _ext.HAS_TRITON
        return "fused" if fused_ok else "reference"
    if backend == "fused":
        if not _ext.HAS_TRITON:
            raise ValueError("backend 'fused' needs triton (pip install 'acai_fast[triton]'); "
                             "use backend='reference'")
        if device.type != "cuda" and not _ext.INTERPRET:
            raise ValueError(f"backend 'fused' runs on a CUDA GPU, not on {device.type} (on the CPU "
                             f"only under TRITON_INTERPRET=1, slowly, for tests); use backend='reference'")
    return backend


def resolve_dtype(dtype, backend: str, device: torch.device) -> torch.dtype:
    """The activation dtype of the step: fp32 for "reference"; bf16 for "fused" on a GPU (fp32
    under the CPU interpreter, which has no bf16 arithmetic) unless fp32 is asked for."""
    if dtype is None:
        return torch.bfloat16 if backend == "fused" and device.type == "cuda" else torch.float32
    resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or torch.float32 / torch.bfloat16), "
                         f"got {dtype!r}")
    if resolved == torch.bfloat16 and backend != "fused":
        raise ValueError("dtype bf16 needs backend='fused'; the reference backend computes in fp32")
    if resolved == torch.bfloat16 and device.type != "cuda":
        raise ValueError("dtype bf16 runs on a GPU only (the CPU interpreter has no bf16 arithmetic)")
    return resolved


def resolve_cuda_graph(cuda_graph, backend: str, device: torch.device) -> bool:
    """None -> on for the fused backend on a GPU, off elsewhere; True needs fused on a GPU."""
    if cuda_graph is None:
        return backend == "fused" and device.type == "cuda"
    if cuda_graph and (backend != "fused" or device.type != "cuda"):
        raise ValueError(f"cuda_graph=True needs backend='fused' on a CUDA device, got backend "
                         f"{backend!r} on {device}")
    return bool(cuda_graph)


def resolve_setup(device, backend: str, dtype, cuda_graph):
    """(device, backend, dtype, cuda_graph) of a trainer from what was asked (None: the defaults)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    backend = resolve_backend(backend, device)
    return device, backend, resolve_dtype(dtype, backend, device), resolve_cuda_graph(cuda_graph, backend, device)


def run_settings(runs, config: ACAIConfig, seed: int = 0) -> list[dict]:
    """The runs of an array as a list of {seed, advweight, reg, lr} dicts.

    runs: K (seeds seed, seed+1, ..., the config's hyper-parameters) or a list of dicts with any
    of RUN_FIELDS (missing seeds: seed + index; missing hyper-parameters: the config's)."""
    if isinstance(runs, bool) or not isinstance(runs, (int, list, tuple)):
        raise ValueError(f"runs must be a positive int or a list of dicts, got {runs!r}")
    if isinstance(runs, int):
        if runs < 1:
            raise ValueError(f"runs must be >= 1, got {runs}")
        runs = [{} for _ in range(runs)]
    if not runs:
        raise ValueError("runs is an empty list")
    settings = []
    for k, r in enumerate(runs):
        if not isinstance(r, dict) or set(r) - set(RUN_FIELDS):
            raise ValueError(f"run {k}: a dict with keys among {RUN_FIELDS}, got {r!r}")
        s = {**dict(seed=seed + k, advweight=config.advweight, reg=config.reg, lr=config.lr), **r}
        if not isinstance(s["seed"], int) or isinstance(s["seed"], bool) or not 0 <= s["seed"] < 2 ** 63:
            raise ValueError(f"{'run %d: ' % k if len(runs) > 1 else ''}seed must be an int in [0, 2^63), "
                             f"got {s['seed']!r}")
        for key in ("advweight", "reg", "lr"):
            if not isinstance(s[key], numbers.Real) or isinstance(s[key], bool):
                raise ValueError(f"run {k}: {key} must be a number, got {s[key]!r}")
            s[key] = float(s[key])
        dataclasses.replace(config, **{k: s[k] for k in ("advweight", "reg", "lr")})  # validates
        settings.append(s)
    return settings
