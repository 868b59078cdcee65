"""Training a sweep's runs as arrays (shared with acai_fast.reproduce): a Job (model, data as a
RunData, run length, each run's folder), plan_arrays (what the folders still need, as arrays,
checked before anything trains), train_arrays (the one array loop: steps, each run's losses watched
for non-finite values, evaluations, checkpoints, status.json, stops by a signal)."""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checkpoint import load_checkpoint
from ..config import ACAIConfig
from ..run_control import CONTROL_EVERY_GPU, StopSignals, TrainingStopped, run_settings, write_outputs
from ..trainer import ACAITrainer, RunArray, resolve_backend
from .folders import is_done, keep_records_until, write_status
from .plan import Run, describe

PREVIEW_PAIRS = 16  # rows of each run's interpolations.png
_TEST_LIMIT = {"celeba": 2048}  # CelebA's "test" split is its training set: previews need only a few


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
            from ..data.lines import draw_lines
            from ..eval.lines import eval_pairs

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
            from ..eval.probe import probe_accuracy
            self.evaluate = lambda t: dict(probe_accuracy=probe_accuracy(t, x_test, y_test))
        else:  # CelebA: no labels, no probe to score
            self.evaluate = lambda t: {}

    def _load(self, data):
        from ..data import data_folder, dataset_of_preset, load_dataset, load_pixels

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
            from ..data.lines import lines_batches
            return lines_batches(self.config.batch, seed=run.seed, device=self.device, start_step=start_step)
        from ..data import DeviceBatches
        return DeviceBatches(self.images, self.labels, batch=self.config.batch, seed=run.seed,
                             device=self.device, start_step=start_step)


def _lines_evaluation(trainer, pairs: int) -> dict:
    from ..eval.lines import evaluate_lines
    return evaluate_lines(trainer, pairs=pairs)


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


# ------------------------------------------------------------------------------------------------
# Jobs: arrays planned from the run folders, built, trained
# ------------------------------------------------------------------------------------------------


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
        if not is_done(folder, job.run_img):
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
    interpolations.png and status.json (acai_fast.sweep's docstring). bar: an acai_fast.progress
    report, advanced by each step's images of all runs; stop: acai_fast.run_control.StopSignals installed by
    the caller, or None: SIGINT/SIGTERM are handled here (each running run checkpointed, then TrainingStopped).
    Returns, for each run trained, its array's dict(seconds (its wall time), runs, backend)."""
    own = stop is None
    if own:
        stop = StopSignals(True)
        stop.install()
    trained: dict[Run, dict] = {}
    try:
        for i, (steps, group) in enumerate(groups):
            if steps * job.config.batch >= job.run_img:  # checkpointed at the end, no status saying so
                for run in group:
                    write_status(job.folder_of(run), "finished", steps, job.config.batch)
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
        keep_records_until(folder / "metrics.jsonl", steps)
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


# ------------------------------------------------------------------------------------------------
# Training one array
# ------------------------------------------------------------------------------------------------


def _train_array(job: Job, array: RunArray, runs: list[Run], bar, stop) -> None:
    """Train `array` (its runs: `runs`) to job.run_img images per run, evaluating every
    job.eval_every and at the end; each evaluation appends a record to each live run's metrics.jsonl
    and writes its checkpoint, interpolations.png and status.json (and TensorBoard events)."""
    from ..tensorboard_log import TensorBoardLog

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
                        write_status(folders[k], "training", array.steps, batch)
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
    its metrics.jsonl with its checkpoint (run_control.write_outputs), and its interpolations.png (and
    TensorBoard events) from one interpolation of the preview pairs."""
    from ..plotting import save_interpolation_grid

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
    write_status(folder, "finished" if array.nimg >= job.run_img else "training", array.steps,
                  array.config.batch)


def _stop_run(job: Job, folder: Path, run: Run, array: RunArray, step: int, name: str, value: float, saved,
              bar) -> None:
    kept = (f"its last good checkpoint (step {saved}) is kept" if saved is not None
            else "it had written no checkpoint")
    message = (f"non-finite {name} ({value}) at step {step}: the run stopped alone, the other runs of "
               f"its array went on; {kept}")
    write_status(folder, "nonfinite", step, array.config.batch, message, loss=name, value=str(value))
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
