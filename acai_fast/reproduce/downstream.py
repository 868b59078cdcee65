"""`acai-fast reproduce probe|cluster`: the paper's downstream tables (Berthelot et al. 2019, the
linear-probe and the clustering tables) on MNIST, SVHN or CIFAR-10, trained and scored as the paper
does (SPEC.md section 5).

Every model trains on the dataset's training split (GPU-resident batches, acai_fast.data.batches)
with the linear probe on its detached latent; then
- probe: each run's number is the median of the probe's test accuracy over its last 20 evaluations
  (acai_fast.eval.stats.run_statistic; evaluations before those are skipped: they would cost
  time and change nothing);
- cluster: each run's number is the clustering accuracy of its final latents: the first 60,000
  training images fitted, the test set scored (acai_fast.eval.cluster, `restarts` K-means
  initialisations, 1000 in the paper);
then mean +- std over runs. Each model's runs (seeds) train together as arrays of runs
(acai_fast.reproduce.arrays, on acai_fast.sweep's machinery): run k of an array is the single run
with its seed; a run whose loss turns non-finite stops alone and is left out of the means (named
under the table). Outputs in OUT (P = the preset, e.g. mnist32):
    TASK_P_table.md            our numbers beside the paper's (SPEC.md section 4; n/a where SPEC has none)
    TASK_P_results.json        every number, per run and per model, and the settings
    TASK_P_interpolations.png  a grid of test-pair interpolations per model (first run)
    runs/P/MODEL/seedS/        each run's metrics.jsonl, checkpoint.pt, interpolations.png,
                               status.json, clustering.json; an existing run is continued, not retrained, so
                               `reproduce cluster` after `reproduce probe` with the same OUT reuses it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import PRESETS, ACAIConfig
from ..eval.stats import format_mean_std, markdown_table, mean_std, run_statistic, strict_json

TASKS = ("probe", "cluster")
DATASET_FAMILY = {"mnist": "mnist", "svhn": "svhn", "cifar10": "cifar"}  # dataset -> preset family
# ACAI's linear-probe test accuracy (%) as SPEC.md section 4 recalls it from the paper: (dataset,
# latent dims) -> number. SPEC gives no clustering numbers and none for other models: n/a.
PAPER_PROBE = {("mnist", 32): 98.25, ("mnist", 256): 99.00, ("svhn", 256): 85.14,
               ("cifar10", 256): 52.77, ("cifar10", 1024): 63.99}
PAPER = {"probe": {("acai",) + k: v for k, v in PAPER_PROBE.items()}, "cluster": {}}
WINDOW = 20  # the paper's per-run statistic: median of the last 20 evaluations
MAX_TRAIN_LATENTS = 60000  # the paper clusters the latents of up to 60,000 training images
SHOW_PAIRS = 8  # rows of each model's grid in TASK_P_interpolations.png


class DownstreamData(NamedTuple):
    """A dataset's splits as stored (acai_fast.data.load_pixels): uint8 images and int64 labels."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(dataset: str, folder: str | os.PathLike) -> DownstreamData:
    """`dataset`'s training and test splits from `folder` (FileNotFoundError or ValueError naming a
    missing or malformed file)."""
    from ..data import load_pixels

    if dataset not in DATASET_FAMILY:
        raise ValueError(f"dataset must be one of {', '.join(DATASET_FAMILY)}, got {dataset!r}")
    return DownstreamData(*load_pixels(dataset, folder, "train"), *load_pixels(dataset, folder, "test"))


@dataclasses.dataclass
class DownstreamRun:
    """One trained run: its number for the task, and what produced it."""
    model: str
    seed: int
    kimg: float
    value: float  # probe: median test accuracy of the last 20 evaluations; cluster: test accuracy
    seconds: float
    backend: str
    details: dict


def preset_for(dataset: str, latent: int) -> str:
    """The paper's preset for `dataset` at `latent` dims (e.g. mnist, 32 -> mnist32); ValueError
    listing the valid choices otherwise."""
    if dataset not in DATASET_FAMILY:
        raise ValueError(f"dataset must be one of {', '.join(DATASET_FAMILY)}, got {dataset!r}")
    family = DATASET_FAMILY[dataset]
    valid = [int(p[len(family):]) for p in PRESETS if p.startswith(family) and p[len(family):].isdigit()]
    if latent not in valid:
        raise ValueError(f"--latent for {dataset} must be one of {', '.join(map(str, valid))} "
                         f"(the paper's presets), got {latent}")
    return f"{family}{latent}"


def resolve_models(models) -> list[str]:
    """"all" (every model of acai_fast.models.MODELS, ACAI first), a comma-separated string or a
    list of names -> the validated list of names."""
    from ..models import MODELS
    from .arrays import resolve_models as resolve_in_order

    return resolve_in_order(models, ["acai"] + [m for m in MODELS if m != "acai"])


def check_arguments(task: str, dataset: str, latent: int, models="all", kimg: float = 16384,
                    runs: int = 1, eval_kimg: float = 64, restarts: int = 1000,
                    config_overrides: dict | None = None) -> tuple[ACAIConfig, list[str]]:
    """Validate reproduce_downstream's arguments before any data is read or anything trains
    (ValueError with the reason); returns the configuration and the model names."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    config = ACAIConfig.preset(preset_for(dataset, latent), **(config_overrides or {}))
    names = resolve_models(models)
    for name, value in (("kimg", kimg), ("eval_kimg", eval_kimg)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    for name, value in (("runs", runs), ("restarts", restarts)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if eval_kimg * 1024 < config.batch:
        raise ValueError(f"eval_kimg={eval_kimg:g} is less than one batch ({config.batch} images)")
    return config, names


def evaluation_points(total_img: int, eval_img: int, window: int = WINDOW) -> list[int]:
    """The image counts at which fit() evaluates (every eval_img, and at the end), last `window`
    of them only: the ones the per-run median reads."""
    points = list(range(eval_img, total_img, eval_img)) + [total_img]
    return points[-window:]


def reproduce_downstream(task: str, dataset: str, latent: int, data: str | os.PathLike | DownstreamData,
                         out: str | os.PathLike, *, models="all", kimg: float = 16384, runs: int = 1,
                         eval_kimg: float = 64, restarts: int = 1000, backend: str = "auto",
                         device=None, seed: int = 0, config_overrides: dict | None = None,
                         progress: bool = True, array: int | None = None, data_name: str | None = None) -> dict:
    """Train `runs` runs of each model on `dataset` at `latent` dims for `kimg` thousand (x1024)
    images, score them for `task` ("probe" or "cluster") as the paper does and write the table, the
    figure and per-run folders into `out` (see the module docstring). Run r has seed `seed + r`.
    Each model's runs train together as arrays of `array` runs (default:
    acai_fast.sweep.default_array_size; acai_fast.reproduce.arrays), run k of an array being the
    single run with its seed.

    data: the dataset folder (acai_fast.data.load_dataset) or its load_data(); restarts: K-means initialisations
    (cluster); config_overrides: ACAIConfig fields to change (tests use tiny networks; your own
    images' class count as nclass). data_name: `data` is your own images (acai_fast.data.images, as a
    DownstreamData) of this name: `dataset` and `latent` only choose the architecture, and the table
    names the data and quotes no paper numbers.
    Returns the dict written to TASK_P_results.json."""
    from ..checkpoint import check_output_folder
    from ..data.common import to_unit_range
    from ..eval.probe import probe_accuracy
    from ..progress import progress as progress_report
    from ..sweep import RunData, checkpoint_room, images_left, train_arrays
    from ..trainer import ACAITrainer, resolve_backend
    from .arrays import check_array, model_job, outcome, plan, resolve_device, reruns

    config, names = check_arguments(task, dataset, latent, models, kimg, runs, eval_kimg, restarts,
                                    config_overrides)
    check_array(array)
    dev = resolve_device(device)
    backend_name = resolve_backend(backend, dev)
    preset = preset_for(dataset, latent)
    x_train, y_train, x_test, y_test = data if isinstance(data, DownstreamData) else load_data(dataset, data)
    total_img, eval_img = int(round(kimg * 1024)), int(round(eval_kimg * 1024))
    run_img = -(-total_img // config.batch) * config.batch  # whole batches: what each run trains
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first_scored = evaluation_points(total_img, eval_img)[0]
    shown_pairs = min(SHOW_PAIRS, x_test.shape[0] // 2)  # a small test split of your own images: fewer rows
    preview = (to_unit_range(x_test[:shown_pairs]), to_unit_range(x_test[shown_pairs:2 * shown_pairs]))
    test_x = to_unit_range(x_test.to(dev))

    def evaluate(t):
        if t.nimg < first_scored:
            return {}
        return dict(test_probe_accuracy=probe_accuracy(t, test_x, y_test))

    source = RunData(config, (x_train, y_train, test_x, y_test), dev, evaluate=evaluate, preview=preview)
    jobs, plans, reruns_of = {}, {}, {}
    for name in names:  # every run folder checked before anything trains
        jobs[name] = model_job(config, name, source, out,
                               lambda r, name=name: out / "runs" / preset / name / f"seed{r.seed}",
                               run_img=run_img, eval_every=eval_img, backend=backend, device=dev,
                               what=f"reproduce {task}", label=f"{task} {preset}: {name} ")
        reruns_of[name] = reruns(config, seed, runs)
        plans[name] = plan(jobs[name], reruns_of[name], array)
    check_output_folder(out, sum(checkpoint_room(config, m, sum(len(g) for _, g in plans[m])) for m in names))

    bar = progress_report(sum(images_left(jobs[m], plans[m]) for m in names), enabled=progress, unit="img",
                          unit_scale=True, counts=False)
    results: dict[str, list[DownstreamRun]] = {m: [] for m in names}
    shown: dict[str, torch.Tensor] = {}
    try:
        for name in names:
            trained = train_arrays(jobs[name], plans[name], bar)
            for r, rerun in enumerate(reruns_of[name]):
                run_dir = jobs[name].folder_of(rerun)
                history, stopped = outcome(run_dir)
                info = trained.get(rerun)
                t0 = time.perf_counter()
                details = dict(probe=run_statistic(history, "test_probe_accuracy", WINDOW))
                trainer = None
                if stopped:
                    details.update(probe=float("nan"), stopped=stopped)
                else:
                    trainer = ACAITrainer.load(run_dir / "checkpoint.pt", device=dev, backend=backend)
                    if task == "cluster":
                        bar.set_description(f"{task} {preset}: {name} run {r + 1}/{runs} (k-means)")
                        details.update(_clustering(run_dir, trainer, x_train, y_train, x_test, y_test,
                                                   restarts, rerun.seed, progress))
                value = details["probe"] if task == "probe" else details.get("accuracy", float("nan"))
                kimg_done = round(trainer.nimg / 1024, 3) if trainer is not None else _read_kimg(history)
                run = DownstreamRun(name, rerun.seed, kimg_done, value,
                                    (info["seconds"] if info else 0.0) + time.perf_counter() - t0,
                                    info["backend"] if info else backend_name, details)
                results[name].append(run)
                if r == 0 and trainer is not None:
                    shown[name] = trainer.interpolate(*preview)
                how = f"array of {info['runs']}" if info else "already trained"
                bar.write(f"{name} run {r + 1}/{runs} (seed {rerun.seed}, {run.backend}, {how}, "
                          f"{run.kimg:g} kimg, {run.seconds:.0f} s): "
                          + (f"stopped: {stopped}" if stopped else f"{task} accuracy {value:.4f}"))
    finally:
        bar.close()

    settings = dict(task=task, dataset=data_name or dataset, own_data=data_name is not None, latent=latent,
                    preset=preset, kimg=kimg, runs=runs,
                    eval_kimg=eval_kimg, window=WINDOW, restarts=restarts if task == "cluster" else None,
                    seed=seed, device=str(dev), config=config.to_dict(),
                    train_images=int(x_train.shape[0]), test_images=int(x_test.shape[0]))
    summary = {m: dict(zip(("mean", "std"), mean_std(r.value for r in rs))) for m, rs in results.items()}
    record = dict(settings=settings, summary=summary,
                  runs=[dataclasses.asdict(r) for rs in results.values() for r in rs])
    stem = f"{task}_{preset}"
    with open(out / f"{stem}_results.json", "w") as f:
        json.dump(strict_json(record), f, indent=1)
    (out / f"{stem}_table.md").write_text(downstream_table(summary, settings, record["runs"]))
    save_interpolation_figure(shown, out / f"{stem}_interpolations.png", title=f"{preset} test pairs")
    return record


def _read_kimg(history: list[dict]) -> float:
    """The kimg of a run's last evaluation record (0 without one)."""
    return history[-1]["kimg"] if history else 0.0


def downstream_table(summary: dict, settings: dict, runs: list[dict] | None = None) -> str:
    """The Markdown table: one row per model, our mean +- std (%) beside the paper's number; runs
    (DownstreamRun dicts): those a non-finite loss stopped are named below it."""
    task, dataset, latent = settings["task"], settings["dataset"], settings["latent"]
    what = "linear probe test accuracy" if task == "probe" else "clustering test accuracy"
    header = ["model", "dataset", "latent dims", f"{what} (%), ours", "paper (%)"]
    rows = []
    for model, s in summary.items():
        paper = None if settings.get("own_data") else PAPER[task].get((model, dataset, latent))
        rows.append([model, dataset, latent, format_mean_std(s["mean"], s["std"], scale=100),
                     f"{paper:.2f}" if paper is not None else "n/a"])
    how = (f"median of the last {settings['window']} evaluations per run (every {settings['eval_kimg']:g} kimg)"
           if task == "probe" else
           f"final latents, K-means with {settings['restarts']} restarts on up to "
           f"{MAX_TRAIN_LATENTS:,} training latents, Hungarian-matched test accuracy")
    note = (f"\n{settings['runs']} run(s) per model, {settings['kimg']:g} kimg each (the paper: 16384), "
            f"on {settings['device']}; {how}; mean ± std over runs. Paper numbers: SPEC.md section 4"
            f"{'' if task == 'probe' else ' (which gives none for clustering)'}.\n")
    stopped = [f"{r['model']} seed {r['seed']}" for r in runs or [] if r["details"].get("stopped")]
    if stopped:
        note += (f"Stopped by a non-finite loss, left out of the means: {', '.join(stopped)} (their "
                 f"runs/{settings['preset']}/MODEL/seedS/status.json says why).\n")
    return f"### {task} accuracy, {settings['preset']}\n\n" + markdown_table(header, rows) + note


def save_interpolation_figure(images: dict[str, torch.Tensor], path, title: str = "") -> None:
    """One panel per model: rows of test-pair interpolations (first run), side by side."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..plotting import interpolation_grid

    if not images:
        return
    grids = {name: interpolation_grid(imgs) for name, imgs in images.items()}
    h, w = next(iter(grids.values())).shape[:2]
    # at least one screen pixel per image pixel: panels of w x h pixels at 100 dpi, plus titles
    fig, axes = plt.subplots(1, len(grids), figsize=(1.1 * w / 100 * len(grids), 1.1 * h / 100 + 0.8),
                             squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _clustering(run_dir: Path, trainer, x_train, y_train, x_test, y_test, restarts, seed,
                progress: bool = False) -> dict:
    """The run's clustering result, cached in run_dir/clustering.json for its (kimg, restarts, seed)."""
    from ..eval.cluster import evaluate_clustering

    cache = run_dir / "clustering.json"
    key = dict(nimg=trainer.nimg, restarts=restarts, seed=seed)
    if cache.exists():
        saved = json.loads(cache.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            return saved
    t0 = time.perf_counter()
    result = evaluate_clustering(trainer, x_train, y_train, x_test, y_test, restarts=restarts, seed=seed,
                                 max_train=MAX_TRAIN_LATENTS, progress=progress)
    result.update(key, seconds=round(time.perf_counter() - t0, 1))
    cache.write_text(json.dumps(result, indent=1))
    return result

