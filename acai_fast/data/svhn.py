"""SVHN (cropped digits) from the official MATLAB v5 files `train_32x32.mat`, `extra_32x32.mat`,
`test_32x32.mat`: X of shape (32, 32, 3, N) uint8 (row, column, channel, image), y of shape (N, 1)
with values 1..10, where 10 means the digit 0.

As the paper's code: split "train" is train followed by extra (604,388 images); no augmentation.
Labels are the digits (10 -> 0). The paper's code subtracts 1 instead (digit d -> d-1, 0 -> 9),
a relabelling that changes no probe or clustering accuracy (both are invariant to permuting the
classes)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .common import check_folder, checksum_hint, find_file, verify_md5

_FILES = {"train": ("train_32x32.mat", "extra_32x32.mat"), "test": ("test_32x32.mat",)}
_OFFICIAL_COUNT = {"train_32x32.mat": 73257, "extra_32x32.mat": 531131, "test_32x32.mat": 26032}


def _read_mat(path: Path, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    hint = checksum_hint("svhn", path.name)
    if verify:
        verify_md5("svhn", path)
    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError, ... on a bad file
        raise ValueError(f"{path}: not a readable MATLAB v5 file ({type(exc).__name__}: {exc}); "
                         f"expected the official SVHN {path.name} with X (32, 32, 3, N) uint8 and "
                         f"y (N, 1){hint}") from None
    if "X" not in mat or "y" not in mat:
        found = sorted(name for name, *_ in scipy.io.whosmat(path))
        raise ValueError(f"{path}: expected variables X and y, found {found}{hint}")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise ValueError(f"{path}: X must be (32, 32, 3, N) uint8, found {x.shape} {x.dtype}{hint}")
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise ValueError(f"{path}: {x.shape[3]} images but {y.shape[0]} labels{hint}")
    if y.size and (y.min() < 1 or y.max() > 10 or not np.all(y == np.round(y))):
        raise ValueError(f"{path}: labels must be integers 1..10 (10 = digit 0), found [{y.min()}, {y.max()}]")
    return x, y.astype(np.int64)


def load_svhn_pixels(folder: str | os.PathLike, split: str = "train", *, limit: int | None = None,
                     verify: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN raw pixels from `folder`: ((N, 3, 32, 32) uint8, (N,) int64 digits 0..9); split "train"
    is train + extra (as the paper); the first `limit` images if given (extra is not read when
    train alone has enough)."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {list(_FILES)}, got {split!r}")
    folder = check_folder(folder)
    xs, ys, count = [], [], 0
    for name in _FILES[split]:
        if limit is not None and count >= limit:
            break
        path = find_file(folder, (name,), f"the official SVHN MATLAB file, {_OFFICIAL_COUNT[name]} "
                                          f"images{checksum_hint('svhn', name)}")
        x, y = _read_mat(path, verify)
        take = x.shape[3] if limit is None else min(x.shape[3], limit - count)
        # (32, 32, 3, N) = (row, column, channel, image) -> (N, 3, 32, 32)
        xs.append(torch.from_numpy(np.ascontiguousarray(x[..., :take].transpose(3, 2, 0, 1))))
        ys.append(torch.from_numpy(y[:take] % 10))  # 10 -> digit 0
        count += take
    return torch.cat(xs), torch.cat(ys)
