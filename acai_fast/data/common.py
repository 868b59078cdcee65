"""What every image loader of acai_fast.data shares: the paper's pixel scaling, file lookup with
errors that name the file, and the official checksums (quoted in errors, checked on request).

Loaders return the raw pixel bytes, uint8 (N, colors, 32, 32), so that a whole training set can
live on the GPU as bytes (acai_fast.data.batches); `to_unit_range` is the paper's x * 2/255 - 1.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import torch

# Official MD5s of the files each loader reads: quoted in format errors, compared by
# load_dataset(..., verify=True). Sources: MNIST and Fashion-MNIST as published (and checked on the
# copies in the project's shared data folder); SVHN and CIFAR-10 as torchvision checks them.
OFFICIAL_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "svhn": {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
        "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
}


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], as the paper's code: float(x) * (2/255) - 1 (two fp32
    roundings, in that order; 0 -> -1 and 255 -> 1 exactly). Floating input is returned as is."""
    if pixels.is_floating_point():
        return pixels
    if pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8 (raw bytes) or floating point in [-1, 1], got {pixels.dtype}")
    return pixels.float().mul_(2.0 / 255).sub_(1.0)


def checksum_hint(dataset: str, name: str) -> str:
    """' (the official <name> has MD5 ...)' when the checksum is known, else ''."""
    md5 = OFFICIAL_MD5.get(dataset, {}).get(name)
    return f" (the official {name} has MD5 {md5})" if md5 else ""


def find_file(folder: Path, names: Iterable[str], what: str) -> Path:
    """The first of `names` that exists in `folder`; FileNotFoundError naming them and `what` if none."""
    names = list(names)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: missing {' or '.join(names)} ({what})")


def check_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    return folder


def md5_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_md5(dataset: str, path: Path) -> None:
    """Compare `path` with its official MD5 (when known); ValueError naming both on a mismatch."""
    expected = OFFICIAL_MD5.get(dataset, {}).get(path.name)
    if expected is None:
        return
    got = md5_of(path)
    if got != expected:
        raise ValueError(f"{path}: MD5 {got} does not match the official {path.name} ({expected}); "
                         f"the file is damaged or not the official one")


def check_labels(labels, nclass: int, path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= nclass):
        raise ValueError(f"{path}: labels must lie in [0, {nclass}), found [{labels.min()}, {labels.max()}]")
