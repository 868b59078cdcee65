"""`reproduce probe|cluster` end to end on the CPU in a tiny setting (tables, JSON, figure, runs
reused, a model's runs trained as one array whose runs equal single-run training), `evaluate --data`
writing probe and clustering accuracy beside the checkpoint, and `train` on SVHN, CIFAR-10 and
CelebA files written here in their official formats."""
import json
import pickle
import re

import numpy as np
import pytest
import torch

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.cli import main
from acai_fast.data import DeviceBatches
from acai_fast.data.common import to_unit_range
from acai_fast.eval.probe import probe_accuracy
from acai_fast.reproduce.downstream import (DownstreamData, evaluation_points, load_data, preset_for,
                                            reproduce_downstream)
from helpers import read_jsonl, window_evaluations, write_idx, write_jpegs, write_run_folder, write_svhn

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(depth=4, advdepth=5, batch=16)  # on mnist32's networks (latent 2 x 4 x 4)


@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    write_idx(folder, "train", 96, rng)
    write_idx(folder, "t10k", 40, rng)
    return folder


def test_probe_then_cluster_tables_figure_and_reused_runs(mnist_folder, tmp_path):
    out = tmp_path / "out"
    args = dict(models="acai", kimg=0.03125, runs=2, eval_kimg=0.015625, restarts=3, device="cpu",
                config_overrides=TINY, progress=False)
    probe = reproduce_downstream("probe", "mnist", 32, mnist_folder, out, **args)
    run0 = out / "runs" / "mnist32" / "acai" / "seed0"
    records = read_jsonl(run0 / "metrics.jsonl")
    assert [r["kimg"] for r in records] == [0.016, 0.031]
    # the run's number: the median of the probe's test accuracy over its (here 2) evaluations
    assert probe["runs"][0]["value"] == pytest.approx(np.median([r["test_probe_accuracy"] for r in records]))
    assert [r["seed"] for r in probe["runs"]] == [0, 1] and probe["settings"]["train_images"] == 96
    values = [r["value"] for r in probe["runs"]]
    assert probe["summary"]["acai"]["mean"] == pytest.approx(np.mean(values))
    table = (out / "probe_mnist32_table.md").read_text()
    assert "| acai | mnist | 32 | " in table and "| 98.25 |" in table  # SPEC's number beside ours
    assert f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}" in table
    png = (out / "probe_mnist32_interpolations.png").read_bytes()
    assert png[:4] == b"\x89PNG"

    # The 2 runs trained as one array; the second equals the single run with its seed (fit, its
    # DeviceBatches order): every key of fit's records but the speed.
    recorded = read_jsonl(out / "runs" / "mnist32" / "acai" / "seed1" / "metrics.jsonl")
    assert [r["array_runs"] for r in recorded] == [2, 2]
    data = load_data("mnist", mnist_folder)
    test_x = to_unit_range(data.x_test)
    single = ACAITrainer(ACAIConfig.preset("mnist32", **TINY), backend="reference", device="cpu", seed=1)
    history = single.fit(DeviceBatches(data.x_train, data.y_train, batch=16, seed=1, device="cpu"), kimg=0.03125,
                         eval_kimg=0.015625, progress=False,
                         evaluate=lambda t: dict(test_probe_accuracy=probe_accuracy(t, test_x, data.y_test)))
    assert len(recorded) == len(history) == 2
    for a, b in zip(recorded, history):
        for key, value in b.items():
            if key != "images_per_s":
                assert a[key] == (pytest.approx(value, rel=1e-5, abs=1e-7) if isinstance(value, float) else value), key

    cluster = reproduce_downstream("cluster", "mnist", 32, mnist_folder, out, **args)
    assert read_jsonl(run0 / "metrics.jsonl") == records  # the trained runs were reused, not retrained
    details = json.loads((run0 / "clustering.json").read_text())
    assert details["restarts"] == 3 and details["nimg"] == 32 and details["k"] == 10
    assert cluster["runs"][0]["value"] == details["accuracy"] and 0 <= details["accuracy"] <= 1
    table = (out / "cluster_mnist32_table.md").read_text()
    assert "| acai | mnist | 32 | " in table and table.count("| n/a |") == 1  # SPEC has no clustering numbers
    assert "3 restarts" in table and (out / "cluster_mnist32_results.json").is_file()

    with pytest.raises(ValueError, match="holds another run"):  # another configuration, same folder
        reproduce_downstream("probe", "mnist", 32, mnist_folder, out, **{**args, "config_overrides": dict(TINY, depth=8)})


def test_probe_table_is_the_median_of_the_last_20_then_mean_and_population_std(tmp_path):
    """What the README says the probe table computes, on hand-made run folders (finished, so
    nothing trains; each with a checkpoint of its seed, as a trained run has): per run the median of
    its probe test accuracy over its last 20 evaluations (window_evaluations: the last 19 or 21, all
    of them, their mean or the last one would each give another number), then the mean and the
    population standard deviation (ddof=0, numpy's default) over the model's runs, in %; a run
    stopped by a non-finite loss is left out of both and named. Seeds 0 and 1 score 0.5 and 0.7:
    60.00 ± 10.00 (ddof=1 would give ± 14.14); seed 2 stopped (0.1 left out)."""
    config = ACAIConfig.preset("mnist32", **TINY)
    for seed, value in ((0, 0.5), (1, 0.7), (2, 0.1)):
        folder = tmp_path / "runs" / "mnist32" / "acai" / f"seed{seed}"
        stopped = dict(state="nonfinite", message="non-finite loss_ae (nan) at step 3") if seed == 2 else {}
        write_run_folder(folder, {"test_probe_accuracy": window_evaluations(value)}, nimg=25 * 16, **stopped)
        if not stopped:
            ACAITrainer(config, backend="reference", device="cpu", seed=seed).save(folder / "checkpoint.pt")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (32,), generator=g)
    data = DownstreamData(images[:16], labels[:16], images[16:], labels[16:])
    record = reproduce_downstream("probe", "mnist", 32, data, tmp_path, models="acai", kimg=25 * 16 / 1024, runs=3,
                                  eval_kimg=16 / 1024, device="cpu", config_overrides=TINY, progress=False)
    values = [r["value"] for r in record["runs"]]
    assert values[:2] == pytest.approx([0.5, 0.7], rel=1e-12) and np.isnan(values[2])
    assert record["summary"]["acai"]["mean"] == pytest.approx(0.6, rel=1e-12)
    assert record["summary"]["acai"]["std"] == pytest.approx(0.1, rel=1e-12)
    table = (tmp_path / "probe_mnist32_table.md").read_text()
    assert "| acai | mnist | 32 | 60.00 ± 10.00 | 98.25 |" in table
    assert "median of the last 20 evaluations per run" in table and "mean ± std over runs" in table
    assert "left out of the means: acai seed 2" in table


def test_arguments_and_presets():
    assert preset_for("cifar10", 1024) == "cifar1024" and preset_for("svhn", 32) == "svhn32"
    with pytest.raises(ValueError, match="must be one of 256, 1024"):
        preset_for("cifar10", 32)
    assert evaluation_points(100, 10, window=3) == [80, 90, 100]
    assert evaluation_points(105, 10, window=2) == [100, 105]


def test_cli_reproduce_then_evaluate(mnist_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["reproduce", "probe", "--dataset", "mnist", "--latent", "32", "--models", "acai",
                 "--kimg", "0.0625", "--eval-kimg", "0.0625", "--data", str(mnist_folder), "--out", str(out),
                 "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0 and "| acai | mnist | 32 |" in captured.out and "98.25" in captured.out
    assert "reproducing the probe table on mnist32" in captured.err

    checkpoint = out / "runs" / "mnist32" / "acai" / "seed0" / "checkpoint.pt"
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(mnist_folder), "--restarts", "3",
                 "--no-progress"])
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((checkpoint.parent / "checkpoint_evaluation.json").read_text())
    assert code == 0 and printed == written and written["kimg"] == 0.062
    assert 0 <= written["probe_accuracy"] <= 1 and 0 <= written["clustering_accuracy"] <= 1
    assert written["clustering_restarts"] == 3


@pytest.mark.parametrize("extra, data, message", [
    (["--latent", "1024"], "mnist", r"--latent for mnist must be one of 32, 256"),
    (["--models", "acai,nope"], "mnist", r"unknown model\(s\) 'nope'"),
    (["--runs", "0"], "mnist", "runs must be a positive integer"),
    (["--restarts", "0"], "mnist", "restarts must be a positive integer"),
    ([], "empty", r"--data: .*missing train-images-idx3-ubyte\.gz"),
    ([], "nowhere", r"--data: .*does not exist"),
])
def test_cli_reproduce_bad_arguments_exit_2(extra, data, message, mnist_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    folder = mnist_folder if data == "mnist" else tmp_path / data
    with pytest.raises(SystemExit) as exc:  # a later flag overrides an earlier one
        main(["reproduce", "cluster", "--dataset", "mnist", "--latent", "32", "--data", str(folder),
              "--out", str(tmp_path / "out"), "--device", "cpu"] + extra)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # nothing trained


def write_cifar_folder(folder, rng):
    folder.mkdir()
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 8)]:
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, size=n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize("preset", ["svhn32", "cifar256", "celeba32"])
def test_cli_trains_svhn_cifar_celeba(preset, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    data.mkdir()
    if preset == "svhn32":
        for name, n in (("train_32x32.mat", 12), ("extra_32x32.mat", 6), ("test_32x32.mat", 10)):
            write_svhn(data, name, n, rng)
    elif preset == "cifar256":
        write_cifar_folder(data / "cifar10", rng)  # found in the dataset's subfolder
    else:
        write_jpegs(data / "celeba" / "img_align_celeba", 18, rng)
    monkeypatch.setenv("ACAI_FAST_DATA", str(data))  # the folder from the environment, no --data
    out = tmp_path / "run"
    code = main(["train", "--preset", preset, "--depth", "4", "--advdepth", "4", "--batch", "8",
                 "--kimg", "0.015625", "--eval-kimg", "0.0078125", "--out", str(out), "--device", "cpu",
                 "--no-progress"])
    assert code == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    if preset == "celeba32":  # no labels: no probe
        assert "probe_accuracy" not in records[-1]
    else:
        assert 0 <= records[-1]["probe_accuracy"] <= 1 and "probe_loss" in records[-1]
    assert (out / "interpolations.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
