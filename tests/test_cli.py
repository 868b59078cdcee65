"""The acai-fast command line: a tiny training run, resume, interpolate, evaluate, bad arguments."""
import gzip
import json

import numpy as np
import pytest

from acai_fast.cli import main


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


def _write_idx(folder, prefix, n, rng):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    header = lambda magic, dims: magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(header(2051, (n, 28, 28)) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(header(2049, (n,)) + labels.tobytes())
    return images, labels


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
