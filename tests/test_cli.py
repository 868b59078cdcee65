"""The acai-fast command line: a tiny training run, resume, interpolate, evaluate, bad arguments."""
import json

import numpy as np
import pytest

from acai_fast.cli import main
from helpers import write_idx as _write_idx  # MNIST-format files (helpers.write_idx)


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def test_train_resume_interpolate_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "lines", "--kimg", "0.125", "--eval-kimg", "0.0625", "--batch", "16",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    code, _ = run(args, capsys)
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in records] == [0.062, 0.125]
    for key in ("images_per_s", "loss_ae", "loss_ae_disc", "loss_disc", "loss_disc_real",
                "probe_loss", "probe_accuracy", "mean_distance", "mean_smoothness", "rmse"):
        assert key in records[-1], key
    assert (out / "checkpoint.pt").is_file() and (out / "interpolations.png").is_file()

    # Without --resume an existing run is never overwritten.
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "--resume" in capsys.readouterr().err

    code, _ = run(args[:4] + ["0.1875"] + args[5:] + ["--resume"], capsys)
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kimg"] == 0.188 and records[-1]["step"] == 12

    png = tmp_path / "grid.png"
    code, _ = run(["interpolate", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(png),
                   "--pairs", "3", "--steps", "5"], capsys)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"

    code, captured = run(["evaluate", "--checkpoint", str(out / "checkpoint.pt")], capsys)
    result = json.loads(captured.out)
    assert code == 0 and result["kimg"] == 0.188 and 0 <= result["mean_distance"] <= 2


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "nope", "--out", "x"], "invalid choice"),
    (["train", "--kimg", "-1", "--out", "x"], "must be > 0"),
    (["train", "--out", "x", "--backend", "magic"], "unknown backend"),
    (["train", "--out", "x", "--batch", "0"], "batch"),
    (["train", "--out", "x", "--device", "cpu", "--dtype", "bf16"], "bf16"),
    (["train", "--out", "x", "--device", "cpu", "--cuda-graph"], "cuda_graph=True needs"),
    (["train", "--preset", "mnist32", "--out", "x"], "--data"),
    (["train", "--preset", "cifar1024", "--out", "x"], "trains on cifar10: no data folder: pass --data DIR"),
    (["interpolate", "--checkpoint", "missing.pt", "--out", "a.png"], "no checkpoint"),
    (["train"], "--out"),
])
def test_bad_arguments_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_idx_loader_and_mnist_training(tmp_path, capsys):
    from acai_fast.data import load_idx_dataset

    rng = np.random.default_rng(0)
    images, labels = _write_idx(tmp_path, "train", 40, rng)
    _write_idx(tmp_path, "t10k", 36, rng)
    x, y = load_idx_dataset(tmp_path, "train")
    assert x.shape == (40, 1, 32, 32) and y.tolist() == labels.tolist()
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # 2 px of -1 padding
    expected = images[3].astype(np.float32) * (2.0 / 255) - 1.0
    np.testing.assert_array_equal(x[3, 0, 2:30, 2:30].numpy(), expected)
    code, _ = run(["train", "--preset", "mnist32", "--data", str(tmp_path), "--kimg", "0.03125",
                   "--batch", "16", "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"], capsys)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert code == 0 and 0 <= record["probe_accuracy"] <= 1 and "mean_distance" not in record


# ------------------------------------------------------------------ manners: errors, help, --version, threads
def _exit(argv, capsys):
    """main(argv) must exit: (code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.mark.parametrize("argv, prog, message", [
    (["train", "--kimg", "x", "--out", "o"], "acai-fast train", "argument --kimg: expected a number, got 'x'"),
    (["train"], "acai-fast train", "the following arguments are required: --out"),
    (["reproduce", "lines", "--seed", "-1", "--out", "o"], "acai-fast reproduce lines", "--seed must be >= 0"),
    (["sweep", "--seeds", "x", "--out", "o"], "acai-fast sweep", "expected seeds like 0-3"),
    (["nope"], "acai-fast", "invalid choice: 'nope'"),
])
def test_a_mistake_is_one_line_naming_the_command_and_its_help(argv, prog, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _exit(argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "usage:" not in err, err  # one line, no usage text before it
    assert err.startswith(f"{prog}: error: ") and message in err and f"(see {prog} --help)" in err


def test_version_and_bare_command(capsys):
    import acai_fast
    code, out, _ = _exit(["--version"], capsys)
    assert code == 0 and out.startswith(f"acai-fast {acai_fast.__version__} (PyTorch ")
    assert main([]) == 2 and "train" in capsys.readouterr().err  # the commands, not an error line


def test_every_command_describes_every_option_shows_each_default_once_and_an_example(capsys):
    from acai_fast.cli import HelpFormatter, build_parser, commands

    parser = build_parser()
    found = commands(parser)
    assert {"train", "interpolate", "evaluate", "profile", "sweep", "reproduce lines", "reproduce probe",
            "reproduce cluster"} <= set(found)
    for name, sub in found.items():
        text = sub.format_help()  # (expands every %(default)s)
        assert "\nexample:\n  acai-fast " + name in text, name
        formatter = HelpFormatter(sub.prog)
        for action in sub._actions:
            if "-h" in action.option_strings:
                continue
            assert action.help, f"acai-fast {name} {action.option_strings}: no help"
            shown = formatter._expand_help(action)  # as --help prints it
            assert shown.count("default") <= 1, f"acai-fast {name} {action.option_strings}: {shown}"
            if action.option_strings and action.default not in (None, False) and not action.required:
                assert "default" in shown, f"acai-fast {name} {action.option_strings}: default not shown"


@pytest.fixture
def tiny_lines_run(tmp_path):
    """A run folder with the checkpoint of an untrained tiny lines model (cheap to load and use)."""
    from acai_fast import ACAIConfig, ACAITrainer

    run_dir = tmp_path / "run"
    config = ACAIConfig.preset("lines", depth=2, latent=2, advdepth=2, batch=2)
    ACAITrainer(config, backend="reference", device="cpu", seed=3).save(run_dir / "checkpoint.pt")
    return run_dir


def test_threads_option_and_checkpoint_folder(tiny_lines_run, tmp_path, capsys, monkeypatch):
    import torch

    from acai_fast.cli import CPU_THREADS

    before = torch.get_num_threads()
    try:
        png = tmp_path / "grid.png"
        argv = ["interpolate", "--checkpoint", str(tiny_lines_run), "--out", str(png), "--pairs", "1", "--steps", "2",
                "--device", "cpu"]
        assert main(argv + ["--threads", "2"]) == 0  # --checkpoint: the run folder holding checkpoint.pt
        assert torch.get_num_threads() == 2 and png.read_bytes()[:4] == b"\x89PNG"
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert main(argv) == 0 and torch.get_num_threads() == CPU_THREADS  # the CPU default
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert main(argv) == 0 and torch.get_num_threads() == 2  # $OMP_NUM_THREADS is respected
        code, _, err = _exit(argv + ["--threads", "0"], capsys)
        assert code == 2 and "--threads: must be >= 1" in err
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("flags, message", [
    (["--preset", "mnist32"], "--preset mnist32 conflicts with --resume: {ckpt} holds a acai run on a lines "
                              "configuration (dataset mnist vs lines, latent_width 4 vs 2"),
    (["--preset", "lines"], "--preset lines conflicts with --resume"),  # the run has depth 2, lines 16
    (["--model", "vae"], "--model vae conflicts with --resume: {ckpt} holds a 'acai' model"),
    (["--seed", "4"], "--seed 4 conflicts with --resume: {ckpt} was trained with seed 3"),
    (["--lr", "0.001"], "--lr 0.001 conflicts with --resume: {ckpt} was trained with lr 0.0001"),
    (["--batch", "4"], "--batch 4 conflicts with --resume"),
])
def test_resume_refuses_options_that_contradict_the_checkpoint(tiny_lines_run, flags, message, capsys):
    argv = ["train", "--out", str(tiny_lines_run), "--resume", "--device", "cpu", "--kimg", "0.002",
            "--no-progress", *flags]
    code, _, err = _exit(argv, capsys)
    assert code == 2 and err.count("\n") == 1
    assert message.format(ckpt=tiny_lines_run / "checkpoint.pt") in err
    assert not (tiny_lines_run / "metrics.jsonl").exists()  # nothing trained


def test_resume_with_the_checkpoints_own_options_or_none(tiny_lines_run, capsys):
    """Options that agree with the checkpoint (or are left out) continue the run."""
    argv = ["train", "--out", str(tiny_lines_run), "--resume", "--device", "cpu", "--kimg", str(2 / 1024),
            "--no-progress"]
    assert main(argv + ["--preset", "lines", "--depth", "2", "--latent", "2", "--seed", "3", "--batch", "2"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "acai on a lines configuration, seed 3" in err
    assert json.loads((tiny_lines_run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1


def test_resume_needs_an_existing_folder_and_starts_in_an_empty_one(tmp_path, capsys):
    base = ["train", "--device", "cpu", "--kimg", str(2 / 1024), "--no-progress", "--depth", "2", "--latent", "2",
            "--advdepth", "2", "--batch", "2", "--resume"]
    code, _, err = _exit(base + ["--out", str(tmp_path / "typo")], capsys)
    assert code == 2 and "--resume: " in err and "does not exist" in err and not (tmp_path / "typo").exists()
    (tmp_path / "file").write_text("")
    code, _, err = _exit(base + ["--out", str(tmp_path / "file")], capsys)
    assert code == 2 and "is not a folder" in err
    (tmp_path / "empty").mkdir()
    assert main(base + ["--out", str(tmp_path / "empty")]) == 0
    assert "no checkpoint in" in capsys.readouterr().err and (tmp_path / "empty" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "{file}/run"], "--out: output folder {file}/run cannot be created"),
    (["profile", "--out", "{file}/prof", "--device", "cpu"], "--out: output folder {file}/prof cannot be created"),
    (["sweep", "--seeds", "0", "--out", "{file}/sw", "--device", "cpu"], "--out: output folder {file}/sw cannot"),
    (["sweep", "--seeds", "0", "--out", "{tmp}/none", "--resume"], "--resume: {tmp}/none is not a folder"),
    (["reproduce", "lines", "--out", "{file}/rl", "--device", "cpu"], "--out: output folder {file}/rl cannot"),
    (["interpolate", "--checkpoint", "{run}", "--out", "{tmp}/missing/grid.png"],
     "--out {tmp}/missing/grid.png: the folder {tmp}/missing does not exist"),
    (["interpolate", "--checkpoint", "{run}", "--out", "{tmp}"], "--out {tmp} is a folder; give a file name"),
    (["evaluate", "--checkpoint", "{run}"], "{run}/checkpoint_evaluation.json is a folder"),
])
def test_output_paths_are_checked_before_any_work(argv, message, tiny_lines_run, tmp_path, capsys):
    """A path the command cannot write is one line and exit 2 before any training or evaluation
    (a file where a folder should be: the same on every machine, root or not)."""
    (tmp_path / "file").write_text("")
    (tiny_lines_run / "checkpoint_evaluation.json").mkdir()  # evaluate writes its JSON there
    names = dict(file=tmp_path / "file", tmp=tmp_path, run=tiny_lines_run)
    code, _, err = _exit([a.format(**names) for a in argv], capsys)
    assert code == 2 and err.count("\n") == 1 and message.format(**names) in err, err
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("*.png"))


def test_output_file_check():
    from acai_fast.checkpoint import CheckpointError, check_output_file

    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        assert str(check_output_file(f"{folder}/a.png")) == f"{folder}/a.png"
        assert os_listdir(folder) == []  # the write test left nothing behind
        with pytest.raises(CheckpointError, match="does not exist"):
            check_output_file(f"{folder}/sub/a.png")
        with pytest.raises(CheckpointError, match="is a folder"):
            check_output_file(folder)


def os_listdir(folder):
    import os
    return os.listdir(folder)
