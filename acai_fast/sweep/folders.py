"""A sweep's folders: each run's status.json (training | finished | nonfinite) and metrics.jsonl,
written atomically; what is done, what a resumed run keeps, and whether `out` may take this sweep."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import ACAIConfig
from .plan import SWEPT, Run


def read_status(folder: Path) -> dict:
    """A run folder's status.json ({} when it has none): state (training | finished | nonfinite),
    nimg, kimg, step, message."""
    try:
        return json.loads((folder / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def read_records(path: Path) -> list[dict]:
    """A metrics.jsonl's records ([] when there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: Path, obj) -> None:
    """obj as JSON in `path`, atomically (a temporary file, then os.replace)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def write_status(folder: Path, state: str, step: int, batch: int, message: str | None = None, **extra) -> None:
    """A run folder's status.json: its state at `step` (nimg, kimg), and why, where a message says so."""
    status = dict(state=state, nimg=step * batch, kimg=round(step * batch / 1024, 3), step=step, **extra)
    if message is not None:
        status["message"] = message
    write_json(folder / "status.json", status)


def is_done(folder: Path, run_img: int) -> bool:
    """Finished (its images trained) or stopped for good (a non-finite loss)."""
    status = read_status(folder)
    return status.get("state") == "nonfinite" or (status.get("state") == "finished"
                                                   and status.get("nimg", 0) >= run_img)


def check_folder(out: Path, runs: list[Run], config: ACAIConfig, model: str, resume: bool) -> None:
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


def keep_records_until(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
