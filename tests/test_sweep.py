"""Sweeps (acai_fast.sweep, `acai-fast sweep`): seeds x hyper-parameters trained as arrays of runs,
one folder per run, the summary; a stopped sweep resumes exactly and a finished one is not
retrained; a run whose loss turns non-finite stops alone; image data; TensorBoard events; the
command line and a real 2-process torchrun job. CPU, reference backend, tiny networks."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.checkpoint import load_checkpoint
from acai_fast.cli import main
from acai_fast.eval.lines import evaluate_lines
from acai_fast.eval.probe import probe_accuracy
from acai_fast.loop import TrainingStopped
from acai_fast.sweep import (CPU_ARRAY, Run, SweepArgumentError, default_array_size, describe, parameter_count,
                             plan_runs, rank_share, run_memory_bytes, summarize, sweep)
from helpers import ROOT, TINY, assert_close, read_jsonl, window_evaluations, write_idx, write_run_folder

pytestmark = pytest.mark.usefixtures("one_thread")
STEP = 6 / 1024  # kimg of one step of a TINY run
COMMON = dict(kimg=3 * STEP, eval_kimg=2 * STEP, backend="reference", device="cpu", overrides=TINY, progress=False)


def records(folder: Path) -> list[dict]:
    return read_jsonl(folder / "metrics.jsonl")


def status(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text())


def quick_lines(trainer):
    return evaluate_lines(trainer, pairs=4)


def test_sweep_stops_resumes_exactly_and_skips_finished_runs(tmp_path):
    """4 runs (advweight 0.5, 1 x seeds 0, 1) in arrays of 3 and 1, 3 steps each, evaluated at steps
    2 and 3. A SIGINT during the first array's evaluation at step 2 stops the sweep (checkpoints
    written, the second array never started); resume=True finishes every run: each run's records
    are those of one uninterrupted run, a resumed run's weights equal a single run's trained
    alone, TensorBoard curves do not double back; a third call retrains nothing."""
    out = tmp_path / "sweep"
    calls, interrupt = [], [True]

    def evaluate(trainer):
        calls.append(trainer.seed)
        if len(calls) == 2 and interrupt and interrupt.pop():  # once: during the first array's first evaluation
            signal.raise_signal(signal.SIGINT)
        return quick_lines(trainer)

    args = dict(COMMON, advweight=[0.5, 1.0], out=out, array=3, evaluate=evaluate, tensorboard=True)
    with pytest.raises(TrainingStopped) as stopped:
        sweep("lines", [0, 1], **args)
    assert stopped.value.exit_code == 128 + signal.SIGINT and "resume" in str(stopped.value)
    runs = plan_runs(ACAIConfig.preset("lines", **TINY), [0, 1], advweight=[0.5, 1.0])
    names = [r.name for r in runs]
    assert names[0] == "advweight=0.5_reg=0.2_lr=0.0001_seed=0"
    first, second = names[:3], names[3]
    for name in first:
        assert [r["step"] for r in records(out / name)] == [2]
        assert load_checkpoint(out / name / "checkpoint.pt")["steps"] == 2 and status(out / name)["state"] == "training"
    assert not (out / second / "checkpoint.pt").exists()

    calls.clear()
    result = sweep("lines", [0, 1], **args, resume=True)
    assert len(calls) == 3 + 2  # the first array's last evaluation, the second array's two
    for run in runs:
        folder = out / run.name
        recs = records(folder)
        assert [r["step"] for r in recs] == [2, 3] and status(folder)["state"] == "finished"
        assert {k: recs[-1][k] for k in ("seed", "advweight", "reg", "lr")} == run.as_dict()
        for key in ("loss_ae", "loss_disc", "rmse", "mean_distance", "mean_smoothness", "probe_accuracy",
                    "images_per_s", "model", "batch", "array_runs"):
            assert key in recs[-1], key
        assert (folder / "interpolations.png").read_bytes()[:4] == b"\x89PNG"
    assert records(out / first[0])[-1]["array_runs"] == 3 and records(out / second)[-1]["array_runs"] == 1

    # A resumed run (in the interrupted array) equals the single run with its seed and settings.
    resumed = runs[2]
    assert resumed.name in first and resumed.advweight == 1.0
    single = ACAITrainer(ACAIConfig.preset("lines", **TINY, advweight=1.0), backend="reference", device="cpu",
                         seed=resumed.seed)
    history = single.fit("lines", kimg=3 * STEP, eval_kimg=2 * STEP, evaluate=quick_lines, progress=False)
    swept = ACAITrainer.load(out / resumed.name / "checkpoint.pt", device="cpu")
    assert swept.steps == single.steps == 3
    for (name, p), q in zip(swept.model.named_parameters(), single.model.parameters()):
        assert_close(p, q, atol=1e-6, rtol=1e-5, name=name)
    for a, b in zip(records(out / resumed.name), history):
        assert_close(torch.tensor(a["loss_ae"]), torch.tensor(b["loss_ae"]), atol=1e-7, rtol=1e-5, name="loss_ae")

    # The summary: one row per setting over its 2 seeds, and the plots against advweight.
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(float(r["advweight"]), int(r["finished"]), int(r["nonfinite"])) for r in rows] == [(0.5, 2, 0),
                                                                                                (1.0, 2, 0)]
    per_run = result["runs"]
    seeds_of = [per_run[n]["mean_distance"] for n in names[2:]]
    assert float(rows[1]["mean_distance_mean"]) == pytest.approx(sum(seeds_of) / 2)
    md = (out / "summary.md").read_text()
    assert "| 1 | 0.2 | 0.0001 | 2/2 |" in md and "Mean Distance (x10^3)" in md
    for metric in ("mean_distance", "mean_smoothness", "probe_accuracy", "rmse"):
        assert (out / f"summary_{metric}_vs_advweight.png").read_bytes()[:4] == b"\x89PNG"

    # TensorBoard: every run has events; the resumed run's curve has steps 12 and 18 once each.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for name in names:
        assert list((out / name).glob("events.out.tfevents.*")), name
    board = EventAccumulator(str(out / resumed.name))
    board.Reload()
    assert [e.step for e in board.Scalars("eval/mean_distance")] == [12, 18]
    assert "train/loss_ae" in board.Tags()["scalars"] and board.Tags()["images"] == ["interpolations"]

    # A finished sweep is not retrained.
    stamps = {n: (out / n / "checkpoint.pt").stat().st_mtime_ns for n in names}
    calls.clear()
    sweep("lines", [0, 1], **{**args, "resume": True})
    assert calls == [] and stamps == {n: (out / n / "checkpoint.pt").stat().st_mtime_ns for n in names}
    # Without resume a folder holding the sweep is refused, before anything trains.
    with pytest.raises(SweepArgumentError, match="resume"):
        sweep("lines", [0, 1], **{**args, "resume": False})


def test_nonfinite_run_stops_alone(tmp_path, capsys):
    """lr 1e10 makes one run's losses NaN from its second step: it stops (its folder, the summary
    and stderr say so) while the other run of its array trains and evaluates to the end."""
    out = tmp_path / "sweep"
    result = sweep("lines", [0], lr=[1e-4, 1e10], out=out, **dict(COMMON, eval_kimg=STEP), pairs=4)
    good, bad = (out / Run(0, 0.5, 0.2, lr).name for lr in (1e-4, 1e10))
    assert status(good)["state"] == "finished" and [r["step"] for r in records(good)] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss_ae"])) for r in records(good))
    st = status(bad)
    assert st["state"] == "nonfinite" and st["step"] == 2 and "stopped alone" in st["message"]
    assert [r["step"] for r in records(bad)] == [1]  # recorded until its last finite interval
    assert load_checkpoint(bad / "checkpoint.pt")["steps"] == 1  # its last good checkpoint stays
    assert "non-finite" in capsys.readouterr().err
    rows = {float(r["lr"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    assert (rows[1e10]["finished"], rows[1e10]["nonfinite"]) == ("0", "1")
    assert (rows[1e-4]["finished"], rows[1e-4]["nonfinite"]) == ("1", "0")
    md = (out / "summary.md").read_text()
    assert "Stopped runs" in md and "seeds 0" in md and result["runs"][bad.name]["state"] == "nonfinite"
    assert (out / "summary_mean_distance_vs_lr.png").is_file()


def test_summary_is_the_median_of_the_last_20_then_mean_and_population_std(tmp_path):
    """What the README says summary.md and summary.csv hold, on hand-made run folders: per run the
    median of its last 20 evaluations of each metric (window_evaluations: the last 19 or 21, all of
    them, their mean or the last one would each give another number), then per setting the mean and
    the population standard deviation (ddof=0, numpy's default: sqrt(sum (x - mean)^2 / n)) over
    its finished runs. A run stopped by a non-finite loss and an unfinished run are counted, not
    averaged; a metric no run has (rmse here) gets no column.

    advweight 0.5: seeds 0 and 1 score Mean Distance 1e-3 and 3e-3 (mean 2e-3, std 1e-3; ddof=1
    would give 1.414e-3), Smoothness 0.2 and 0.4, probe 0.5 and 0.7; seed 2 stopped (its 50e-3
    left out). advweight 1: seeds 0 and 1 score alike (std 0); seed 2 is still training."""
    config = ACAIConfig.preset("lines", **TINY)
    runs = plan_runs(config, [0, 1, 2], advweight=[0.5, 1.0])
    total = 25 * 6
    scores = {(0.5, 0): (1e-3, 0.2, 0.5), (0.5, 1): (3e-3, 0.4, 0.7), (0.5, 2): (50e-3, 0.9, 0.1),
              (1.0, 0): (2e-3, 0.1, 0.9), (1.0, 1): (2e-3, 0.1, 0.9), (1.0, 2): (9e-3, 0.9, 0.1)}
    state = {(0.5, 2): dict(state="nonfinite", message="non-finite loss_ae (nan) at step 3"),
             (1.0, 2): dict(state="training", nimg=total // 2)}
    for run in runs:
        key = (run.advweight, run.seed)
        metrics = {name: window_evaluations(v) for name, v in
                   zip(("mean_distance", "mean_smoothness", "probe_accuracy"), scores[key])}
        write_run_folder(tmp_path / run.name, metrics, **{"nimg": total, **state.get(key, {})})
    meta = dict(preset="lines", model="acai", config=config.to_dict(), seeds=[0, 1, 2], advweight=[0.5, 1.0],
                reg=[0.2], lr=[1e-4], kimg=total / 1024, eval_kimg=6 / 1024, total_img=total, pairs=4, window=20,
                runs=[r.as_dict() for r in runs])
    (tmp_path / "sweep.json").write_text(json.dumps(meta))

    result = summarize(tmp_path)
    assert result["runs"][runs[0].name]["mean_distance"] == pytest.approx(1e-3, rel=1e-12)  # the run's median
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert list(rows[0]) == ["advweight", "reg", "lr", "runs", "finished", "nonfinite", "unfinished",
                             "mean_distance_mean", "mean_distance_std", "mean_smoothness_mean",
                             "mean_smoothness_std", "probe_accuracy_mean", "probe_accuracy_std"]
    expected = [dict(advweight=0.5, runs=3, finished=2, nonfinite=1, unfinished=0,
                     mean_distance=(2e-3, 1e-3), mean_smoothness=(0.3, 0.1), probe_accuracy=(0.6, 0.1)),
                dict(advweight=1.0, runs=3, finished=2, nonfinite=0, unfinished=1,
                     mean_distance=(2e-3, 0.0), mean_smoothness=(0.1, 0.0), probe_accuracy=(0.9, 0.0))]
    for row, want in zip(rows, expected, strict=True):
        assert (float(row["advweight"]), float(row["reg"]), float(row["lr"])) == (want["advweight"], 0.2, 1e-4)
        assert [int(row[k]) for k in ("runs", "finished", "nonfinite", "unfinished")] == \
            [want[k] for k in ("runs", "finished", "nonfinite", "unfinished")]
        for metric in ("mean_distance", "mean_smoothness", "probe_accuracy"):
            mean, std = want[metric]
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-15), metric
            assert float(row[f"{metric}_std"]) == pytest.approx(std, rel=1e-12, abs=1e-15), metric
    assert float(rows[0]["mean_distance_std"]) != pytest.approx(math.sqrt(2) * 1e-3)  # not ddof=1
    md = (tmp_path / "summary.md").read_text()
    assert "Per run the median of its last 20 evaluations" in md and "RMSE" not in md
    assert "| 0.5 | 0.2 | 0.0001 | 2/3 | 2.000 ± 1.000 | 0.300 ± 0.100 | 60.0 ± 10.0 | seeds 2 |" in md
    assert "| 1 | 0.2 | 0.0001 | 2/3 (1 unfinished) | 2.000 ± 0.000 | 0.100 ± 0.000 | 90.0 ± 0.0 |  |" in md


def test_image_data_runs_score_the_probe(tmp_path):
    """An image preset on in-memory data: each run trains on its own seeded DeviceBatches order and
    its records carry the linear probe's test accuracy (that of its saved checkpoint)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (24, 1, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (24,), generator=g)
    x_test = torch.rand(8, 1, 32, 32, generator=g) * 2 - 1
    y_test = torch.randint(0, 10, (8,), generator=g)
    out = tmp_path / "sweep"
    sweep("mnist32", [3], out=out, data=(x, y, x_test, y_test), **dict(COMMON, kimg=2 * STEP))
    folder = out / Run(3, 0.5, 0.2, 1e-4).name
    rec = records(folder)[-1]
    trained = ACAITrainer.load(folder / "checkpoint.pt", device="cpu")
    assert rec["probe_accuracy"] == probe_accuracy(trained, x_test, y_test) and "mean_distance" not in rec
    assert "Probe accuracy (%)" in (out / "summary.md").read_text()
    assert (out / "summary_probe_accuracy_vs_seed.png").is_file()  # seeds alone: against the seed


def test_plan_share_and_array_size():
    cfg = ACAIConfig.preset("lines")
    runs = plan_runs(cfg, [0, 1], advweight=[0, 1], lr=[1e-4, 3e-4])
    assert len(runs) == 8 and runs[0] == Run(0, 0.0, 0.2, 1e-4) and runs[-1] == Run(1, 1.0, 0.2, 3e-4)
    assert [r.lr for r in runs[:4]] == [1e-4] * 4  # ordered by lr first: an array's runs share one Adam
    assert describe(runs[:4]) == "advweight=0,1 reg=0.2 lr=0.0001 seed=0-1"
    shares = [rank_share(runs, r, 3) for r in range(3)]
    assert sorted(sum(shares, []), key=runs.index) == runs and [len(s) for s in shares] == [3, 3, 2]
    for bad, match in [(dict(seeds=[]), "empty"), (dict(seeds=[1, 1]), "twice"), (dict(seeds=[-1]), "seeds"),
                       (dict(advweight=[-1]), "advweight"), (dict(lr=[0]), "lr"), (dict(reg=["x"]), "number")]:
        with pytest.raises(ValueError, match=match):
            plan_runs(cfg, **{"seeds": [0], **bad})
    # The documented estimate, by hand for lines: SPEC's parameter counts plus the probe (64*10+10);
    # an encoder's conv outputs per image: 16*1024 + 2*(16*1024 + 32*256 + 64*64 + 128*16) + 256*4 + 16*4.
    params = 627_472 + 313_985 + 627_472 + 650
    assert parameter_count(cfg) == params
    assert run_memory_bytes(cfg) == 16 * params + 64 * 4 * 3 * 5 * 78_912
    assert default_array_size(cfg, "cpu") == CPU_ARRAY


def test_cli_sweep_runs_resumes_and_refuses_bad_values(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--preset", "lines", "--seeds", "0-1", "--reg", "0.2", "--kimg", str(2 * STEP),
            "--eval-kimg", str(2 * STEP), "--batch", "6", "--depth", "4", "--latent", "3", "--advdepth", "5",
            "--pairs", "4", "--array", "2", "--backend", "reference", "--device", "cpu", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "| 0.5 | 0.2 | 0.0001 | 2/2 |" in captured.out
    assert [r["seed"] for r in (records(out / Run(s, 0.5, 0.2, 1e-4).name)[-1] for s in (0, 1))] == [0, 1]
    assert main(argv + ["--resume"]) == 0  # finished: nothing to train, the summary again
    for bad, message in [(["--seeds", "3-1"], "seed range"), (["--seeds", "a"], "seeds like"),
                         (["--advweight", "0,x"], "numbers"), (["--advweight", "0,-1"], "advweight"),
                         (["--lr", "1e-4,1e-4"], "twice"), (["--array", "0"], "array"), ([], "already holds")]:
        with pytest.raises(SystemExit) as exc:
            main(argv + bad)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, (bad, err)


def test_train_tensorboard_flag(tmp_path):
    """`acai-fast train --tensorboard` (mnist32 format files: the probe is the evaluation): each
    evaluation's scalars and the interpolation grid as events in OUT."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    data.mkdir()
    write_idx(data, "train", 24, 0)
    write_idx(data, "t10k", 8, 1)
    out = tmp_path / "run"
    assert main(["train", "--preset", "mnist32", "--data", str(data), "--kimg", str(2 * STEP), "--eval-kimg",
                 str(STEP), "--batch", "6", "--depth", "4", "--latent", "3", "--advdepth", "5", "--backend",
                 "reference", "--device", "cpu", "--out", str(out), "--no-progress", "--tensorboard"]) == 0
    board = EventAccumulator(str(out))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss_ae")] == [6, 12]
    probe = [r["probe_accuracy"] for r in read_jsonl(out / "metrics.jsonl")]
    assert [e.value for e in board.Scalars("eval/probe_accuracy")] == pytest.approx(probe)
    assert board.Tags()["images"] == ["interpolations"]


def test_torchrun_two_ranks_share_the_runs(tmp_path):
    """`torchrun --nproc_per_node=2 -m acai_fast.cli sweep` on the CPU (gloo): rank 0 trains seeds 0
    and 2, rank 1 seed 1 (runs[r::2]); rank 0 writes the summary once every run is done."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "acai_fast.cli", "sweep", "--preset", "lines", "--seeds", "0-2", "--kimg", str(STEP),
           "--eval-kimg", str(STEP), "--batch", "6", "--depth", "4", "--latent", "3", "--advdepth", "5",
           "--pairs", "4", "--backend", "reference", "--device", "cpu", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| 0.5 | 0.2 | 0.0001 | 3/3 |") == 1  # rank 0 alone printed the summary
    for s in (0, 1, 2):  # each run trained once (a run trained by both ranks would have two lines)
        folder = out / Run(s, 0.5, 0.2, 1e-4).name
        assert [r["step"] for r in records(folder)] == [1] and status(folder)["state"] == "finished"
