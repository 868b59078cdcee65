"""Helpers shared by the tests (fixtures live in conftest.py): comparisons with readable failures,
the tiny configuration, JSON and run-folder readers and writers, dataset files in their official
formats, and the sm_90 compile runner."""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A tiny ACAIConfig's fields: 32 -> 8 latent width (2 scales), narrow layers (latent_dims = 3 * 8 * 8
# = 192), batch 6: a step takes milliseconds on the CPU.
TINY = dict(depth=4, latent=3, latent_width=8, advdepth=5, batch=6)


def tiny_trainer(seed=0, **overrides):
    """A reference-backend CPU trainer on TINY (with config overrides): seconds per step."""
    from acai_fast import ACAIConfig, ACAITrainer
    return ACAITrainer(ACAIConfig(**{**TINY, **overrides}), backend="reference", device="cpu", seed=seed)


def assert_close(actual, expected, *, atol, rtol, name="tensor"):
    """Like torch.testing.assert_close, but prints the first mismatching indices and both values."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        idx = bad.nonzero()[:5]
        rows = "\n".join(f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item():.6g}, "
                         f"expected {expected[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
                             f"(max abs err {(actual - expected).abs().max().item():.3g}, "
                             f"atol={atol}, rtol={rtol}); first ones:\n{rows}")


def assert_close_lowp(actual, reference_fp32, torch_lowp, *, name="tensor", factor=2.0, floor=1e-5):
    """The flash-attention rule for low precision: the kernel's max error against the fp32 reference
    is at most `factor` times PyTorch's own max error in the same dtype, plus a small floor."""
    ref = reference_fp32.detach().double()
    err = (actual.detach().double() - ref).abs().max().item()
    torch_err = (torch_lowp.detach().double() - ref).abs().max().item()
    assert err <= factor * torch_err + floor, (
        f"{name}: max error {err:.3g} vs fp32 reference exceeds {factor} x PyTorch's own "
        f"low-precision error {torch_err:.3g} + {floor}")


def compile_sm90_in_subprocess(test_module: str) -> None:
    """Run `test_module.compile_sm90()` in a fresh interpreter with TRITON_INTERPRET unset (the
    interpreter is chosen at import), so that Triton's real compiler builds the kernels for sm_90
    without a GPU; skip when this triton has no NVIDIA backend."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]; "
            f"import {test_module} as t; t.compile_sm90()")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if "No module named 'triton.backends.nvidia'" in done.stderr:
        pytest.skip("this triton has no NVIDIA backend")
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ JSON, run folders


def read_jsonl(path) -> list[dict]:
    """A .jsonl file's records (metrics.jsonl)."""
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (not JSON: a strict reader fails on them)."""
    def no_constants(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=no_constants)


def window_evaluations(value: float) -> list[float]:
    """25 evaluations of a metric whose median over the last 20 is `value`, and only that reading:
    with m = value / 2 they are [0] * 5 + [m] * 10 + [3m] * 9 + [100m], so the median of the last 19
    is 3m, of the last 21 or all 25 m, the mean of the last 20 6.85m, the last value 100m."""
    m = value / 2
    return [0.0] * 5 + [m] * 10 + [3 * m] * 9 + [100 * m]


def write_run_folder(folder, metrics: dict[str, list[float]], *, state: str = "finished", nimg: int,
                     message: str | None = None) -> None:
    """A run folder by hand: metrics.jsonl with one record per evaluation (step i + 1, and each
    metric's i-th value) and status.json (state, nimg, kimg; message for a stopped run)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(metrics.values())))
    records = [dict(step=i + 1, kimg=round((i + 1) * nimg / n / 1024, 3), **{k: v[i] for k, v in metrics.items()})
               for i in range(n)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    status = dict(state=state, nimg=nimg, kimg=round(nimg / 1024, 3), step=n)
    if message is not None:
        status["message"] = message
    (folder / "status.json").write_text(json.dumps(status))


# ------------------------------------------------------------------------------------------------ dataset files


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """An IDX file (MNIST's format): magic number, dimensions (big-endian int32), data."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(folder, prefix: str, n: int, rng, compress: bool = True):
    """PREFIX-images-idx3-ubyte[.gz] and PREFIX-labels-idx1-ubyte[.gz] of n random 28x28 digits in
    `folder` (made if missing), what `--preset mnist32 --data` reads; rng: a numpy Generator or a
    seed. Returns (images, labels)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for kind, magic, data in (("images-idx3", 2051, images), ("labels-idx1", 2049, labels)):
        name = f"{prefix}-{kind}-ubyte"
        if compress:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(idx_bytes(magic, data))
        else:
            (folder / name).write_bytes(idx_bytes(magic, data))
    return images, labels


def write_svhn(folder, name: str, n: int, rng):
    """An SVHN .mat file (X: 32x32x3xN uint8, y: 1..10 with 10 for the digit 0, one 10 always).
    Returns (X, y)."""
    import scipy.io

    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
    y[0] = 10  # always one digit 0
    scipy.io.savemat(pathlib.Path(folder) / name, {"X": x, "y": y})
    return x, y[:, 0]


def write_jpegs(folder, n: int, rng, size=(178, 218)) -> None:
    """n random RGB JPEGs of `size` (CelebA's aligned 178x218) named 000001.jpg ... in a new `folder`."""
    from PIL import Image

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i + 1:06d}.jpg", quality=95)
