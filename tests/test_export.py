"""acai_fast.export: a dataset's latents (encode_dataset, save_latents) and the encoder and decoder
as torch.export programs (or TorchScript) that equal the trainer's own encode and decode and run
without acai_fast."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from acai_fast import ACAIConfig, ACAITrainer
from acai_fast.export import encode_dataset, export_networks, load_networks, save_latents


def tiny_trainer(model="acai", seed=0):
    config = ACAIConfig.preset("mnist32", depth=8, latent=4, batch=8)
    return ACAITrainer(config, backend="reference", device="cpu", seed=seed, model=model)


def images(n, seed=0):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, the fallback
@pytest.mark.parametrize("model, format", [
    ("acai", "export"), ("vae", "export"), ("vqvae", "export"),  # plain, posterior-mean encode, quantising decode
    ("acai", "torchscript"),
])
def test_exported_networks_equal_the_trainer(model, format, tmp_path):
    trainer = tiny_trainer(model)
    trainer.step(images(8), torch.arange(8) % 10)  # weights away from their init
    info = export_networks(trainer, tmp_path, format=format)
    assert {e["format"] for e in info["files"].values()} == {format}
    assert json.loads((tmp_path / "export.json").read_text())["model"] == model
    encoder, decoder = load_networks(tmp_path)
    for n in (1, 5):  # the batch size is dynamic
        x = images(n, seed=n)
        z = trainer.encode(x)
        # the same aten ops on the same CPU kernels, in the same order: equal, not merely close
        assert torch.equal(encoder(x), z)
        assert torch.equal(decoder(z), trainer.decode(z))


def test_exported_programs_run_without_acai_fast(tmp_path):
    trainer = tiny_trainer()
    export_networks(trainer, tmp_path)
    x = images(3)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys; sys.modules['acai_fast'] = None  # importing acai_fast now fails\n"
        "import torch\n"
        f"folder = {str(tmp_path)!r}\n"
        "encoder = torch.export.load(folder + '/encoder.pt2').module()\n"
        "decoder = torch.export.load(folder + '/decoder.pt2').module()\n"
        "z = encoder(torch.load(folder + '/x.pt'))\n"
        "torch.save((z, decoder(z)), folder + '/out.pt')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    z, y = torch.load(tmp_path / "out.pt")
    assert torch.equal(z, trainer.encode(x)) and torch.equal(y, trainer.decode(trainer.encode(x)))


def test_encode_dataset_chunks_and_pixels():
    trainer = tiny_trainer()
    pixels = torch.randint(0, 256, (37, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    floats = pixels.float() * (2 / 255) - 1
    whole = encode_dataset(trainer, floats, batch_size=64)
    assert whole.shape == (37, 4, 4, 4) and whole.device.type == "cpu"
    assert torch.equal(whole, trainer.encode(floats, 64))
    assert torch.equal(encode_dataset(trainer, pixels, batch_size=64), whole)  # uint8 scaled per chunk
    # smaller chunks: other batches through the convs, so equal up to their summation order
    torch.testing.assert_close(encode_dataset(trainer, pixels, batch_size=10), whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        encode_dataset(trainer, pixels, batch_size=0)
    with pytest.raises(ValueError, match=r"\(N, colors, 32, 32\)"):
        encode_dataset(trainer, pixels[0])


def test_save_latents_round_trip_and_errors(tmp_path):
    z = torch.randn(4, 2, 3, 3)
    save_latents(tmp_path / "z.npz", z, labels=torch.tensor([0, 1, 1, 0]), classes=["a", "b"],
                 names=["w.png", "x.png", "y.png", "z.png"], is_test=torch.tensor([0, 0, 1, 0]), model="acai", kimg=1.5)
    saved = np.load(tmp_path / "z.npz")  # allow_pickle=False by default: plain arrays only
    np.testing.assert_array_equal(saved["latent_maps"], z.numpy())
    np.testing.assert_array_equal(saved["latents"], z.reshape(4, 18).numpy())
    assert saved["labels"].dtype == np.int64 and saved["is_test"].tolist() == [False, False, True, False]
    assert saved["names"].tolist()[1] == "x.png" and saved["classes"].tolist() == ["a", "b"]
    assert str(saved["model"]) == "acai" and float(saved["kimg"]) == 1.5
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match=r"labels must hold one entry per latent \(4\)"):
        save_latents(tmp_path / "bad.npz", z, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(N, latent, w, w\)"):
        save_latents(tmp_path / "bad.npz", z.flatten(1))
    with pytest.raises(ValueError, match="format"):
        export_networks(tiny_trainer(), tmp_path / "e", format="onnx")
