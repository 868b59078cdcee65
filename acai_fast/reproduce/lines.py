"""`acai-fast reproduce lines`: the paper's lines table (Berthelot et al. 2019, Table 1) for ACAI,
its six baselines and the ACAI regulariser on a VAE, trained and scored as the paper does.

Every model trains on the lines stream (SPEC.md section 4) on the same networks; each run is scored
by the median of its last 20 evaluations (Mean Distance, Mean Smoothness), then mean +- std over
runs (acai_fast.eval.stats). Evaluations that cannot enter that median (before the last 20)
are skipped: they would cost time and change nothing in the table. Each model's runs (seeds) train
together as arrays of runs (acai_fast.reproduce.arrays, on acai_fast.sweep's machinery): run k of
an array is the single run with its seed. Outputs in OUT:
    lines_table.md            the paper's table shape, our numbers beside the paper's
    lines_results.json        every number, per run and per model
    lines_interpolations.png  one interpolation grid per model, side by side
    lines_angles.png          the decoded (nearest reference) angle against interpolation step
    runs/MODEL/seedS/         each run's metrics.jsonl, checkpoint.pt, interpolations.png and
                              status.json; an existing run is continued, not retrained (a stopped
                              reproduction continues where it stopped)
A run whose loss turns non-finite stops alone (the other runs go on); the table leaves it out of
its mean and names it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
import numpy as np
import torch

from ..config import ACAIConfig
from ..eval.stats import format_mean_std, markdown_table, mean_std, run_statistic, strict_json

# The paper's Table 1 column order, then the model beyond the paper.
PAPER_ORDER = ("baseline", "dropout", "denoising", "vae", "aae", "vqvae", "acai")
MODEL_ORDER = PAPER_ORDER + ("vae_acai",)
LABELS = dict(baseline="Baseline", dropout="Dropout", denoising="Denoising", vae="VAE", aae="AAE",
              vqvae="VQ-VAE", acai="ACAI", vae_acai="VAE + ACAI critic")
# (Mean Distance x10^3, Mean Smoothness) as SPEC.md section 4 recalls them from the paper; the
# paper's other columns are not in SPEC, so they print as n/a.
PAPER_LINES = dict(acai=(0.24, 0.10), baseline=(6.88, 0.44))
# Relative time of one training step on the reference backend, in tenths of the plain autoencoder's
# (measured on a 2-core CPU, batch 64): weights of the progress bar, so that its time-left estimate
# holds across models. Integers, so the bar's count is exact.
STEP_COST = dict(acai=40, vae_acai=27, vqvae=18)
DEFAULT_COST = 10
WINDOW = 20  # the paper's per-run statistic: median of the last 20 evaluations
SHOW_PAIRS = 8  # rows of each model's interpolation grid in lines_interpolations.png
ANGLE_PAIRS = 4  # interpolations per model in lines_angles.png


@dataclasses.dataclass
class LinesRun:
    """One trained run: its evaluation records and its per-run statistics (the window's medians)."""
    model: str
    seed: int
    history: list[dict]
    mean_distance: float
    mean_smoothness: float
    probe_accuracy: float
    seconds: float  # wall time of the array that trained it (0: trained before, not trained again)
    stopped: str | None = None  # why a non-finite loss stopped it (its numbers are then NaN)


def resolve_models(models) -> list[str]:
    """"all" (every model, in the paper's order, vae_acai last), a comma-separated string or a list
    of names -> the list of names, validated against acai_fast.models.MODELS."""
    from .arrays import resolve_models as resolve_in_order

    return resolve_in_order(models, MODEL_ORDER)


def check_arguments(models, kimg, runs, eval_kimg, config: ACAIConfig | None = None, pairs: int = 256,
                    window: int = WINDOW) -> list[str]:
    """Validate reproduce_lines' arguments before anything trains (ValueError with the reason);
    returns the model names."""
    names = resolve_models(models)
    config = config if config is not None else ACAIConfig.preset("lines")
    for name, value in (("kimg", kimg), ("eval_kimg", eval_kimg)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    for name, value in (("runs", runs), ("pairs", pairs), ("window", window)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.dataset != "lines":
        raise ValueError(f"reproduce lines needs a lines config, got dataset {config.dataset!r}")
    if eval_kimg * 1024 < config.batch:
        raise ValueError(f"eval_kimg={eval_kimg:g} is less than one batch ({config.batch} images)")
    return names


def evaluation_points(total_img: int, eval_img: int, window: int = WINDOW) -> list[int]:
    """The image counts at which fit() evaluates (every eval_img, and at the end), last `window` of
    them only: the ones the per-run median reads."""
    points = list(range(eval_img, total_img, eval_img)) + [total_img]
    return points[-window:]


def reproduce_lines(out: str | os.PathLike, models="all", kimg: float = 16384, runs: int = 3,
                    eval_kimg: float = 64, backend: str = "auto", device=None, seed: int = 0,
                    config: ACAIConfig | None = None, pairs: int = 256, window: int = WINDOW,
                    progress: bool = True, array: int | None = None) -> dict:
    """Train `runs` runs of each model on lines for `kimg` thousand (x1024) images, score them as
    the paper does and write the table, the figures and per-run folders into `out` (see the
    module docstring). Run r of every model has seed `seed + r`. Each model's runs train together
    as arrays of `array` runs (default: acai_fast.sweep.default_array_size; acai_fast.reproduce.arrays),
    run k of an array being the single run with its seed; a run already in out/runs is continued,
    not retrained.

    config: the networks and step (default: the lines preset); pairs: test pairs per evaluation
    (the paper: 256; fewer only to make tests quick); window: evaluations per run median (20).
    Returns the dict written to lines_results.json."""
    from ..checkpoint import check_output_folder
    from ..eval.lines import evaluate_lines
    from ..progress import progress as progress_report
    from ..sweep import RunData, checkpoint_room, images_left, train_arrays
    from ..trainer import resolve_backend
    from .arrays import WeightedBar, check_array, model_job, outcome, plan, resolve_device, reruns

    config = config if config is not None else ACAIConfig.preset("lines")
    names = check_arguments(models, kimg, runs, eval_kimg, config, pairs, window)
    check_array(array)
    dev = resolve_device(device)
    backend_name = resolve_backend(backend, dev)
    total_img, eval_img = int(round(kimg * 1024)), int(round(eval_kimg * 1024))
    run_img = -(-total_img // config.batch) * config.batch  # whole batches: what each run trains
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first_scored = evaluation_points(total_img, eval_img, window)[0]
    shown: dict[str, torch.Tensor] = {}  # model -> the last evaluation's images of its first run

    def evaluate(t):
        if t.nimg < first_scored:
            return {}
        metrics, images = evaluate_lines(t, pairs=pairs, return_images=True)
        if t.seed == seed and t.nimg >= run_img:
            shown[t.model.name] = images
        return metrics

    source = RunData(config, None, dev, pairs, evaluate)
    jobs, plans, reruns_of = {}, {}, {}
    for name in names:  # every run folder checked before anything trains
        jobs[name] = model_job(config, name, source, out, lambda r, name=name: out / "runs" / name / f"seed{r.seed}",
                               run_img=run_img, eval_every=eval_img, backend=backend, device=dev,
                               what="reproduce lines", label=f"{name} ")
        reruns_of[name] = reruns(config, seed, runs)
        plans[name] = plan(jobs[name], reruns_of[name], array)
    check_output_folder(out, sum(checkpoint_room(config, m, sum(len(g) for _, g in plans[m])) for m in names))

    work = sum(STEP_COST.get(m, DEFAULT_COST) * images_left(jobs[m], plans[m]) for m in names)
    bar = progress_report(work, enabled=progress, counts=False)  # weighted work units: no counts shown
    results: dict[str, list[LinesRun]] = {m: [] for m in names}
    try:
        for name in names:
            job = jobs[name]
            trained = train_arrays(job, plans[name], WeightedBar(bar, STEP_COST.get(name, DEFAULT_COST)))
            for r, rerun in enumerate(reruns_of[name]):
                history, stopped = outcome(job.folder_of(rerun))
                stats = {key: float("nan") if stopped else run_statistic(history, key, window)
                         for key in ("mean_distance", "mean_smoothness", "probe_accuracy")}
                info = trained.get(rerun)
                run = LinesRun(name, rerun.seed, history, **stats, seconds=info["seconds"] if info else 0.0,
                               stopped=stopped)
                results[name].append(run)
                how = (f"{backend_name}, array of {info['runs']}, {run.seconds:.0f} s" if info
                       else "already trained")
                bar.write(f"{name} run {r + 1}/{runs} (seed {rerun.seed}, {how}): " + (
                          f"stopped: {stopped}" if stopped else
                          f"Mean Distance x10^3 {run.mean_distance * 1e3:.3f}, Mean Smoothness "
                          f"{run.mean_smoothness:.3f}, probe accuracy {run.probe_accuracy:.3f}"), file=sys.stderr)
            if name not in shown:  # its first run was trained before (or stopped): from its checkpoint
                images = _final_images(job.folder_of(reruns_of[name][0]), dev, pairs)
                if images is not None:
                    shown[name] = images
    finally:
        bar.close()

    settings = dict(kimg=kimg, runs=runs, eval_kimg=eval_kimg, window=window, pairs=pairs, seed=seed,
                    device=str(dev), backends={m: backend_name for m in names}, batch=config.batch,
                    config=config.to_dict())
    summary = _summary(results)
    record = dict(settings=settings, summary=summary,
                  runs=[dataclasses.asdict(run) for rs in results.values() for run in rs])
    with open(out / "lines_results.json", "w") as f:
        json.dump(strict_json(record), f, indent=1)
    (out / "lines_table.md").write_text(lines_table(summary, settings))
    shown = {m: shown[m] for m in names if m in shown}  # the models' order
    save_interpolation_figure(shown, out / "lines_interpolations.png")
    save_angle_figure(shown, out / "lines_angles.png")
    return record


def _final_images(folder: Path, device, pairs: int):
    """The decoded test interpolations of the run in `folder` at its checkpoint (None without one)."""
    from ..eval.lines import evaluate_lines
    from ..trainer import ACAITrainer

    if not (folder / "checkpoint.pt").is_file():
        return None
    trainer = ACAITrainer.load(folder / "checkpoint.pt", device=device, backend="reference")
    return evaluate_lines(trainer, pairs=pairs, return_images=True)[1]


def _summary(results: dict[str, list[LinesRun]]) -> dict:
    summary = {}
    for name, rs in results.items():
        entry = {}
        for key in ("mean_distance", "mean_smoothness", "probe_accuracy"):
            mean, std = mean_std(getattr(run, key) for run in rs)
            entry[key] = dict(mean=mean, std=std, runs=[getattr(run, key) for run in rs])
        entry["stopped"] = [run.seed for run in rs if run.stopped]
        summary[name] = entry
    return summary


def lines_table(summary: dict, settings: dict) -> str:
    """The Markdown of lines_table.md: the paper's Table 1 shape (metrics as rows, models as
    columns), our mean +- std beside the paper's numbers, then probe accuracy and the settings."""
    names = list(summary)
    header = ["", *(LABELS.get(m, m) for m in names)]

    def paper(m, i):
        if m in PAPER_LINES:
            return f"{PAPER_LINES[m][i]:.2f}"
        return "n/a" if m in PAPER_ORDER else "not in paper"

    def ours(m, key, scale=1.0):
        s = summary[m][key]
        if key == "mean_smoothness" and s["mean"] != s["mean"]:  # NaN: no run had a defined score
            return "undefined"
        return format_mean_std(s["mean"], s["std"], scale=scale)

    rows = [["Mean Distance (×10⁻³), ours", *(ours(m, "mean_distance", 1e3) for m in names)],
            ["Mean Distance (×10⁻³), paper", *(paper(m, 0) for m in names)],
            ["Mean Smoothness, ours", *(ours(m, "mean_smoothness") for m in names)],
            ["Mean Smoothness, paper", *(paper(m, 1) for m in names)],
            ["Linear probe accuracy (10 angle bins), ours", *(ours(m, "probe_accuracy") for m in names)]]
    backends = ", ".join(sorted(set(settings["backends"].values())))
    text = [
        "# Lines benchmark (Berthelot et al. 2019, Table 1)\n",
        f"Each model trained {settings['kimg']:g} kimg ({settings['runs']} run(s), seeds {settings['seed']}.."
        f"{settings['seed'] + settings['runs'] - 1}, batch {settings['batch']}) on {settings['device']} "
        f"with the {backends} backend; evaluated every {settings['eval_kimg']:g} kimg on "
        f"{settings['pairs']} test pairs x 16 steps. Per run: the median of the last "
        f"{settings['window']} evaluations; cells: mean ± std over runs. The paper trains "
        f"16384 kimg; its numbers are those SPEC.md recalls (n/a: not recalled there).\n",
        markdown_table(header, rows),
        "Lower is better for both metrics (0 would be a perfect interpolation). Smoothness is "
        "undefined for an interpolation whose two ends decode to the same angle (counted as 0 beside "
        "defined ones; `undefined` when all are, e.g. a model that still decodes every latent to "
        "the mean image; SPEC.md section 4). `VAE + ACAI critic` is not in the paper "
        "(models/vae_acai.py).\n",
    ]
    stopped = [f"{LABELS.get(m, m)} seed {s}" for m in names for s in summary[m].get("stopped", [])]
    if stopped:
        text.append(f"Stopped by a non-finite loss, left out of the means: {', '.join(stopped)} "
                    f"(their runs/MODEL/seedS/status.json says why).\n")
    return "\n".join(text)


# ---------------------------------------------------------------------------------------- figures
def _grid_layout(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


def save_interpolation_figure(images: dict[str, torch.Tensor], path, pairs: int = SHOW_PAIRS) -> None:
    """One panel per model: its first `pairs` test interpolations (rows), 16 steps each, the same
    test pairs for every model. No images (no model has a checkpoint): no figure."""
    if not images:
        return
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..plotting import interpolation_grid

    rows, cols = _grid_layout(len(images))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.4 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, ims) in zip(axes.flat, images.items()):
        ax.imshow(interpolation_grid(ims[:pairs]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(LABELS.get(name, name))
    fig.suptitle("Lines: decoded latent interpolations (rows: test pairs; columns: 16 steps)")
    fig.tight_layout()
    _save(fig, path)


def save_angle_figure(images: dict[str, torch.Tensor], path, pairs: int = ANGLE_PAIRS) -> None:
    """One panel per model: the angle of the nearest reference line of each decoded step (unwrapped,
    degrees) for `pairs` interpolations; dashed: the evenly spaced path between the two ends that a
    perfectly smooth interpolation would follow. No images: no figure."""
    if not images:
        return
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..eval.lines import nearest_reference

    rows, cols = _grid_layout(len(images))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows + 0.4), squeeze=False,
                             sharex=True)
    for ax in axes.flat[len(images):]:
        ax.axis("off")
    for ax, (name, ims) in zip(axes.flat, images.items()):
        ims = ims[:pairs]
        steps = ims.shape[1]
        _, angles = nearest_reference(ims.flatten(0, 1))
        angles = np.degrees(np.unwrap(angles.cpu().numpy().reshape(len(ims), steps), axis=-1))
        t = np.arange(steps)
        for k, a in enumerate(angles):
            line, = ax.plot(t, a, marker=".", lw=1.2)
            ax.plot(t[[0, -1]], a[[0, -1]], ls="--", lw=0.8, color=line.get_color())
        ax.set_title(LABELS.get(name, name))
        ax.set_xlabel("interpolation step")
        ax.set_ylabel("decoded angle (deg)")
    fig.suptitle("Lines: decoded angle along interpolations (dashed: perfectly smooth)")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


__all__ = ["LABELS", "MODEL_ORDER", "PAPER_LINES", "PAPER_ORDER", "LinesRun", "check_arguments",
           "evaluation_points", "lines_table", "reproduce_lines", "resolve_models", "save_angle_figure",
           "save_interpolation_figure"]
