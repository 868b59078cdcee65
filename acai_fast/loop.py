"""fit(): batches -> trainer steps -> evaluations -> metrics.jsonl, checkpoint.pt, interpolations.png.

    from acai_fast import ACAITrainer, fit
    history = fit(ACAITrainer(config), "lines", kimg=256, eval_kimg=64, out_dir="runs/lines")

(`trainer.fit(...)` is the same call.)
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch


def fit(trainer, data="lines", kimg: float = 16384, *, eval_kimg: float | None = 64,
        out_dir: str | os.PathLike | None = None, evaluate: Callable | None = None,
        progress: bool = True, seed: int | None = None,
        preview: tuple[torch.Tensor, torch.Tensor] | None = None, monitor=None) -> list[dict]:
    """Train `trainer` until `kimg` thousand (x1024) images have been seen in total (a resumed
    trainer continues from its own count), evaluating every `eval_kimg` and at the end.

    data: "lines" (the built-in generator), an iterable of x or (x, labels) batches, or a tuple
        (images, labels) of tensors, reshuffled every epoch.
    evaluate: trainer -> dict of metrics; default: the lines evaluation for "lines", none else.
    out_dir: if given, each evaluation appends a line to out_dir/metrics.jsonl and writes
        out_dir/checkpoint.pt (atomically) and out_dir/interpolations.png.
    preview: (x_a, x_b) image pairs drawn as rows of interpolations.png (default for "lines":
        16 test pairs).
    monitor: optional object with begin_interval() and end_interval() -> dict (e.g.
        acai_fast.profiling.GpuSampler, `acai-fast train --profile`): each record gets the dict of
        the interval's training steps (mean GPU utilisation, power, ...) added.
    Returns the list of evaluation records."""
    from .data import lines as lines_data

    total = int(round(kimg * 1024))
    if total <= 0:
        raise ValueError(f"kimg must be > 0, got {kimg}")
    eval_every = int(round(eval_kimg * 1024)) if eval_kimg else None
    if eval_every is not None and eval_every <= 0:
        raise ValueError(f"eval_kimg must be > 0 or None, got {eval_kimg}")
    seed = trainer.seed if seed is None else seed
    config = trainer.config
    if isinstance(data, str):
        if data != "lines":
            raise ValueError(f"data: the only built-in dataset is 'lines', got {data!r}")
        if config.colors != 1 or config.image_size != lines_data.SIZE:
            raise ValueError("the lines data needs colors=1 and 32x32 images (the 'lines' preset)")
        batches = lines_data.lines_batches(config.batch, seed=seed, device=trainer.device,
                                           start_step=trainer.steps)
        if evaluate is None:
            evaluate = _lines_evaluation
        if preview is None:
            from .eval.lines import eval_pairs
            a, b = eval_pairs(16)
            preview = (lines_data.draw_lines(a), lines_data.draw_lines(b))
    elif isinstance(data, tuple):
        batches = tensor_batches(*data, batch=config.batch, seed=seed + trainer.steps)
    elif isinstance(data, Iterable):
        batches = iter(data)
    else:
        raise ValueError(f"data must be 'lines', an iterable of batches or (images, labels), got {type(data).__name__}")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    history: list[dict] = []
    sums: dict[str, torch.Tensor] = {}
    interval_steps, interval_images, interval_time = 0, 0, 0.0
    next_eval = (trainer.nimg // eval_every + 1) * eval_every if eval_every else None
    on_gpu = trainer.device.type == "cuda"
    bar = _progress(total, trainer.nimg, enabled=progress)
    if monitor is not None:
        monitor.begin_interval()
    try:
        while trainer.nimg < total:
            batch = next(batches, None)
            if batch is None:
                raise ValueError(f"data ran out after {trainer.nimg} images, before kimg={kimg}")
            x, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
            t0 = time.perf_counter()
            losses = trainer.step(x, labels)
            for k, v in losses.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            interval_steps += 1
            interval_images += x.shape[0]
            if on_gpu and interval_steps % 256 == 0:
                torch.cuda.synchronize()  # keep the timing honest and the queue short
            interval_time += time.perf_counter() - t0
            bar.update(x.shape[0])
            due = next_eval is not None and trainer.nimg >= next_eval
            if due or trainer.nimg >= total:
                if on_gpu:
                    t0 = time.perf_counter()
                    torch.cuda.synchronize()
                    interval_time += time.perf_counter() - t0
                record = dict(kimg=round(trainer.nimg / 1024, 3), nimg=trainer.nimg, step=trainer.steps,
                              images_per_s=round(interval_images / max(interval_time, 1e-9), 1))
                record.update({k: float(v) / interval_steps for k, v in sums.items()})
                if "loss_ae" in record:
                    record["rmse"] = math.sqrt(max(record["loss_ae"], 0.0)) * 127.5
                if monitor is not None:  # before the evaluation: the interval's training steps only
                    record.update(monitor.end_interval())
                if evaluate is not None:
                    record.update(evaluate(trainer))
                record.update(run_settings(trainer))
                history.append(record)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss_ae", "mean_distance")
                                 if k in record and record[k] is not None})
                if out is not None:
                    write_outputs(trainer, out, record, preview)
                sums, interval_steps, interval_images, interval_time = {}, 0, 0, 0.0
                if monitor is not None:
                    monitor.begin_interval()
                if next_eval is not None:
                    while next_eval <= trainer.nimg:
                        next_eval += eval_every
    finally:
        bar.close()
    return history


def write_outputs(trainer, out: Path, record: dict, preview) -> None:
    """Append `record` to out/metrics.jsonl, write out/checkpoint.pt and out/interpolations.png."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json_line(record) + "\n")
    trainer.save(out / "checkpoint.pt")
    if preview is not None:
        from .plotting import save_interpolation_grid
        save_interpolation_grid(trainer.interpolate(*preview), out / "interpolations.png")


def run_settings(trainer) -> dict:
    """What trained the run, on every metrics line so that each line describes itself: the model
    and the hyper-parameters a user may vary (acai-fast train --model --advweight --reg --advdepth
    --depth --latent --lr --batch)."""
    cfg = trainer.config
    model = getattr(getattr(trainer, "model", None), "name", None)
    return dict(model=model, advweight=cfg.advweight, reg=cfg.reg, advdepth=cfg.advdepth,
                depth=cfg.depth, latent=cfg.latent, lr=cfg.lr, batch=cfg.batch)


def json_line(record: dict) -> str:
    """One strict-JSON line: NaN (an undefined metric, e.g. smoothness) is written as null."""
    return json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()})


def _lines_evaluation(trainer) -> dict:
    from .eval.lines import evaluate_lines
    return evaluate_lines(trainer)


def tensor_batches(images: torch.Tensor, labels: torch.Tensor | None = None, *, batch: int,
                   seed: int = 0):
    """Endless shuffled batches (x, labels) from in-memory tensors; a new permutation every epoch."""
    if images.shape[0] < batch:
        raise ValueError(f"need at least one batch of {batch} images, got {images.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(images.shape[0], generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            yield images[idx], (labels[idx] if labels is not None else None)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="img", unit_scale=True, disable=not enabled,
                dynamic_ncols=True, desc="train")
