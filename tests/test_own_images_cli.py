"""The command line on your own images: a folder of a few hundred PNG/JPEG files of mixed sizes
(labels from class subfolders) and an .npz array train, evaluate (probe and clustering), sweep,
reproduce probe|cluster and encode as the paper's data sets do; export, interpolate --between and
--gif; every output path checked before any work. Tiny runs: one or two steps on the CPU."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from acai_fast import ACAITrainer
from acai_fast.cli import main
from acai_fast.data import load_images
from acai_fast.data.images import load_image_files
from acai_fast.export import load_networks
from acai_fast.plotting import interpolation_grid
from test_images import CLASSES, write_image_folder

CPU = ["--device", "cpu", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def exit_code(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    write_image_folder(root / "photos")  # 300 files, 3 classes, 8..300 pixels a side
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, 240)
    images = (rng.integers(0, 256, (240, 28, 28)) // (1 + labels[:, None, None])).astype(np.uint8)
    np.savez(root / "digits.npz", images=images, labels=labels)
    return {"folder": root / "photos", "npz": root / "digits.npz"}


@pytest.fixture(scope="module")
def grey_run(sources, tmp_path_factory):
    """A mnist32 run of one step on the .npz (the checkpoint that export and interpolate read)."""
    out = tmp_path_factory.mktemp("grey") / "run"
    assert main(["train", "--preset", "mnist32", "--data", str(sources["npz"]), "--kimg", "0.015625",
                 "--batch", "16", "--out", str(out), *CPU]) == 0
    return out


@pytest.mark.parametrize("source, preset, classes, colors", [("folder", "celeba32", 3, 3), ("npz", "mnist32", 4, 1)])
def test_train_evaluate_sweep_encode(source, preset, classes, colors, sources, tmp_path, capsys):
    data = str(sources[source])
    small = ["--depth", "8"]
    out = tmp_path / "run"
    code, _ = run(["train", "--preset", preset, "--data", data, "--kimg", "0.03125", "--batch", "16",
                   "--out", str(out), *small, *CPU], capsys)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert code == 0 and record["step"] == 2 and 0 <= record["probe_accuracy"] <= 1
    assert (out / "interpolations.png").is_file()
    trainer = ACAITrainer.load(out / "checkpoint.pt", device="cpu")
    assert trainer.config.nclass == classes and trainer.config.colors == colors  # the probe fits the classes

    code, captured = run(["evaluate", "--checkpoint", str(out), "--data", data, "--restarts", "2", *CPU], capsys)
    result = json.loads(captured.out)
    assert code == 0 and 0 <= result["probe_accuracy"] <= 1 and 0 <= result["clustering_accuracy"] <= 1
    assert (out / "checkpoint_evaluation.json").is_file()

    sweep_out = tmp_path / "sweep"
    code, _ = run(["sweep", "--preset", preset, "--seeds", "0-1", "--data", data, "--kimg", "0.015625",
                   "--eval-kimg", "0.015625", "--batch", "16", "--out", str(sweep_out), *small, *CPU], capsys)
    assert code == 0 and (sweep_out / "summary.md").is_file()
    runs = sorted(p for p in sweep_out.iterdir() if p.is_dir())
    assert len(runs) == 2
    for folder in runs:
        last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
        assert 0 <= last["probe_accuracy"] <= 1

    latents = tmp_path / "latents.npz"
    code, _ = run(["encode", "--checkpoint", str(out), "--data", data, "--out", str(latents), *CPU], capsys)
    assert code == 0
    saved = np.load(latents)  # no pickles needed
    own = load_images(data, colors, progress=False)
    expected = trainer.encode(own.images, 1024)  # the same batch of images through the trainer's encode
    assert saved["latent_maps"].shape == (len(own.images), *trainer.config.latent_shape)
    np.testing.assert_array_equal(saved["latent_maps"], expected.numpy())
    np.testing.assert_array_equal(saved["latents"], expected.flatten(1).numpy())
    np.testing.assert_array_equal(saved["labels"], own.labels.numpy())
    np.testing.assert_array_equal(saved["is_test"], own.is_test.numpy())
    assert saved["names"].tolist() == own.names and len(saved["classes"]) == classes
    assert str(saved["model"]) == "acai" and str(saved["split"]) == "all"

    code, _ = run(["encode", "--checkpoint", str(out), "--data", data, "--split", "test", "--out", str(latents),
                   *CPU], capsys)
    saved = np.load(latents)
    assert code == 0 and len(saved["latents"]) == int(own.is_test.sum()) and saved["is_test"].all()


@pytest.mark.parametrize("source, classes", [("folder", CLASSES), ("npz", ("0", "1", "2", "3"))])
def test_reproduce_probe_and_cluster(source, classes, sources, tmp_path, capsys):
    data, out = str(sources[source]), tmp_path / "results"
    common = ["--dataset", "mnist", "--latent", "32", "--data", data, "--out", str(out), "--models", "acai",
              "--kimg", "0.0625", "--eval-kimg", "0.0625", *CPU]
    code, captured = run(["reproduce", "probe", *common], capsys)
    name = sources[source].name
    assert code == 0 and f"| acai | {name} | 32 |" in captured.out and "| n/a |" in captured.out
    record = json.loads((out / "probe_mnist32_results.json").read_text())
    assert record["settings"]["own_data"] and record["settings"]["config"]["nclass"] == len(classes)
    assert 0 <= record["runs"][0]["value"] <= 1
    code, captured = run(["reproduce", "cluster", *common, "--restarts", "2"], capsys)  # the run is reused
    record = json.loads((out / "cluster_mnist32_results.json").read_text())
    assert code == 0 and "already trained" in captured.err and 0 <= record["runs"][0]["value"] <= 1


def test_reproduce_needs_labels(tmp_path, capsys):
    np.savez(tmp_path / "unlabelled.npz", images=np.zeros((80, 8, 8), np.uint8))
    code, err = exit_code(["reproduce", "probe", "--dataset", "mnist", "--latent", "32", "--data",
                           str(tmp_path / "unlabelled.npz"), "--out", str(tmp_path / "o"), *CPU], capsys)
    assert code == 2 and "needs labels" in err


def test_export_matches_the_trainer(grey_run, tmp_path, capsys):
    code, captured = run(["export", "--checkpoint", str(grey_run), "--out", str(tmp_path / "exported")], capsys)
    assert code == 0 and "encoder.pt2" in captured.err
    info = json.loads((tmp_path / "exported" / "export.json").read_text())
    assert info["files"]["encoder"] == {"file": "encoder.pt2", "format": "export"}
    encoder, decoder = load_networks(tmp_path / "exported")
    trainer = ACAITrainer.load(grey_run / "checkpoint.pt", device="cpu")
    for n in (1, 7):  # a dynamic batch size
        x = torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(n)) * 2 - 1
        z = trainer.encode(x)
        # the same aten ops on the same CPU kernels in the same order as the trainer's reference convs
        assert torch.equal(encoder(x), z) and torch.equal(decoder(z), trainer.decode(z))


def test_interpolate_between_two_images_png_and_gif(grey_run, tmp_path, capsys):
    rng = np.random.default_rng(1)
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(rng.integers(0, 256, (50, 41, 3), dtype=np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 256, (20, 33), dtype=np.uint8)).save(b)
    row, gif = tmp_path / "row.png", tmp_path / "row.gif"
    code, captured = run(["interpolate", "--checkpoint", str(grey_run), "--between", str(a), str(b), "--steps",
                          "5", "--out", str(row), "--gif", str(gif), "--device", "cpu"], capsys)
    assert code == 0 and f"wrote {gif}" in captured.err
    assert Image.open(row).size == (5 * 32 * 2, 32 * 2)  # one row of 5 steps, each pixel 2x2
    trainer = ACAITrainer.load(grey_run / "checkpoint.pt", device="cpu")
    x = load_image_files([a, b], 1)
    images = trainer.interpolate(x[:1], x[1:], steps=5)
    frames, total_ms = _gif_frames(gif)
    # steps 0..4 and back to 1, each pixel 4x4; Pillow merges identical neighbouring frames (adding
    # their durations), which a barely trained decoder makes, so compare with those merged
    expected = [interpolation_grid(images[:, t:t + 1]).repeat(4, axis=0).repeat(4, axis=1)
                for t in (0, 1, 2, 3, 4, 3, 2, 1)]
    merged = [f for i, f in enumerate(expected) if i == 0 or not np.array_equal(f, expected[i - 1])]
    assert len(frames) == len(merged) and frames[0].shape == (128, 128)
    for got, want in zip(frames, merged):
        np.testing.assert_array_equal(got, want)
    assert total_ms == 2 * 600 + 6 * 100  # the ends held 600 ms, the other steps 100 ms


def _gif_frames(path):
    """The composited frames of a GIF (grey) and its total duration in ms."""
    frames, total_ms = [], 0
    with Image.open(path) as animation:
        for i in range(animation.n_frames):
            animation.seek(i)
            frames.append(np.asarray(animation.convert("L")))
            total_ms += animation.info["duration"]
    return frames, total_ms


def test_interpolate_grid_of_your_test_pairs(grey_run, sources, tmp_path, capsys):
    grid, gif = tmp_path / "grid.png", tmp_path / "grid.gif"
    code, _ = run(["interpolate", "--checkpoint", str(grey_run), "--data", str(sources["npz"]), "--pairs", "3",
                   "--steps", "4", "--out", str(grid), "--gif", str(gif), "--device", "cpu"], capsys)
    assert code == 0 and Image.open(grid).size == (4 * 32 * 2, (3 * 33 - 1) * 2)
    frames, total_ms = _gif_frames(gif)
    assert frames[0].shape == (392, 128) and total_ms == 2 * 600 + 4 * 100  # steps 0..3..1


@pytest.mark.parametrize("argv, message", [
    (["encode", "--checkpoint", "nope.pt", "--data", "x.npz", "--out", "missing/latents.npz"],
     "--out missing/latents.npz: the folder missing does not exist"),
    (["encode", "--checkpoint", "nope.pt", "--data", "x.npz", "--out", "latents.txt"], "must end in .npz"),
    (["interpolate", "--checkpoint", "nope.pt", "--out", "a_folder"], "--out a_folder is a folder"),
    (["interpolate", "--checkpoint", "nope.pt", "--gif", "missing/x.gif"], "the folder missing does not exist"),
    (["interpolate", "--checkpoint", "nope.pt"], "give --out PNG"),
    (["export", "--checkpoint", "nope.pt", "--out", "a_file/exported"], "cannot be created"),
    (["export", "--checkpoint", "a_folder", "--out", "exported"], "a_folder is a folder without a checkpoint.pt"),
    (["train", "--preset", "lines", "--data", "x.npz", "--out", "run"], "the lines preset generates its data"),
    (["train", "--preset", "mnist32", "--data", "x.npz", "--out", "run"], "--data: x.npz does not exist"),
    (["train", "--preset", "mnist32", "--data", "few.npz", "--out", "run"], "fewer than one batch of 64"),
])
def test_bad_arguments_exit_2_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("")
    np.savez(tmp_path / "few.npz", images=np.zeros((20, 8, 8), np.uint8))
    code, err = exit_code(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_resume_with_other_classes_is_refused(sources, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "mnist32", "--data", str(sources["npz"]), "--kimg", "0.015625", "--batch",
                 "16", "--out", str(out), *CPU]) == 0
    code, err = exit_code(["train", "--preset", "mnist32", "--data", str(sources["folder"]), "--kimg", "0.03125",
                           "--batch", "16", "--out", str(out), "--resume", *CPU], capsys)
    assert code == 2 and "3 classes, but" in err and "probe has 4" in err


def test_encode_the_papers_data(tmp_path, capsys):
    """encode on the paper's files (MNIST IDX here): train then test, labels and is_test, no names."""
    import gzip

    from acai_fast import ACAIConfig

    rng = np.random.default_rng(2)
    for prefix, n in (("train", 12), ("t10k", 6)):
        header = lambda magic, dims: magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header(2051, (n, 28, 28)) + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(header(2049, (n,)) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
    trainer = ACAITrainer(ACAIConfig.preset("mnist32", depth=8), backend="reference", device="cpu")
    trainer.save(tmp_path / "model.pt")
    out = tmp_path / "z.npz"
    code, _ = run(["encode", "--checkpoint", str(tmp_path / "model.pt"), "--data", str(tmp_path), "--out", str(out),
                   *CPU], capsys)
    saved = np.load(out)
    from acai_fast.data import load_dataset
    x_train, y_train = load_dataset("mnist", tmp_path, "train")
    x_test, y_test = load_dataset("mnist", tmp_path, "test")
    assert code == 0 and "names" not in saved.files and saved["is_test"].tolist() == [False] * 12 + [True] * 6
    np.testing.assert_array_equal(saved["labels"], torch.cat([y_train, y_test]).numpy())
    np.testing.assert_array_equal(saved["latent_maps"], trainer.encode(torch.cat([x_train, x_test]), 1024).numpy())
    lines = ACAITrainer(ACAIConfig.preset("lines", depth=8), backend="reference", device="cpu")
    lines.save(tmp_path / "lines.pt")
    code, err = exit_code(["encode", "--checkpoint", str(tmp_path / "lines.pt"), "--out", str(out), *CPU], capsys)
    assert code == 2 and "a lines model's images are generated" in err
