"""fit(): batches -> trainer steps -> evaluations -> metrics.jsonl, checkpoint.pt, interpolations.png.

    from acai_fast import ACAITrainer, fit
    history = fit(ACAITrainer(config), "lines", kimg=256, eval_kimg=64, out_dir="runs/lines")

(`trainer.fit(...)` is the same call.)
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .distributed import rank_seed
# What fit() shares with a sweep's arrays of runs (importable from here too, as before they moved):
from .run_control import (CONTROL_EVERY_GPU, StopSignals, TrainingStopped, check_outputs, json_line, run_settings,
                          write_outputs)

_StopSignals = StopSignals  # its name before a sweep shared it
__all__ = ["fit", "tensor_batches", "NAN_POLICIES", "CONTROL_EVERY_GPU", "StopSignals", "TrainingStopped",
           "check_outputs", "json_line", "run_settings", "write_outputs"]

log = logging.getLogger("acai_fast")

NAN_POLICIES = ("stop", "skip")


def fit(trainer, data="lines", kimg: float = 16384, *, eval_kimg: float | None = 64,
        out_dir: str | os.PathLike | None = None, evaluate: Callable | None = None,
        progress: bool = True, seed: int | None = None,
        preview: tuple[torch.Tensor, torch.Tensor] | None = None, monitor=None, tensorboard=None,
        checkpoint_minutes: float | None = None, nan_policy: str = "stop",
        handle_signals: bool = True) -> list[dict]:
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
    tensorboard: optional object with write(record, images) (e.g.
        acai_fast.tensorboard_log.TensorBoardLog, `acai-fast train --tensorboard`): rank 0 hands it
        each evaluation record and the preview's interpolations (None without a preview).
    checkpoint_minutes: also write out_dir/checkpoint.pt every this many minutes (besides every
        evaluation); checkpoints are atomic, the previous one stays whole until the new one is.
    nan_policy: "stop": a non-finite loss stops training with TrainingStopped naming the step and
        the loss, writing nothing more (the last good checkpoint stays); "skip": such a step applies
        no update (trainer.skip_nonfinite) and is reported, training goes on.
    handle_signals: SIGINT and SIGTERM finish the current step, write a checkpoint (with out_dir)
        and raise TrainingStopped; a second Ctrl-C raises KeyboardInterrupt at once.
    torchrun (trainer.distributed): config.batch is the global batch; each rank draws its own shard
        ("lines": rank_seed(seed, rank); (images, labels): its part of each global batch); every
        rank calls fit; rank 0 alone evaluates and writes; logged losses are averaged over ranks.
    The output folder is checked (created, writable, room for checkpoints) before the first step.
    Returns the list of evaluation records; raises TrainingStopped (with .history) when stopped."""
    total, eval_every = _checked_lengths(kimg, eval_kimg, nan_policy, checkpoint_minutes, out_dir)
    seed = trainer.seed if seed is None else seed
    dist = trainer.distributed
    world = 1 if dist is None else dist.world_size
    main = dist is None or dist.rank == 0
    batches, evaluate, preview = _data_source(trainer, data, seed, evaluate, preview)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_outputs(trainer, out)
    if nan_policy == "skip":
        trainer.skip_nonfinite = True

    history: list[dict] = []
    watch = _LossWatch()  # the interval's losses and its non-finite steps
    interval = _Interval()
    next_eval = (trainer.nimg // eval_every + 1) * eval_every if eval_every else None
    on_gpu = trainer.device.type == "cuda"
    control_every = CONTROL_EVERY_GPU if on_gpu else 1
    saved_step = trainer.steps if out is not None and (out / "checkpoint.pt").is_file() else None
    last_save = time.monotonic()
    stop = StopSignals(handle_signals, announce=main)
    bar = _progress(total, trainer.nimg, enabled=progress and main)
    if monitor is not None:
        monitor.begin_interval()
    stop.install()
    try:
        while trainer.nimg < total:
            batch = next(batches, None)
            if batch is None:
                raise ValueError(f"data ran out after {trainer.nimg} images, before kimg={kimg}")
            x, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
            with interval.timed():
                losses = trainer.step(x, labels)
                watch.add(trainer.steps, losses)
                interval.steps += 1
                interval.images += x.shape[0] * world  # global images
                if on_gpu and interval.steps % 256 == 0:
                    torch.cuda.synchronize()  # keep the timing honest and the queue short
            bar.update(x.shape[0] * world)
            due = next_eval is not None and trainer.nimg >= next_eval
            signum, save_now = 0, False
            if due or trainer.nimg >= total or trainer.steps % control_every == 0:
                with interval.timed():  # (on a GPU it waits for the queue: training time)
                    signum, save_now = _control_point(trainer, watch, stop, nan_policy, out, saved_step,
                                                      checkpoint_minutes, last_save)
            if due or trainer.nimg >= total:
                if on_gpu:
                    with interval.timed():
                        torch.cuda.synchronize()
                record = _evaluation_record(trainer, watch, interval, monitor, evaluate if main else None)
                history.append(record)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss_ae", "mean_distance")
                                 if k in record and record[k] is not None})
                if out is not None:
                    write_outputs(trainer, out, record, preview)
                    saved_step, last_save = trainer.steps, time.monotonic()
                if tensorboard is not None and main:
                    tensorboard.write(record, trainer.interpolate(*preview) if preview is not None else None)
                interval = _Interval()
                if monitor is not None:
                    monitor.begin_interval()
                if next_eval is not None:
                    while next_eval <= trainer.nimg:
                        next_eval += eval_every
            elif (save_now or signum) and out is not None:  # --checkpoint-min, or a signal
                trainer.save(out / "checkpoint.pt")
                saved_step, last_save = trainer.steps, time.monotonic()
            if signum and trainer.nimg < total:  # (a signal during the last step: the run is complete)
                where = (f"checkpoint written to {out / 'checkpoint.pt'}; continue with --resume"
                         if out is not None else "nothing written (no out_dir)")
                raise TrainingStopped(f"stopped by {signal.Signals(signum).name} after step {trainer.steps} "
                                      f"({trainer.nimg / 1024:.3f} kimg); {where}", 128 + signum,
                                      trainer.steps, history)
    except TrainingStopped as exc:
        exc.history = history
        raise
    finally:
        stop.restore()
        bar.close()
    return history


def _checked_lengths(kimg, eval_kimg, nan_policy, checkpoint_minutes, out_dir) -> tuple[int, int | None]:
    """fit's lengths in images (the run's total, the evaluation interval or None), after checking
    every argument that sets them or how the run may stop."""
    total = int(round(kimg * 1024))
    if total <= 0:
        raise ValueError(f"kimg must be > 0, got {kimg}")
    eval_every = int(round(eval_kimg * 1024)) if eval_kimg else None
    if eval_every is not None and eval_every <= 0:
        raise ValueError(f"eval_kimg must be > 0 or None, got {eval_kimg}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}")
    if checkpoint_minutes is not None and not (checkpoint_minutes > 0 and out_dir is not None):
        raise ValueError(f"checkpoint_minutes must be > 0 and needs out_dir, got {checkpoint_minutes!r}")
    return total, eval_every


def _data_source(trainer, data, seed: int, evaluate, preview):
    """(this rank's batches from the trainer's step on, the evaluation, the preview pairs) for fit's
    `data`; "lines" brings its own evaluation and 16 test pairs unless they are given."""
    from .data import lines as lines_data

    config, dist = trainer.config, trainer.distributed
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
    local = config.batch if dist is None else dist.local_batch(config.batch)  # this rank's images per step
    if isinstance(data, str):
        if data != "lines":
            raise ValueError(f"data: the only built-in dataset is 'lines', got {data!r}")
        if config.colors != 1 or config.image_size != lines_data.SIZE:
            raise ValueError("the lines data needs colors=1 and 32x32 images (the 'lines' preset)")
        batches = lines_data.lines_batches(local, seed=rank_seed(seed, rank), device=trainer.device,
                                           start_step=trainer.steps)
        if evaluate is None:
            evaluate = _lines_evaluation
        if preview is None:
            from .eval.lines import eval_pairs
            a, b = eval_pairs(16)
            preview = (lines_data.draw_lines(a), lines_data.draw_lines(b))
    elif isinstance(data, tuple):
        batches = tensor_batches(*data, batch=local, seed=seed, start_step=trainer.steps, rank=rank,
                                 world_size=world)
    elif isinstance(data, Iterable):
        batches = iter(data)
    else:
        raise ValueError(f"data must be 'lines', an iterable of batches or (images, labels), got {type(data).__name__}")
    return batches, evaluate, preview


class _Interval:
    """The training steps since the last evaluation: how many, their global images, and the seconds
    spent in them (`timed()` blocks: steps, control points, the queue's wait; not evaluations)."""

    def __init__(self):
        self.steps, self.images, self.seconds = 0, 0, 0.0

    @contextlib.contextmanager
    def timed(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


def _evaluation_record(trainer, watch, interval: _Interval, monitor, evaluate) -> dict:
    """One line of metrics.jsonl: where the run is, the interval's speed and mean losses (and its
    monitor's readings, taken before the evaluation so they cover training steps only), the
    evaluation's metrics (`evaluate`: None on ranks other than 0), the run's settings."""
    record = dict(kimg=round(trainer.nimg / 1024, 3), nimg=trainer.nimg, step=trainer.steps,
                  images_per_s=round(interval.images / max(interval.seconds, 1e-9), 1))
    record.update(watch.interval_means(trainer.distributed))
    if "loss_ae" in record:
        record["rmse"] = math.sqrt(max(record["loss_ae"], 0.0)) * 127.5
    if monitor is not None:
        record.update(monitor.end_interval())
    if evaluate is not None:  # torchrun: evaluated once, by rank 0
        record.update(evaluate(trainer))
    record.update(run_settings(trainer))
    return record


def _lines_evaluation(trainer) -> dict:
    from .eval.lines import evaluate_lines
    return evaluate_lines(trainer)


def tensor_batches(images: torch.Tensor, labels: torch.Tensor | None = None, *, batch: int,
                   seed: int = 0, start_step: int = 0, rank: int = 0, world_size: int = 1):
    """Endless shuffled batches (x, labels) from in-memory tensors; a new permutation every epoch.

    Step s's global batch (batch * world_size images) is a pure function of (seed, s): epoch
    e = s // (N // global batch) is shuffled by numpy's default_rng([seed, e]), so a resumed run
    (start_step) sees exactly the batches it would have seen. Rank r takes images
    r*batch .. (r+1)*batch - 1 of each global batch (a partition: no image twice in one step)."""
    n = images.shape[0]
    global_batch = batch * world_size
    if labels is not None and labels.shape[0] != n:
        raise ValueError(f"images and labels differ in length: {n} and {labels.shape[0]}")
    if n < global_batch:
        raise ValueError(f"need at least one batch of {global_batch} images, got {n}"
                         + (" (an empty dataset)" if n == 0 else ""))
    per_epoch = n // global_batch
    step, epoch, order = start_step, None, None
    while True:
        e, i = divmod(step, per_epoch)
        if e != epoch:
            epoch, order = e, torch.from_numpy(np.random.default_rng([seed, e]).permutation(n))
        start = i * global_batch + rank * batch
        idx = order[start:start + batch]
        yield images[idx], (labels[idx] if labels is not None else None)
        step += 1


def _progress(total: int, initial: int, enabled: bool):
    """A bar on a terminal; in a log, one line per evaluation (acai_fast.progress)."""
    from .progress import progress
    return progress(total, initial=initial, unit="img", unit_scale=True, enabled=enabled, desc="train")


def _control_point(trainer, watch, stop, nan_policy: str, out, saved_step, checkpoint_minutes,
                   last_save) -> tuple[int, bool]:
    """Read the steps' losses back; stop on a non-finite one (nan_policy "stop") or report it
    ("skip"); torchrun: agree with every rank on the signal, the checkpoint time and the losses.
    Returns (the signal to stop for or 0, whether a timed checkpoint is due)."""
    bad = watch.flush()
    signum = stop.signum
    save_now = checkpoint_minutes is not None and time.monotonic() - last_save >= 60 * checkpoint_minutes
    any_bad = bool(bad)
    if trainer.distributed is not None:
        signum, save_now, any_bad = trainer.distributed.agree(signum, save_now, any_bad)
    if any_bad and nan_policy == "stop":
        if bad:
            step, name, value = bad[0]
            what = f"non-finite {name} ({value}) at step {step}"
        else:
            what = f"a non-finite loss on another rank (by step {trainer.steps})"
        kept = (f"the last good checkpoint {out / 'checkpoint.pt'} (step {saved_step}) is kept"
                if saved_step is not None else "no checkpoint had been written")
        raise TrainingStopped(f"{what}; training stopped (nan policy 'stop'); {kept}", 1, trainer.steps)
    for step, name, value in bad:
        log.warning("non-finite %s (%s) at step %d: its update was skipped (nan policy 'skip')",
                    name, value, step)
    return int(signum), bool(save_now)


class _LossWatch:
    """Every step's losses, kept on the device as one stacked vector per step and read back at
    control points (one transfer): the interval's means for the metrics line (finite steps only) and
    the non-finite steps (step number, which loss, its value)."""

    def __init__(self):
        self.pending: list[tuple[int, tuple[str, ...], torch.Tensor]] = []
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.skipped = 0

    def add(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        self.pending.append((step, tuple(losses), torch.stack([v.detach().float() for v in losses.values()])))

    def flush(self) -> list[tuple[int, str, float]]:
        """Move the pending losses to the host; returns the non-finite steps among them."""
        if not self.pending:
            return []
        values = torch.cat([v for _, _, v in self.pending]).cpu().tolist()
        bad, offset = [], 0
        for step, names, _ in self.pending:
            row, offset = values[offset:offset + len(names)], offset + len(names)
            wrong = [(n, v) for n, v in zip(names, row) if not math.isfinite(v)]
            if wrong:
                bad.append((step, *wrong[0]))
                continue
            for n, v in zip(names, row):
                self.sums[n] = self.sums.get(n, 0.0) + v
                self.counts[n] = self.counts.get(n, 0) + 1
        self.pending = []
        self.skipped += len(bad)
        return bad

    def interval_means(self, dist=None) -> dict[str, float]:
        """The mean of each loss over the interval's finite steps (over every rank's, under
        torchrun: a collective), and how many steps were skipped; then a new interval starts."""
        self.flush()
        names = sorted(self.sums)
        sums, counts = [self.sums[n] for n in names], [float(self.counts[n]) for n in names]
        skipped = float(self.skipped)
        if dist is not None:
            *both, skipped = dist.sum_host(sums + counts + [skipped])
            sums, counts = both[:len(names)], both[len(names):]
        means = {n: s / c for n, s, c in zip(names, sums, counts) if c > 0}
        if skipped:
            means["skipped_steps"] = int(skipped)
        self.sums, self.counts, self.skipped = {}, {}, 0
        return means
