"""sweep(): a sweep's arguments, folder and data checked before anything trains, its runs planned
(plan) and shared between torchrun's ranks (shards), trained as arrays (training), summarized
(summary). The package docstring says what `out` holds."""
from __future__ import annotations

import importlib
import math
import numbers
import os
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import check_output_folder
from ..config import ACAIConfig
from ..run_control import StopSignals
from ..trainer import resolve_backend
from .folders import check_folder, is_done, read_status, write_json
from .plan import SWEPT, checkpoint_room, default_array_size, plan_runs
from .shards import rank_share, wait_for_other_ranks
from .summary import WINDOW, summarize
from .training import Job, RunData, images_left, plan_arrays, train_arrays


class SweepArgumentError(ValueError):
    """A sweep's arguments, output folder or data are not right; raised before anything trains."""


def sweep(preset: str, seeds, *, advweight=None, reg=None, lr=None, model: str = "acai", kimg: float,
          eval_kimg: float | None = 64, out: str | os.PathLike, array: int | None = None,
          backend: str = "auto", device=None, resume: bool = False, progress: bool = True,
          tensorboard: bool = False, data=None, overrides: dict | None = None, pairs: int = 256,
          window: int = WINDOW, evaluate: Callable | None = None, distributed=None,
          handle_signals: bool = True) -> dict:
    """Train the cross product of seeds x advweight x reg x lr (lists; None: the preset's value) of
    `model` on `preset` for `kimg` thousand (x1024) images each, evaluating every `eval_kimg`, as
    arrays of `array` runs (default: default_array_size); write one folder per run and the summary
    into `out` (acai_fast.sweep's docstring). Returns summarize(out)'s dict (under torchrun: rank 0;
    the other ranks get {"runs": their runs' states}).

    data: image presets: the dataset's folder (default $ACAI_FAST_DATA) or a tuple (train images
        (uint8 pixels or floats in [-1, 1]), train labels or None, test images in [-1, 1], test
        labels or None); lines: None (generated).
    overrides: ACAIConfig fields other than the swept ones (batch, depth, latent, advdepth, ...).
    pairs: test pairs per lines evaluation (the paper: 256); window: evaluations per run median.
    evaluate: trainer -> dict, instead of the preset's evaluation (lines metrics; probe accuracy).
    resume: continue the sweep in `out` (without it, a folder holding runs is an error).
    distributed: acai_fast.distributed.init_from_env()'s rank (torchrun), or None.
    handle_signals: SIGINT/SIGTERM finish the step, checkpoint every running run and raise
        acai_fast.run_control.TrainingStopped (continue with resume=True).
    SweepArgumentError (a ValueError, one line) for bad arguments, a folder that already holds runs
    (without resume) or another sweep, missing data: before anything trains."""
    from ..progress import progress as progress_report

    try:  # everything that can be wrong with the arguments, the folder or the data: before any step
        overrides = dict(overrides or {})
        if set(overrides) & set(SWEPT):
            raise ValueError(f"overrides: pass {', '.join(SWEPT)} as the sweep's lists, not as overrides")
        config = ACAIConfig.preset(preset, **overrides)
        runs = plan_runs(config, seeds, advweight, reg, lr)
        from ..models import MODELS
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; valid models: {', '.join(MODELS)}")
        for name, value in (("kimg", kimg), ("eval_kimg", 1.0 if eval_kimg is None else eval_kimg)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        for name, value in (("pairs", pairs), ("window", window)) + ((("array", array),) if array is not None else ()):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        total = int(round(kimg * 1024))
        eval_every = int(round(eval_kimg * 1024)) if eval_kimg is not None else None
        if eval_every is not None and eval_every < config.batch:
            raise ValueError(f"eval_kimg={eval_kimg:g} is less than one batch ({config.batch} images)")
        rank, world = (0, 1) if distributed is None else (distributed.rank, distributed.world_size)
        dev = torch.device(distributed.device if distributed is not None else
                           device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
        if resolve_backend(backend, dev) == "fused" and model != "acai":
            raise ValueError(f"arrays of runs on the fused backend train the acai model only; model {model!r} "
                             f"sweeps on backend='reference'")
        out = Path(out)
        check_folder(out, runs, config, model, resume)
        if tensorboard:
            try:
                importlib.import_module("torch.utils.tensorboard")
            except ImportError:
                raise ValueError("tensorboard=True needs the tensorboard package: pip install "
                                 "'acai_fast[tensorboard]'") from None
        source = RunData(config, data, dev, pairs, evaluate)
        size = array if array is not None else default_array_size(config, dev, model, resolve_backend(backend, dev))
        run_img = -(-total // config.batch) * config.batch  # whole batches: what each run trains
        job = Job(config, model, source, run_img, eval_every, backend, dev, out,
                  folder_of=lambda r: out / r.name, tensorboard=tensorboard)
        mine = rank_share(runs, rank, world)
        todo = [r for r in mine if not is_done(out / r.name, run_img)]
        check_output_folder(out, checkpoint_room(config, model, len(todo)))
        groups = plan_arrays(job, mine, size)
    except (ValueError, FileNotFoundError) as exc:
        raise SweepArgumentError(str(exc)) from None
    if distributed is not None:
        distributed.barrier()  # every rank has checked the folder before any writes
    if rank == 0:
        meta = dict(preset=preset, model=model, config=config.to_dict(), seeds=sorted({r.seed for r in runs}),
                    **{k: sorted({getattr(r, k) for r in runs}) for k in SWEPT}, kimg=kimg, eval_kimg=eval_kimg,
                    total_img=run_img, pairs=pairs, window=window, runs=[r.as_dict() for r in runs])
        write_json(out / "sweep.json", meta)

    bar = progress_report(images_left(job, groups), enabled=progress and rank == 0, unit="img", unit_scale=True,
                          counts=False)
    stop = StopSignals(handle_signals, announce=rank == 0)
    stop.install()
    try:
        train_arrays(job, groups, bar, stop)
        if rank == 0 and world > 1:
            wait_for_other_ranks(out, runs, run_img, stop, bar)
    finally:
        stop.restore()
        bar.close()
    if rank != 0:
        return dict(runs={r.name: read_status(out / r.name) for r in mine})
    return summarize(out, window)
