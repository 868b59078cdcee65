"""MNIST and Fashion-MNIST from their official IDX files (.gz or not), prepared as the paper's code
does (SPEC.md section 3): 28x28 padded by 2 pixels of -1 to 32x32, pixels scaled to [-1, 1] with
x * 2/255 - 1. Both datasets use the same four file names."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .common import check_folder, check_labels, checksum_hint, find_file, to_unit_range, verify_md5

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_MAGIC_IMAGES, _MAGIC_LABELS = 2051, 2049  # 0x00000803 (3-d uint8), 0x00000801 (1-d uint8)
_OFFICIAL_COUNT = {"train": 60000, "test": 10000}


def _read_idx(path: Path, magic: int, dataset: str = "mnist") -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    hint = checksum_hint(dataset, path.name)
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as exc:  # a cut-off or damaged .gz
        raise ValueError(f"{path}: cannot be decompressed ({exc}); truncated or damaged{hint}") from None
    if len(raw) < 8:
        raise ValueError(f"{path}: truncated ({len(raw)} bytes, shorter than an IDX header){hint}")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {got:#010x}, "
                         f"expected {magic:#010x}){hint}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated inside its header{hint}")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated (its header {dims} promises {int(np.prod(dims))} values, "
                         f"found {data.size}){hint}")
    return data.reshape(dims)


def load_idx_pixels(folder: str | os.PathLike, split: str = "train", *, dataset: str = "mnist",
                    limit: int | None = None, verify: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-format raw pixels from `folder`: ((N, 1, 32, 32) uint8, the 28x28 digit padded by 2
    pixels of 0 (-1 once scaled), (N,) int64 labels); the first `limit` images if given."""
    if split not in _IDX_FILES:
        raise ValueError(f"split must be one of {list(_IDX_FILES)}, got {split!r}")
    folder = check_folder(folder)
    what = f"the official {dataset} IDX file, {_OFFICIAL_COUNT[split]} items"
    paths = [find_file(folder, (stem + ".gz", stem), what) for stem in _IDX_FILES[split]]
    if verify:
        for path in paths:
            verify_md5(dataset, path)
    images = _read_idx(paths[0], _MAGIC_IMAGES, dataset)
    labels = _read_idx(paths[1], _MAGIC_LABELS, dataset)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{paths[0]}: expected 28x28 images, found shape {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images in {paths[0].name} but {len(labels)} labels "
                         f"in {paths[1].name}")
    check_labels(labels, 10, paths[1])
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    pixels = torch.nn.functional.pad(torch.from_numpy(images.copy())[:, None], (2, 2, 2, 2), value=0)
    return pixels, torch.from_numpy(labels.astype(np.int64))


def load_idx_dataset(folder: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-format images and labels from `folder`: ((N, 1, 32, 32) float32 in [-1, 1], (N,) int64)."""
    pixels, labels = load_idx_pixels(folder, split)
    return to_unit_range(pixels), labels
