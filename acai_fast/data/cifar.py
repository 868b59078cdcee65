"""CIFAR-10 from the official python pickle batches (`data_batch_1`..`5`, `test_batch`), read from a
folder (holding them or `cifar-10-batches-py/`) or straight from the official `cifar-10-python.tar.gz`.

Each batch is a pickled dict: b"data" a (N, 3072) uint8 array whose rows are one image, channel-major
(1024 red, 1024 green, 1024 blue values, each 32x32 row-major), and b"labels" N ints in 0..9.
The pickles are read with an unpickler that builds nothing but numpy arrays and plain containers,
so a doctored file cannot run code."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from .common import check_folder, check_labels, checksum_hint, verify_md5

_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_SUBFOLDER = "cifar-10-batches-py"
_ARCHIVE = "cifar-10-python.tar.gz"
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, strings and numbers; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR-10 batch)")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 renamed it (and warns on the old name)
        return super().find_class(module, name)


def _parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    name = where.rsplit("/", 1)[-1]
    hint = checksum_hint("cifar10", name)
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # truncated pickles raise EOFError, UnpicklingError, ValueError, ...
        raise ValueError(f"{where}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc}); "
                         f"truncated or not the official file{hint}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{where}: expected a pickled dict with b'data' and b'labels', found "
                         f"{type(batch).__name__}{hint}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{where}: expected keys b'data' and b'labels', found {sorted(batch)}{hint}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(f"{where}: b'data' must be (N, 3072) uint8 (10000 rows in the official "
                         f"batches), found {data.shape} {data.dtype}{hint}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: b'labels' must hold {data.shape[0]} integers, found {labels.shape} "
                         f"{labels.dtype}{hint}")
    check_labels(labels, 10, where)
    return data, labels.astype(np.int64)


def _read_batches(folder: Path, names, verify: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    for base in (folder, folder / _SUBFOLDER):
        if all((base / n).is_file() for n in names):
            out = []
            for n in names:
                if verify:
                    verify_md5("cifar10", base / n)
                out.append(_parse_batch((base / n).read_bytes(), str(base / n)))
            return out
    archive = folder / _ARCHIVE
    if archive.is_file():
        if verify:
            verify_md5("cifar10", archive)
        out = []
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for n in names:
                    member = f"{_SUBFOLDER}/{n}"
                    try:
                        f = tar.extractfile(member)
                    except KeyError:
                        f = None
                    if f is None:
                        raise ValueError(f"{archive}: has no {member} (expected the official "
                                         f"archive{checksum_hint('cifar10', _ARCHIVE)})")
                    out.append(_parse_batch(f.read(), f"{archive}:{member}"))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ValueError(f"{archive}: not a readable .tar.gz ({exc}); truncated or damaged"
                             f"{checksum_hint('cifar10', _ARCHIVE)}") from None
        return out
    present = [n for n in names if (folder / n).is_file() or (folder / _SUBFOLDER / n).is_file()]
    missing = [n for n in names if n not in present]
    raise FileNotFoundError(f"{folder}: missing CIFAR-10 batch file(s) {', '.join(missing)} (the official "
                            f"python batches, 10000 images each, in the folder or in {_SUBFOLDER}/), "
                            f"and no {_ARCHIVE} to read them from")


def load_cifar10_pixels(folder: str | os.PathLike, split: str = "train", *, limit: int | None = None,
                        verify: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 raw pixels from `folder`: ((N, 3, 32, 32) uint8, (N,) int64 labels 0..9); split
    "train" is data_batch_1..5 in order (50,000), "test" is test_batch (10,000)."""
    if split not in _BATCHES:
        raise ValueError(f"split must be one of {list(_BATCHES)}, got {split!r}")
    batches = _read_batches(check_folder(folder), _BATCHES[split], verify)
    data = np.concatenate([d for d, _ in batches])[:limit]
    labels = np.concatenate([l for _, l in batches])[:limit]
    # (N, 3072) channel-major rows -> (N, 3, 32, 32)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)
