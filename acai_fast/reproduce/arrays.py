"""Each model's re-runs of a reproduction trained as arrays of runs, on acai_fast.sweep's machinery.

A reproduction's model with R re-runs is a sweep of R seeds at the preset's hyper-parameters: one
sweep.Job per model (its run folders runs/.../MODEL/seedS), sweep.plan_arrays (what the folders
still need: a run already trained is not retrained, a stopped one continues from its checkpoint),
sweep.train_arrays (one acai_fast.trainer.RunArray of up to sweep.default_array_size runs at a time;
run k of an array is the single run with its seed). The tables then read the run folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import ACAIConfig
from ..sweep import Job, Run, default_array_size, plan_arrays, read_records, read_status
from ..trainer import resolve_backend

RESUME_HINT = "run the same command again to continue (runs are continued, not retrained)"


def resolve_models(models, order: Sequence[str]) -> list[str]:
    """"all" (every model, in `order`), a comma-separated string or a list of names -> the list of
    names, validated against acai_fast.models.MODELS (ValueError naming the unknown or repeated)."""
    from ..models import MODELS

    if isinstance(models, str):
        names = list(order) if models == "all" else [m.strip() for m in models.split(",") if m.strip()]
    else:
        names = list(models)
    unknown = [m for m in names if m not in MODELS]
    if not names or unknown:
        raise ValueError(f"unknown model(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"valid: all or a comma-separated list of {', '.join(order)}")
    if len(set(names)) != len(names):
        raise ValueError(f"models listed twice: {names}")
    return names


def resolve_device(device) -> torch.device:
    """`device`, or cuda when a GPU is available, else cpu (ValueError for cuda without a GPU)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return dev


def reruns(config: ACAIConfig, seed: int, runs: int) -> list[Run]:
    """Re-runs r = 0 .. runs-1 of a model: seed `seed + r`, the config's hyper-parameters."""
    return [Run(seed + r, config.advweight, config.reg, config.lr) for r in range(runs)]


def describe_seeds(runs: Sequence[Run]) -> str:
    seeds = sorted(r.seed for r in runs)
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def model_job(config: ACAIConfig, model: str, source, out: Path, folder_of: Callable[[Run], Path], *,
              run_img: int, eval_every: int, backend: str, device: torch.device, what: str, label: str,
              cuda_graph: bool | None = None) -> Job:
    """The sweep.Job of one model's re-runs: progress and messages name the model and the seeds."""
    return Job(config, model, source, run_img, eval_every, backend, device, out, folder_of,
               cuda_graph=cuda_graph, label=label, describe_runs=describe_seeds,
               name_of=lambda r: f"{model} seed {r.seed}", what=what, resume_hint=RESUME_HINT)


def plan(job: Job, runs: list[Run], array: int | None) -> list[tuple[int, list[Run]]]:
    """sweep.plan_arrays with arrays of `array` runs (default: sweep.default_array_size)."""
    size = array if array is not None else default_array_size(
        job.config, job.device, job.model, resolve_backend(job.backend, job.device))
    return plan_arrays(job, runs, size)


def outcome(folder: Path) -> tuple[list[dict], str | None]:
    """A run folder's evaluation records, and the reason it stopped when a non-finite loss stopped
    it (None when it trained to the end)."""
    status = read_status(folder)
    stopped = status.get("message", "stopped by a non-finite loss") if status.get("state") == "nonfinite" else None
    return read_records(folder / "metrics.jsonl"), stopped


def check_array(array) -> None:
    if array is not None and (not isinstance(array, int) or isinstance(array, bool) or array < 1):
        raise ValueError(f"array must be a positive integer, got {array!r}")


class WeightedBar:
    """A progress report (acai_fast.progress) advanced by `weight` x each update (sweep.train_arrays
    counts images): models of unequal step cost share one bar whose time-left estimate holds across
    them."""

    def __init__(self, bar, weight: int):
        self.bar, self.weight = bar, weight

    def update(self, n: int = 1) -> None:
        self.bar.update(n * self.weight)

    def __getattr__(self, name):
        return getattr(self.bar, name)
