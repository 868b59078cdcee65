"""sweep(): settings x seeds -> arrays of runs -> one folder per run + a summary (`acai-fast sweep`).

    from acai_fast.sweep import sweep
    sweep("lines", seeds=range(4), advweight=[0, 0.5, 1], kimg=4096, eval_kimg=64, out="sweeps/lambda")

Every number in the paper is a mean over re-runs, and choosing lambda (advweight) or gamma (reg)
means sweeping them. A sweep is the cross product of the swept hyper-parameters (advweight, reg,
lr: none of them changes a tensor's shape) and the seeds. Its runs are trained `array` at a time as
one acai_fast.trainer.RunArray (on the fused backend one launch per layer serves every run of an
array; a non-ACAI model on the fused backend one run at a time: see Job.arrays); the rest wait their
turn. Run k of an array is the run `acai-fast train --seed S --advweight A --reg R --lr L` would
train: the same weights, alphas and batches (lines: its own lines_batches stream of its seed; image
presets: its own DeviceBatches order of its seed).

What `out` holds:
    sweep.json                             the sweep's arguments and runs (resume checks them)
    advweight=0.5_reg=0.2_lr=0.0001_seed=3/    one folder per run, what `acai-fast train` writes:
        metrics.jsonl                      fit()'s record keys (+ seed, array_runs, array_images_per_s)
        checkpoint.pt  interpolations.png  (ACAITrainer.load continues the run alone)
        status.json                        training | finished | nonfinite (with the reason)
        events.out.tfevents.*              with tensorboard=True: `tensorboard --logdir out`
    summary.md  summary.csv                one row per setting: per run the median of its last 20
                                           evaluations, then mean +- std over its seeds
    summary_METRIC_vs_PARAM.png            each metric against each swept hyper-parameter

A run whose loss turns non-finite is stopped alone: its slice of the array keeps computing (garbage,
harmlessly: Adam and every kernel act per run) but is no longer recorded or evaluated; its folder,
the summary and stderr say why. resume=True continues a stopped sweep: finished runs are skipped,
the others are rebuilt from their checkpoints (RunArray.from_runs; runs at the same step share an
array), a run never checkpointed starts over. Under torchrun (distributed=) rank r trains
runs[r::world_size] on its own GPU; rank 0 writes the summary once every run folder says its run
is done (reading the folders: ranks' shares can differ by a whole array, hours, longer than any
collective's timeout).

The machinery under sweep() serves `acai-fast reproduce` too (each model's re-runs are its seeds):
a Job (model, data as a RunData, run length, each run's folder), plan_arrays (what the folders
still need, as arrays, checked before anything trains) and train_arrays (the one array loop).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import importlib
import itertools
import json
import math
import numbers
import operator
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoint import check_output_folder, load_checkpoint
from .config import ACAIConfig
from .loop import CONTROL_EVERY_GPU, TrainingStopped, _StopSignals, run_settings, write_outputs
from .eval.stats import format_mean_std, markdown_table, mean_std, run_statistic
from .trainer import ACAITrainer, RunArray, resolve_backend

SWEPT = ("advweight", "reg", "lr")  # hyper-parameters a sweep may vary within one array
WINDOW = 20  # the paper's per-run statistic: median of the last 20 evaluations
CPU_ARRAY = 4  # default array size on the CPU (the reference backend loops over runs: no speed-up)
MAX_ARRAY = 64  # largest default array on a GPU (the benchmark goes up to 64)
MEMORY_FRACTION = 0.8  # share of the GPU's free memory a default array may plan to use
POLL_SECONDS = 1.0  # torchrun: how often rank 0 looks whether the other ranks' runs are done
PREVIEW_PAIRS = 16  # rows of each run's interpolations.png
_TEST_LIMIT = {"celeba": 2048}  # CelebA's "test" split is its training set: previews need only a few
# (key, column title, scale) of the summary, in this order, where the runs have them.
METRICS = (("mean_distance", "Mean Distance (x10^3)", 1e3), ("mean_smoothness", "Mean Smoothness", 1.0),
           ("probe_accuracy", "Probe accuracy (%)", 100.0), ("rmse", "RMSE (pixels)", 1.0))


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


def rank_share(runs: Sequence[Run], rank: int, world_size: int) -> list[Run]:
    """The runs rank `rank` of a torchrun job of `world_size` trains: runs[rank::world_size] (every
    run exactly once over the ranks; shares differ by at most one run)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank!r} of {world_size!r}")
    return list(runs[rank::world_size])


# ------------------------------------------------------------------------------------------------
# How many runs fit one array
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
    from .models import build_model
    from .networks import LinearProbe

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


# ------------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------------


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
    into `out` (see the module docstring). Returns summarize(out)'s dict (under torchrun: rank 0;
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
        acai_fast.loop.TrainingStopped (continue with resume=True).
    SweepArgumentError (a ValueError, one line) for bad arguments, a folder that already holds runs
    (without resume) or another sweep, missing data: before anything trains."""
    from .progress import progress as progress_report

    try:  # everything that can be wrong with the arguments, the folder or the data: before any step
        overrides = dict(overrides or {})
        if set(overrides) & set(SWEPT):
            raise ValueError(f"overrides: pass {', '.join(SWEPT)} as the sweep's lists, not as overrides")
        config = ACAIConfig.preset(preset, **overrides)
        runs = plan_runs(config, seeds, advweight, reg, lr)
        from .models import MODELS
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
        _check_folder(out, runs, config, model, resume)
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
        todo = [r for r in mine if not _done(out / r.name, run_img)]
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
        _write_json(out / "sweep.json", meta)

    bar = progress_report(images_left(job, groups), enabled=progress and rank == 0, unit="img", unit_scale=True,
                          counts=False)
    stop = _StopSignals(handle_signals, announce=rank == 0)
    stop.install()
    try:
        train_arrays(job, groups, bar, stop)
        if rank == 0 and world > 1:
            bar.set_description("waiting for the other ranks' runs")
            while not all(_done(out / r.name, run_img) for r in runs):
                if stop.signum:
                    raise TrainingStopped("sweep stopped by a signal while waiting for the other ranks; "
                                          "continue with --resume (resume=True)", 128 + int(stop.signum), 0)
                time.sleep(POLL_SECONDS)
    finally:
        stop.restore()
        bar.close()
    if rank != 0:
        return dict(runs={r.name: read_status(out / r.name) for r in mine})
    return summarize(out, window)


def describe(runs: Sequence[Run]) -> str:
    """The settings of some runs in a few words: `advweight=0,0.5 reg=0.2 lr=0.0001 seed=0-3`."""
    parts = [f"{k}=" + ",".join(f"{v:g}" for v in sorted({getattr(r, k) for r in runs})) for k in SWEPT]
    return " ".join(parts + ["seed=" + _ranges(sorted({r.seed for r in runs}))])


def _ranges(values: list[int]) -> str:
    spans, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            spans.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(spans)


class RunData:
    """What the runs train and are evaluated on: each run's batches (its own seeded stream, from a
    given step), the preview pairs of interpolations.png and the evaluation (trainer -> dict).

    data: see sweep(); pairs: test pairs of the lines evaluation; evaluate: instead of the preset's
    evaluation; preview: (x_a, x_b) instead of the first 16 test pairs."""

    def __init__(self, config: ACAIConfig, data, device: torch.device, pairs: int = 256, evaluate=None,
                 preview: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.config, self.device = config, device
        self.lines = config.dataset == "lines"
        if self.lines:
            from .data.lines import draw_lines
            from .eval.lines import eval_pairs

            if data is not None and data != "lines":
                raise ValueError("data: the lines preset generates its data; pass none")
            a, b = eval_pairs(PREVIEW_PAIRS)
            self.preview = preview or (draw_lines(a, device=device), draw_lines(b, device=device))
            self.evaluate = evaluate or (lambda t: _lines_evaluation(t, pairs))
            return
        x, y, x_test, y_test = self._load(data)
        self.images = x.to(device)  # once: every run's DeviceBatches gathers from this one copy
        self.labels = y.to(device) if y is not None else None
        half = min(PREVIEW_PAIRS, x_test.shape[0] // 2)
        if preview is not None:
            self.preview = tuple(p.to(device) for p in preview)
        elif half < 1:
            raise ValueError("data: the test split needs at least 2 images (the preview pairs)")
        else:
            self.preview = (x_test[:half].to(device), x_test[half:2 * half].to(device))
        if evaluate is not None:
            self.evaluate = evaluate
        elif y_test is not None:
            from .eval.probe import probe_accuracy
            self.evaluate = lambda t: dict(probe_accuracy=probe_accuracy(t, x_test, y_test))
        else:  # CelebA: no labels, no probe to score
            self.evaluate = lambda t: {}

    def _load(self, data):
        from .data import data_folder, dataset_of_preset, load_dataset, load_pixels

        if isinstance(data, (tuple, list)):
            if len(data) != 4:
                raise ValueError("data: a tuple (train images, train labels, test images, test labels)")
            return data
        name = dataset_of_preset(self.config.dataset)
        root = data_folder(data)
        x, y = load_pixels(name, root, "train")
        x_test, y_test = load_dataset(name, root, "test", limit=_TEST_LIMIT.get(name))
        return x, y, x_test, y_test

    def batches(self, run: Run, start_step: int):
        """Run `run`'s training batches from step `start_step`: those `acai-fast train --seed` uses."""
        if self.lines:
            from .data.lines import lines_batches
            return lines_batches(self.config.batch, seed=run.seed, device=self.device, start_step=start_step)
        from .data import DeviceBatches
        return DeviceBatches(self.images, self.labels, batch=self.config.batch, seed=run.seed,
                             device=self.device, start_step=start_step)


def _lines_evaluation(trainer, pairs: int) -> dict:
    from .eval.lines import evaluate_lines
    return evaluate_lines(trainer, pairs=pairs)


# ------------------------------------------------------------------------------------------------
# Jobs: arrays planned from the run folders, built, trained (shared with acai_fast.reproduce)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """What every array of one sweep shares (and of one model of a reproduction, acai_fast.reproduce,
    whose seeds are its re-runs): the model and its shapes, the data, how long each run trains,
    where each run's folder is, and how progress and stops are worded.

    run_img: images each run trains (whole batches); eval_every: images between evaluations (None:
    at the end only); backend: as asked ("auto" resolves on `device`); out: named in messages;
    folder_of: a run's folder; cuda_graph: the trainers' (None: the backend's default); label,
    describe_runs, name_of: the progress bar's "{label}array i/n: K run(s) {describe_runs(runs)}"
    and a run's name in messages; what, resume_hint: "{what} stopped by a signal ...; {resume_hint}"."""
    config: ACAIConfig
    model: str
    source: RunData
    run_img: int
    eval_every: int | None
    backend: str
    device: torch.device
    out: Path
    folder_of: Callable[[Run], Path]
    tensorboard: bool = False
    cuda_graph: bool | None = None
    label: str = ""
    describe_runs: Callable[[Sequence[Run]], str] = describe
    name_of: Callable[[Run], str] = operator.attrgetter("name")
    what: str = "sweep"
    resume_hint: str = "continue with --resume (resume=True)"

    @functools.cached_property
    def arrays(self) -> bool:
        """Whether the model trains as arrays on this backend; else one run at a time, as `train`
        trains it. The fused backend has the acai model's array schedule only."""
        return not (resolve_backend(self.backend, self.device) == "fused" and self.model != "acai")


def checkpoint_room(config: ACAIConfig, model: str, runs: int) -> int:
    """Bytes of disk `runs` runs' checkpoints take (fp32 weights + Adam's two moments each), plus
    one being written."""
    return (runs + 1) * (12 * parameter_count(config, model) + 2 ** 20)


def plan_arrays(job: Job, runs: Sequence[Run], size: int) -> list[tuple[int, list[Run]]]:
    """The arrays that train what `runs` still need, at most `size` runs each (1 where the model has
    no array on its backend), as (start step, runs): runs continuing from a checkpoint are grouped
    by its step (an array's runs move in step), then the fresh ones (step 0). Done runs (finished,
    or stopped by a non-finite loss) are left out. Every run folder holding a checkpoint must hold
    that run (model, seed, config), else ValueError: checked here, before anything trains."""
    size = size if job.arrays else 1
    by_step: dict[int, list[Run]] = {}
    for run in runs:
        folder = job.folder_of(run)
        path = folder / "checkpoint.pt"
        steps = _checkpoint_steps(path, job, run) if path.is_file() else 0
        if not _done(folder, job.run_img):
            by_step.setdefault(steps, []).append(run)
    return [(steps, group[i:i + size]) for steps, group in sorted(by_step.items(), reverse=True)
            for i in range(0, len(group), size)]


def _checkpoint_steps(path: Path, job: Job, run: Run) -> int:
    state = load_checkpoint(path)
    try:
        theirs = ACAIConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its config is not valid ({str(exc).splitlines()[0]})") from None
    expected = dataclasses.replace(job.config, advweight=run.advweight, reg=run.reg, lr=run.lr)
    if theirs != expected or state["seed"] != run.seed or state["model_name"] != job.model:
        raise ValueError(f"{path} holds another run (model {state['model_name']}, seed {state['seed']}, "
                         f"{theirs}); expected {job.model}, seed {run.seed}, {expected}: move it away "
                         f"or choose another out")
    return int(state["steps"])


def images_left(job: Job, groups: list[tuple[int, list[Run]]]) -> int:
    """Images the planned arrays still train, over all their runs (a progress bar's total)."""
    return sum(len(g) * max(0, job.run_img - steps * job.config.batch) for steps, g in groups)


def train_arrays(job: Job, groups: list[tuple[int, list[Run]]], bar, stop=None) -> dict[Run, dict]:
    """Train plan_arrays' arrays one after another, each to job.run_img images per run: every
    evaluation appends a record to each live run's metrics.jsonl and writes its checkpoint,
    interpolations.png and status.json (see the module docstring). bar: an acai_fast.progress
    report, advanced by each step's images of all runs; stop: acai_fast.loop._StopSignals installed by
    the caller, or None: SIGINT/SIGTERM are handled here (each running run checkpointed, then TrainingStopped).
    Returns, for each run trained, its array's dict(seconds (its wall time), runs, backend)."""
    own = stop is None
    if own:
        stop = _StopSignals(True)
        stop.install()
    trained: dict[Run, dict] = {}
    try:
        for i, (steps, group) in enumerate(groups):
            if steps * job.config.batch >= job.run_img:  # checkpointed at the end, no status saying so
                for run in group:
                    _write_status(job.folder_of(run), "finished", steps, job.config.batch)
                continue
            bar.set_description(f"{job.label}array {i + 1}/{len(groups)}: {len(group)} run(s) "
                                f"{job.describe_runs(group)}")
            t0 = time.perf_counter()
            array = _build_array(job, group, steps)
            _train_array(job, array, group, bar, stop)
            info = dict(seconds=time.perf_counter() - t0, runs=array.runs, backend=array.backend)
            trained.update((run, info) for run in group)
    finally:
        if own:
            stop.restore()
    return trained


# ------------------------------------------------------------------------------------------------
# Run folders: what is done, what continues, what starts over
# ------------------------------------------------------------------------------------------------


def read_status(folder: Path) -> dict:
    """A run folder's status.json ({} when it has none): state (training | finished | nonfinite),
    nimg, kimg, step, message."""
    try:
        return json.loads((folder / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _done(folder: Path, run_img: int) -> bool:
    """Finished (its images trained) or stopped for good (a non-finite loss)."""
    status = read_status(folder)
    return status.get("state") == "nonfinite" or (status.get("state") == "finished"
                                                   and status.get("nimg", 0) >= run_img)


def _check_folder(out: Path, runs: list[Run], config: ACAIConfig, model: str, resume: bool) -> None:
    """Without resume: no run of the sweep may exist in `out` yet. With resume: `out`'s sweep must
    be of the same model and shapes (the swept lists and the seeds may differ)."""
    meta_path = out / "sweep.json"
    if not resume:
        existing = [r.name for r in runs if (out / r.name / "checkpoint.pt").exists()
                    or (out / r.name / "metrics.jsonl").exists()]
        if existing or meta_path.exists():
            what = f"run {existing[0]}" if existing else "a sweep (sweep.json)"
            raise ValueError(f"{out} already holds {what}: pass resume=True (--resume) to continue it, "
                             f"or choose another out")
        return
    if not meta_path.exists():
        return
    meta = json.loads(meta_path.read_text())
    theirs = {k: v for k, v in meta.get("config", {}).items() if k not in SWEPT}
    ours = {k: v for k, v in config.to_dict().items() if k not in SWEPT}
    if meta.get("model") != model or theirs != ours:
        raise ValueError(f"{out} holds a sweep of {meta.get('model')!r} with config {theirs}; this one is "
                         f"{model!r} with {ours}: choose another out")


def _build_array(job: Job, runs: list[Run], steps: int):
    """The array of `runs`: fresh (steps 0), or continuing their checkpoints at `steps`
    (RunArray.from_runs); a model without arrays on its backend: its one run as an _OneRun. A
    resumed run's metrics.jsonl keeps only the records up to its checkpoint (a line written just
    before an interruption would be repeated); a run starting over loses its stale files."""
    folders = [job.folder_of(r) for r in runs]
    options = dict(backend=job.backend, device=job.device, cuda_graph=job.cuda_graph)
    if steps == 0:
        for folder in folders:
            for stale in [folder / "metrics.jsonl", folder / "status.json", folder / "checkpoint.pt",
                          *folder.glob("events.out.tfevents.*")]:
                stale.unlink(missing_ok=True)
        if not job.arrays:
            (run,) = runs
            config = dataclasses.replace(job.config, advweight=run.advweight, reg=run.reg, lr=run.lr)
            return _OneRun(ACAITrainer(config, seed=run.seed, model=job.model, **options))
        return ACAITrainer(job.config, model=job.model, runs=[r.as_dict() for r in runs], **options)
    for folder in folders:
        _keep_records_until(folder / "metrics.jsonl", steps)
    if not job.arrays:
        return _OneRun(ACAITrainer.load(folders[0] / "checkpoint.pt", **options))
    trainers = [ACAITrainer.load(f / "checkpoint.pt", device=job.device, backend="reference") for f in folders]
    return RunArray.from_runs(trainers, dtype=None, **options)


class _OneRun:
    """One ACAITrainer driven as an array of one run (x (1, N, ...), losses (1,)), for a model that
    has no array on its backend: the same loop, folders and records as the arrays'."""

    runs = 1

    def __init__(self, trainer: ACAITrainer):
        self.trainer = trainer
        self.config, self.device, self.backend = trainer.config, trainer.device, trainer.backend

    nimg = property(lambda self: self.trainer.nimg)
    steps = property(lambda self: self.trainer.steps)

    def step(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        losses = self.trainer.step(x[0], labels[0] if labels is not None else None)
        return {name: value.reshape(1) for name, value in losses.items()}

    def run(self, k: int) -> ACAITrainer:
        if k != 0:
            raise ValueError(f"run index must be 0 (an array of one run), got {k!r}")
        return self.trainer


def _keep_records_until(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Training one array
# ------------------------------------------------------------------------------------------------


def _train_array(job: Job, array: RunArray, runs: list[Run], bar, stop) -> None:
    """Train `array` (its runs: `runs`) to job.run_img images per run, evaluating every
    job.eval_every and at the end; each evaluation appends a record to each live run's metrics.jsonl
    and writes its checkpoint, interpolations.png and status.json (and TensorBoard events)."""
    from .tensorboard_log import TensorBoardLog

    k_runs, batch = array.runs, array.config.batch
    run_img, eval_every = job.run_img, job.eval_every
    folders = [job.folder_of(r) for r in runs]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    streams = [job.source.batches(r, array.steps) for r in runs]
    boards = [TensorBoardLog(f, resume_nimg=array.nimg) if job.tensorboard else None for f in folders]
    live = list(range(k_runs))
    saved = {k: array.steps if (folders[k] / "checkpoint.pt").is_file() else None for k in live}
    watch = _RunLosses(k_runs)
    on_gpu = array.device.type == "cuda"
    control_every = CONTROL_EVERY_GPU if on_gpu else 1
    next_eval = (array.nimg // eval_every + 1) * eval_every if eval_every else None
    interval_steps, interval_time = 0, 0.0
    try:
        while array.nimg < run_img and live:
            xs, ys = zip(*(next(s) for s in streams))
            x = torch.stack(xs)  # K x (N, C, H, W) -> (K, N, C, H, W): run k's batch in x[k]
            labels = torch.stack(ys) if ys[0] is not None else None
            t0 = time.perf_counter()
            losses = array.step(x, labels)
            watch.add(array.steps, losses)
            interval_steps += 1
            if on_gpu and interval_steps % 256 == 0:
                torch.cuda.synchronize()  # keep the timing honest and the queue short
            interval_time += time.perf_counter() - t0
            bar.update(k_runs * batch)
            due = (next_eval is not None and array.nimg >= next_eval) or array.nimg >= run_img
            if due or array.steps % control_every == 0:
                for k, step, name, value in watch.flush(live):
                    live.remove(k)
                    _stop_run(job, folders[k], runs[k], array, step, name, value, saved[k], bar)
            if due and live:
                if on_gpu:
                    t0 = time.perf_counter()
                    torch.cuda.synchronize()
                    interval_time += time.perf_counter() - t0
                speed = interval_steps * batch / max(interval_time, 1e-9)
                for k in live:
                    _evaluate_run(job, array, k, runs[k], folders[k], watch.means(k), speed, boards[k])
                    saved[k] = array.steps
                interval_steps, interval_time = 0, 0.0
                if next_eval is not None:
                    while next_eval <= array.nimg:
                        next_eval += eval_every
            if stop.signum and array.nimg < run_img:
                if not due:
                    for k in live:
                        array.run(k).save(folders[k] / "checkpoint.pt")
                        _write_status(folders[k], "training", array.steps, batch)
                names = ", ".join(job.name_of(runs[k]) for k in live)
                raise TrainingStopped(f"{job.what} stopped by a signal after step {array.steps} of the array of "
                                      f"{names or 'no running runs'}; checkpoints written in {job.out}; "
                                      f"{job.resume_hint}", 128 + int(stop.signum), array.steps)
        if not live:  # every run of the array stopped: what it had left is not trained
            bar.update(k_runs * max(0, run_img - array.nimg))
    finally:
        for board in boards:
            if board is not None:
                board.close()


def _evaluate_run(job: Job, array: RunArray, k: int, run: Run, folder: Path, losses: dict, speed: float,
                  board) -> None:
    """Run k's evaluation record (fit()'s keys, + seed and the array's size and speed), appended to
    its metrics.jsonl with its checkpoint (loop.write_outputs), and its interpolations.png (and
    TensorBoard events) from one interpolation of the preview pairs."""
    from .plotting import save_interpolation_grid

    single = array.run(k)
    record = dict(kimg=round(array.nimg / 1024, 3), nimg=array.nimg, step=array.steps,
                  images_per_s=round(speed, 1), array_images_per_s=round(speed * array.runs, 1),
                  array_runs=array.runs)
    record.update(losses)
    if "loss_ae" in record:
        record["rmse"] = math.sqrt(max(record["loss_ae"], 0.0)) * 127.5
    record.update(job.source.evaluate(single))
    record.update(run_settings(single))
    record["seed"] = run.seed
    write_outputs(single, folder, record, None)  # the metrics line and the checkpoint
    images = single.interpolate(*job.source.preview)
    save_interpolation_grid(images, folder / "interpolations.png")
    if board is not None:
        board.write(record, images)
    _write_status(folder, "finished" if array.nimg >= job.run_img else "training", array.steps,
                  array.config.batch)


def _write_status(folder: Path, state: str, step: int, batch: int, message: str | None = None, **extra) -> None:
    status = dict(state=state, nimg=step * batch, kimg=round(step * batch / 1024, 3), step=step, **extra)
    if message is not None:
        status["message"] = message
    _write_json(folder / "status.json", status)


def _stop_run(job: Job, folder: Path, run: Run, array: RunArray, step: int, name: str, value: float, saved,
              bar) -> None:
    kept = (f"its last good checkpoint (step {saved}) is kept" if saved is not None
            else "it had written no checkpoint")
    message = (f"non-finite {name} ({value}) at step {step}: the run stopped alone, the other runs of "
               f"its array went on; {kept}")
    _write_status(folder, "nonfinite", step, array.config.batch, message, loss=name, value=str(value))
    bar.write(f"acai-fast {job.what}: {job.name_of(run)}: {message}", file=sys.stderr)


class _RunLosses:
    """Every step's (K,) losses kept on the device as one (L, K) tensor per step and read back at
    control points (one transfer): each run's interval means over its finite steps, and the first
    non-finite step of each run still recorded."""

    def __init__(self, runs: int):
        self.runs = runs
        self.pending: list[tuple[int, tuple[str, ...], torch.Tensor]] = []
        self.sums: list[dict[str, float]] = [{} for _ in range(runs)]
        self.counts: list[dict[str, int]] = [{} for _ in range(runs)]

    def add(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        self.pending.append((step, tuple(losses), torch.stack([v.detach().float() for v in losses.values()])))

    def flush(self, live: list[int]) -> list[tuple[int, int, str, float]]:
        """Move the pending losses to the host; returns (run, step, loss, value) of each live run
        whose losses turned non-finite (its first such step), in run order."""
        if not self.pending:
            return []
        values = torch.cat([v.flatten() for _, _, v in self.pending]).cpu().tolist()
        watching, bad, offset = set(live), {}, 0
        for step, names, _ in self.pending:
            row, offset = values[offset:offset + len(names) * self.runs], offset + len(names) * self.runs
            for k in sorted(watching):
                mine = [(n, row[i * self.runs + k]) for i, n in enumerate(names)]
                wrong = [(n, v) for n, v in mine if not math.isfinite(v)]
                if wrong:
                    bad[k] = (step, *wrong[0])
                    watching.discard(k)
                    continue
                for n, v in mine:
                    self.sums[k][n] = self.sums[k].get(n, 0.0) + v
                    self.counts[k][n] = self.counts[k].get(n, 0) + 1
        self.pending = []
        return [(k, *bad[k]) for k in sorted(bad)]

    def means(self, k: int) -> dict[str, float]:
        """Run k's mean of each loss over the interval (then a new interval starts for it)."""
        means = {n: s / self.counts[k][n] for n, s in sorted(self.sums[k].items())}
        self.sums[k], self.counts[k] = {}, {}
        return means


# ------------------------------------------------------------------------------------------------
# The summary
# ------------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    """A metrics.jsonl's records ([] when there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(out: str | os.PathLike, window: int | None = None) -> dict:
    """Read a sweep's folders and write out/summary.md, out/summary.csv and a PNG of each metric
    against each swept hyper-parameter (seeds alone: against the seed). Per run the median of its
    last `window` evaluations (default: the sweep's, 20), then per setting mean +- std over its
    finished runs; runs stopped by a non-finite loss are listed, not averaged. Returns
    {"rows": [per setting], "runs": {name: per run}}."""
    out = Path(out)
    meta = json.loads((out / "sweep.json").read_text())
    window = window or meta.get("window", WINDOW)
    runs = [Run(**r) for r in meta["runs"]]
    per_run = {}
    for run in runs:
        folder = out / run.name
        history, status = read_records(folder / "metrics.jsonl"), read_status(folder)
        state = status.get("state", "not started")
        if state == "finished" and status.get("nimg", 0) < meta["total_img"]:
            state = "training"
        per_run[run.name] = dict(run.as_dict(), state=state, kimg=status.get("kimg", 0.0),
                                 message=status.get("message"), evaluations=len(history),
                                 **{key: run_statistic(history, key, window) for key, _, _ in METRICS})
    metrics = [m for m in METRICS if any(not math.isnan(r[m[0]]) for r in per_run.values())]
    rows = []
    for setting, group in itertools.groupby(runs, key=lambda r: r.setting):
        group = [per_run[r.name] for r in group]
        finished = [r for r in group if r["state"] == "finished"]
        row = dict(zip(SWEPT, setting), runs=len(group), finished=len(finished),
                   nonfinite=sum(r["state"] == "nonfinite" for r in group),
                   unfinished=sum(r["state"] not in ("finished", "nonfinite") for r in group))
        for key, _, _ in metrics:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(r[key] for r in finished)
        rows.append(row)
    (out / "summary.md").write_text(_summary_markdown(meta, rows, per_run, metrics, window))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _summary_plots(out, meta, rows, per_run, metrics)
    return dict(rows=rows, runs=per_run)


def _summary_markdown(meta: dict, rows: list[dict], per_run: dict, metrics, window: int) -> str:
    swept = [k for k in SWEPT if len(meta[k]) > 1]
    title = (f"# Sweep: {meta['model']} on {meta['preset']}, {meta['kimg']:g} kimg per run, "
             f"seeds {_ranges(meta['seeds'])}\n\n")
    every = f"every {meta['eval_kimg']:g} kimg" if meta["eval_kimg"] is not None else "at the end"
    text = title + (f"Per run the median of its last {window} evaluations ({every}), "
                    f"then mean ± std over the setting's finished runs. "
                    f"Swept: {', '.join(swept) or 'seeds only'}.\n\n")
    header = list(SWEPT) + ["runs"] + [column for _, column, _ in metrics] + ["stopped (non-finite)"]
    body = []
    for row in rows:
        stopped = [str(r["seed"]) for r in per_run.values() if r["state"] == "nonfinite"
                   and (r["advweight"], r["reg"], r["lr"]) == (row["advweight"], row["reg"], row["lr"])]
        done = f"{row['finished']}/{row['runs']}" + (f" ({row['unfinished']} unfinished)" if row["unfinished"] else "")
        body.append([f"{row[k]:g}" for k in SWEPT] + [done]
                    + [format_mean_std(row[f"{key}_mean"], row[f"{key}_std"], scale, 3 if scale != 100 else 1)
                       for key, _, scale in metrics] + ["seeds " + ", ".join(stopped) if stopped else ""])
    text += markdown_table(header, body)
    text += "\n## Runs\n\n"
    run_rows = [[name, r["state"], f"{r['kimg']:g}", r["evaluations"]]
                + ["n/a" if math.isnan(r[key]) else f"{r[key] * scale:.{3 if scale != 100 else 1}f}"
                   for key, _, scale in metrics] for name, r in per_run.items()]
    text += markdown_table(["run", "state", "kimg", "evaluations"] + [t for _, t, _ in metrics], run_rows)
    stopped = [(name, r["message"]) for name, r in per_run.items() if r["state"] == "nonfinite"]
    if stopped:
        text += "\n## Stopped runs\n\n" + "".join(f"- {name}: {message}\n" for name, message in stopped)
    return text


def _summary_plots(out: Path, meta: dict, rows: list[dict], per_run: dict, metrics) -> None:
    """summary_METRIC_vs_PARAM.png: the setting's mean against each swept hyper-parameter, error bars
    one std over its seeds, one line per value of the other swept ones; seeds alone: each run's
    value against its seed."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    swept = [k for k in SWEPT if len(meta[k]) > 1]
    for key, title, scale in metrics:
        for param in swept or ["seed"]:
            fig, ax = plt.subplots(figsize=(5, 3.6))
            if param == "seed":
                pts = sorted((r["seed"], r[key] * scale) for r in per_run.values() if r["state"] == "finished")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
            else:
                others = [k for k in swept if k != param]
                line_of = lambda row: tuple(row[k] for k in others)  # noqa: E731
                for line, group in itertools.groupby(sorted(rows, key=lambda r: (line_of(r), r[param])), key=line_of):
                    group = list(group)
                    ax.errorbar([r[param] for r in group], [r[f"{key}_mean"] * scale for r in group],
                                yerr=[r[f"{key}_std"] * scale for r in group], marker="o", capsize=3,
                                label=", ".join(f"{k}={v:g}" for k, v in zip(others, line)) or None)
                values = meta[param]
                if param == "lr" and min(values) > 0 and max(values) / min(values) >= 10:
                    ax.set_xscale("log")
                if others:
                    ax.legend(fontsize=7)
            ax.set_xlabel(param)
            ax.set_ylabel(title)
            ax.set_title(f"{meta['model']} on {meta['preset']}: mean ± std over seeds", fontsize=9)
            fig.tight_layout()
            tmp = out / f"summary_{key}_vs_{param}.tmp.png"
            fig.savefig(tmp, dpi=100)
            plt.close(fig)
            os.replace(tmp, out / f"summary_{key}_vs_{param}.png")
