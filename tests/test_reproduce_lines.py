"""`acai-fast reproduce lines` (acai_fast/reproduce/lines.py): every model trained and scored in a tiny
setting, each model's runs as one array whose runs equal single-run training, the table in the
paper's shape with its numbers, the per-run statistic read from the evaluations, the figures, runs
continued and not retrained, and the command line's argument checks."""
import json
import math

import numpy as np
import pytest

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.cli import main
from acai_fast.eval.lines import evaluate_lines
from acai_fast.reproduce.lines import (LABELS, MODEL_ORDER, check_arguments, evaluation_points,
                                       reproduce_lines, resolve_models)
from helpers import TINY, read_jsonl, window_evaluations, write_run_folder

pytestmark = pytest.mark.usefixtures("one_thread")
PNG = b"\x89PNG"


def table_rows(text: str) -> dict[str, list[str]]:
    """A Markdown table's rows by their first cell."""
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}


def assert_same_history(recorded, single):
    """A reproduction's records of one run equal those of the run trained alone (fit): every key of
    fit's records but the speed, to float tolerance (NaN is written as null)."""
    assert [r["step"] for r in recorded] == [r["step"] for r in single]
    for a, b in zip(recorded, single):
        for key, value in b.items():
            if key == "images_per_s":
                continue
            if isinstance(value, float) and math.isnan(value):
                assert a[key] is None, key
            elif isinstance(value, float):
                assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (a["step"], key)
            else:
                assert a[key] == value, (a["step"], key)


def test_reproduce_lines_end_to_end(tmp_path):
    record = reproduce_lines(tmp_path, "all", kimg=4 * 6 / 1024, runs=2, eval_kimg=2 * 6 / 1024,
                             backend="reference", device="cpu", config=ACAIConfig(**TINY), pairs=4,
                             progress=False)
    assert list(record["summary"]) == list(MODEL_ORDER) and len(MODEL_ORDER) == 8
    table = (tmp_path / "lines_table.md").read_text()
    rows = table_rows(table)
    assert rows[""] == [LABELS[m] for m in MODEL_ORDER]  # the paper's column order, vae_acai last
    assert rows["Mean Distance (×10⁻³), paper"] == ["6.88"] + ["n/a"] * 5 + ["0.24", "not in paper"]
    assert rows["Mean Smoothness, paper"] == ["0.44"] + ["n/a"] * 5 + ["0.10", "not in paper"]

    for i, name in enumerate(MODEL_ORDER):
        per_run = []
        for seed in (0, 1):
            history = read_jsonl(tmp_path / "runs" / name / f"seed{seed}" / "metrics.jsonl")
            assert [r["step"] for r in history] == [2, 4] and all(r["model"] == name for r in history)
            distances = [r["mean_distance"] for r in history]
            per_run.append(float(np.median(distances)))  # both evaluations are in the window of 20
        summary = record["summary"][name]["mean_distance"]
        assert summary["runs"] == pytest.approx(per_run, rel=1e-12)
        assert summary["mean"] == pytest.approx(np.mean(per_run)) and summary["std"] == pytest.approx(np.std(per_run))
        cell = rows["Mean Distance (×10⁻³), ours"][i]
        assert cell == f"{np.mean(per_run) * 1e3:.2f} ± {np.std(per_run) * 1e3:.2f}", (name, cell)
    assert record["settings"]["backends"] == {m: "reference" for m in MODEL_ORDER}
    results = json.loads((tmp_path / "lines_results.json").read_text())
    assert results["settings"]["runs"] == 2 and len(results["runs"]) == 16
    for png in ("lines_interpolations.png", "lines_angles.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:4] == PNG and len(data) > 10_000, png

    # Each model's 2 runs trained as one array (the VQ-VAE's codebook buffer too); the second run of
    # an array equals the single run with its seed.
    for name in ("acai", "vae", "vqvae"):
        recorded = read_jsonl(tmp_path / "runs" / name / "seed1" / "metrics.jsonl")
        assert recorded[-1]["array_runs"] == 2 and recorded[-1]["seed"] == 1
        single = ACAITrainer(ACAIConfig(**TINY), backend="reference", device="cpu", seed=1, model=name)
        history = single.fit("lines", kimg=4 * 6 / 1024, eval_kimg=2 * 6 / 1024, progress=False,
                             evaluate=lambda t: evaluate_lines(t, pairs=4))
        assert_same_history(recorded, history)


def test_table_is_the_median_of_the_last_20_then_mean_and_population_std(tmp_path):
    """What the README says the lines table computes, on hand-made run folders (finished, so
    nothing trains): per run the median of its last 20 evaluations of each metric
    (window_evaluations: the last 19 or 21, all of them, their mean or the last one would each give
    another number), then the mean and the population standard deviation (ddof=0, numpy's default)
    over the model's runs; a run stopped by a non-finite loss is left out of both and named.

    Seeds 0 and 1 score Mean Distance 1e-3 and 3e-3 (mean 2e-3, std 1e-3; ddof=1 would give
    1.41e-3), Smoothness 0.2 and 0.4, probe accuracy 0.5 and 0.7; seed 2 stopped (50e-3 left out)."""
    scores = {0: (1e-3, 0.2, 0.5), 1: (3e-3, 0.4, 0.7), 2: (50e-3, 0.9, 0.1)}
    for seed, values in scores.items():
        stopped = dict(state="nonfinite", message="non-finite loss_ae (nan) at step 3") if seed == 2 else {}
        write_run_folder(tmp_path / "runs" / "acai" / f"seed{seed}",
                         {name: window_evaluations(v) for name, v in
                          zip(("mean_distance", "mean_smoothness", "probe_accuracy"), values)}, nimg=25 * 6, **stopped)
    record = reproduce_lines(tmp_path, "acai", kimg=25 * 6 / 1024, runs=3, eval_kimg=6 / 1024, backend="reference",
                             device="cpu", config=ACAIConfig(**TINY), pairs=4, progress=False)
    assert [r["seconds"] for r in record["runs"]] == [0.0] * 3  # nothing trained
    summary = record["summary"]["acai"]
    for key, (a, b), mean in (("mean_distance", (1e-3, 3e-3), 2e-3), ("mean_smoothness", (0.2, 0.4), 0.3),
                              ("probe_accuracy", (0.5, 0.7), 0.6)):
        runs = summary[key]["runs"]
        assert runs[:2] == pytest.approx([a, b], rel=1e-12) and math.isnan(runs[2]), key
        assert summary[key]["mean"] == pytest.approx(mean, rel=1e-12), key
        assert summary[key]["std"] == pytest.approx((b - a) / 2, rel=1e-12), key  # population std of two values
    assert summary["stopped"] == [2]
    table = (tmp_path / "lines_table.md").read_text()
    rows = table_rows(table)
    assert rows["Mean Distance (×10⁻³), ours"] == ["2.00 ± 1.00"]
    assert rows["Mean Smoothness, ours"] == ["0.30 ± 0.10"]
    assert rows["Linear probe accuracy (10 angle bins), ours"] == ["0.60 ± 0.10"]
    assert "Per run: the median of the last 20 evaluations; cells: mean ± std over runs" in table
    assert "left out of the means: ACAI seed 2" in table
    results = json.loads((tmp_path / "lines_results.json").read_text())
    assert results["summary"]["acai"]["mean_distance"]["runs"][2] is None  # NaN as null


def test_only_the_last_evaluations_are_run_and_scored_and_runs_continue(tmp_path):
    """Window 2, an evaluation point every step: the first two points are skipped (no metrics), and
    the run's number is the median of the last two. Called again, the run is not retrained; called
    for more kimg, it continues."""
    assert evaluation_points(24, 6, window=2) == [18, 24]
    assert evaluation_points(30, 12, window=20) == [12, 24, 30]
    record = reproduce_lines(tmp_path, "baseline", kimg=4 * 6 / 1024, runs=1, eval_kimg=6 / 1024, window=2,
                             backend="reference", device="cpu", config=ACAIConfig(**TINY), pairs=4,
                             progress=False)
    history = read_jsonl(tmp_path / "runs" / "baseline" / "seed0" / "metrics.jsonl")
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert ["mean_distance" in r for r in history] == [False, False, True, True]
    expected = np.median([history[2]["mean_smoothness"], history[3]["mean_smoothness"]])
    assert record["summary"]["baseline"]["mean_smoothness"]["mean"] == pytest.approx(expected)

    # Runs are continued, not retrained: the same call again trains nothing and writes the same
    # table; a longer one continues the run from its checkpoint.
    args = dict(kimg=4 * 6 / 1024, runs=1, eval_kimg=6 / 1024, window=2, backend="reference", device="cpu",
                config=ACAIConfig(**TINY), pairs=4, progress=False)
    checkpoint = tmp_path / "runs" / "baseline" / "seed0" / "checkpoint.pt"
    table = (tmp_path / "lines_table.md").read_text()
    stamp = checkpoint.stat().st_mtime_ns
    again = reproduce_lines(tmp_path, "baseline", **args)
    assert checkpoint.stat().st_mtime_ns == stamp and again["runs"][0]["seconds"] == 0.0
    assert again["summary"]["baseline"]["mean_distance"] == record["summary"]["baseline"]["mean_distance"]
    assert (tmp_path / "lines_table.md").read_text() == table
    longer = reproduce_lines(tmp_path, "baseline", **{**args, "kimg": 5 * 6 / 1024})
    assert read_jsonl(tmp_path / "runs" / "baseline" / "seed0" / "metrics.jsonl")[:4] == history
    assert [r["step"] for r in longer["runs"][0]["history"]] == [1, 2, 3, 4, 5]


def test_argument_checks():
    assert resolve_models("all") == list(MODEL_ORDER)
    assert resolve_models("acai, vae") == ["acai", "vae"]
    for bad, message in [("nope", "unknown model"), ("acai,acai", "twice"), ("", "unknown model")]:
        with pytest.raises(ValueError, match=message):
            resolve_models(bad)
    with pytest.raises(ValueError, match="runs must be a positive integer"):
        check_arguments("all", 1, 0, 1)
    with pytest.raises(ValueError, match="kimg must be a number > 0"):
        check_arguments("all", -1, 1, 1)
    with pytest.raises(ValueError, match="less than one batch"):
        check_arguments("all", 1, 1, 0.01)
    with pytest.raises(ValueError, match="needs a lines config"):
        check_arguments("all", 1, 1, 1, ACAIConfig.preset("mnist32"))


@pytest.mark.parametrize("argv, message", [
    (["--models", "acai,nope"], "unknown model"),
    (["--runs", "0"], "runs must be a positive integer"),
    (["--kimg", "0"], "must be > 0"),
    (["--eval-kimg", "0.01"], "less than one batch"),
    (["--backend", "magic"], "unknown backend"),
])
def test_cli_rejects_bad_arguments(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "lines", "--out", str(tmp_path / "x"), "--device", "cpu", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_reproduce_lines(tmp_path, capsys):
    """The command on the real lines preset: one step of one model, one full evaluation."""
    out = tmp_path / "table"
    assert main(["reproduce", "lines", "--models", "baseline", "--kimg", "0.0625", "--eval-kimg", "0.0625",
                 "--runs", "1", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| Mean Distance (×10⁻³), ours |" in printed and "6.88" in printed
    assert printed.strip() == (out / "lines_table.md").read_text().strip()
    assert (out / "lines_angles.png").read_bytes()[:4] == PNG
