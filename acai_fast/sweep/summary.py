"""A sweep's summary, read from its run folders: out/summary.md and summary.csv (one row per
setting: per run the median of its last WINDOW evaluations of each metric, then the mean and the
population standard deviation (numpy's default, ddof=0) over the setting's finished runs) and a PNG
of each metric against each swept hyper-parameter."""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
from pathlib import Path

from ..eval.stats import format_mean_std, markdown_table, mean_std, run_statistic
from .folders import read_records, read_status
from .plan import SWEPT, Run, seed_ranges

WINDOW = 20  # the paper's per-run statistic: median of the last 20 evaluations
# (key, column title, scale) of the summary, in this order, where the runs have them.
METRICS = (("mean_distance", "Mean Distance (x10^3)", 1e3), ("mean_smoothness", "Mean Smoothness", 1.0),
           ("probe_accuracy", "Probe accuracy (%)", 100.0), ("rmse", "RMSE (pixels)", 1.0))


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
             f"seeds {seed_ranges(meta['seeds'])}\n\n")
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
