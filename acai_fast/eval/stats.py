"""The paper's statistic over runs (SPEC.md section 4: per run the median of its last 20
evaluations, then mean +- std over re-runs) and Markdown tables: shared by sweeps and reproductions."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def run_statistic(history: Sequence[dict], key: str, last: int = 20) -> float:
    """The paper's per-run number (SPEC.md section 4): the median of `key` over the run's last
    `last` evaluations (fewer if the run has fewer); NaN/None values are skipped; NaN if none."""
    values = [r[key] for r in history[-last:] if r.get(key) is not None and not _isnan(r[key])]
    return float(np.median(values)) if values else float("nan")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and (population, as numpy's default) standard deviation over runs, NaNs skipped;
    (NaN, NaN) when nothing is left."""
    v = np.array([x for x in values if not _isnan(x)], dtype=np.float64)
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def format_mean_std(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    """'m +- s' (times scale), or 'n/a'."""
    if _isnan(mean):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _isnan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def strict_json(obj):
    """obj with every float NaN replaced by None, recursively (strict JSON: an undefined metric is null)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj
