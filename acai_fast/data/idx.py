"""MNIST and Fashion-MNIST from their official IDX files (.gz or not), prepared as the paper's code
does (SPEC.md section 3): pixels scaled to [-1, 1] with x * 2/255 - 1, 28x28 padded by 2 pixels of
-1 to 32x32."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {got}, expected {magic})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated (expected {int(np.prod(dims))} values, found {data.size})")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: missing {stem}.gz (the official MNIST / Fashion-MNIST IDX files)")


def load_idx_dataset(folder: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-format images and labels from `folder`: ((N, 1, 32, 32) float32 in [-1, 1], (N,) int64)."""
    if split not in _IDX_FILES:
        raise ValueError(f"split must be one of {list(_IDX_FILES)}, got {split!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    image_stem, label_stem = _IDX_FILES[split]
    images = _read_idx(_find(folder, image_stem), 2051)
    labels = _read_idx(_find(folder, label_stem), 2049)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32) * (2.0 / 255) - 1.0)[:, None]  # (N, 1, 28, 28)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # -> (N, 1, 32, 32)
    return x, torch.from_numpy(labels.astype(np.int64))
