"""One entry point for the paper's image datasets (SPEC.md section 3): `load_dataset(name, folder,
split)`, and which dataset a preset trains on.

    images, labels = load_dataset("svhn", "/data/svhn", "train")     # float32 (N, 3, 32, 32) in [-1, 1]
    pixels, labels = load_pixels("svhn", "/data/svhn", "train")      # the same as uint8 bytes

`folder` may hold the files or a subfolder named after the dataset (mnist/, fashion-mnist/, svhn/,
cifar10/, celeba/), so one root (--data or ACAI_FAST_DATA) can serve every preset. `is_official`
recognises such a folder by its official file names; any other folder of images, or an .npy/.npz
array, is the user's own data (acai_fast.data.images).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import to_unit_range

DATASETS = ("mnist", "fashion_mnist", "svhn", "cifar10", "celeba")
NCLASS = {"mnist": 10, "fashion_mnist": 10, "svhn": 10, "cifar10": 10, "celeba": None}
_SUBFOLDERS = {"mnist": ("mnist", "MNIST"), "fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST"),
               "svhn": ("svhn", "SVHN"), "cifar10": ("cifar10", "cifar-10", "CIFAR10", "cifar"),
               "celeba": ("celeba", "CelebA")}
# ACAIConfig.dataset (a preset's family) -> the dataset it trains on by default
PRESET_DATASETS = {"mnist": "mnist", "svhn": "svhn", "cifar": "cifar10", "celeba": "celeba"}
DATA_ENV = "ACAI_FAST_DATA"


# Names that mark a folder as one of the paper's datasets (acai_fast.data.load_dataset), in the
# folder or a subfolder named after the dataset.
OFFICIAL_NAMES = (
    *(f"{s}-{k}-idx{d}-ubyte{z}" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))
      for z in ("", ".gz")),                                              # MNIST, Fashion-MNIST
    "train_32x32.mat", "test_32x32.mat", "extra_32x32.mat",               # SVHN
    *(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "cifar-10-python.tar.gz",
    "cifar-10-batches-py",                                                # CIFAR-10
    "img_align_celeba", "000001.jpg",                                     # CelebA
)


def is_official(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds one of the paper's datasets: it is named img_align_celeba, or it or
    one of its dataset-named subfolders (mnist/, svhn/, ...) holds an official file name."""
    folder = Path(folder)
    if folder.name == "img_align_celeba":
        return True
    places = [folder] + [folder / s for subs in _SUBFOLDERS.values() for s in subs]
    return any((place / name).exists() for place in places if place.is_dir() for name in OFFICIAL_NAMES)


def dataset_of_preset(family: str) -> str:
    """The dataset a preset family (ACAIConfig.dataset: mnist, svhn, cifar, celeba) trains on."""
    if family not in PRESET_DATASETS:
        raise ValueError(f"preset family {family!r} has no image dataset (image families: "
                         f"{', '.join(PRESET_DATASETS)})")
    return PRESET_DATASETS[family]


def data_folder(folder: str | os.PathLike | None = None) -> Path:
    """`folder`, else $ACAI_FAST_DATA; ValueError saying how to name one when neither is set."""
    folder = folder if folder is not None else os.environ.get(DATA_ENV) or None
    if folder is None:
        raise ValueError(f"no data folder: pass --data DIR (or set {DATA_ENV}=DIR)")
    return Path(folder)


def _read(name, folder, split, limit, verify, progress):
    if name in ("mnist", "fashion_mnist"):
        from .idx import load_idx_pixels
        return load_idx_pixels(folder, split, dataset=name, limit=limit, verify=verify)
    if name == "svhn":
        from .svhn import load_svhn_pixels
        return load_svhn_pixels(folder, split, limit=limit, verify=verify)
    if name == "cifar10":
        from .cifar import load_cifar10_pixels
        return load_cifar10_pixels(folder, split, limit=limit, verify=verify)
    from .celeba import load_celeba
    return load_celeba(folder, split, limit=limit, progress=progress)


def load_pixels(name: str, folder: str | os.PathLike, split: str = "train", *, limit: int | None = None,
                verify: bool = False, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dataset as stored: (images (N, colors, 32, 32), labels (N,) int64 or None for celeba).
    Images are uint8 bytes (float32 in [-1, 1] for celeba, whose resized pixels are not bytes).

    limit: only the first `limit` images (file order). verify: compare each file with its official
    MD5 first (reads it twice). Every missing, truncated or malformed file raises FileNotFoundError
    or ValueError naming it and what was expected."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    folder = Path(folder)
    try:
        return _read(name, folder, split, limit, verify, progress)
    except FileNotFoundError as first:
        for sub in _SUBFOLDERS[name]:
            if (folder / sub).is_dir():
                try:
                    return _read(name, folder / sub, split, limit, verify, progress)
                except FileNotFoundError:
                    pass
        tried = ", ".join(f"{s}/" for s in _SUBFOLDERS[name])
        raise FileNotFoundError(f"{first} (also looked in the subfolders {tried})") from None


def load_dataset(name: str, folder: str | os.PathLike, split: str = "train", *, limit: int | None = None,
                 verify: bool = False, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`name`'s `split` from `folder` as the paper prepares it: (images float32 (N, colors, 32, 32)
    in [-1, 1] (x * 2/255 - 1), labels int64 (N,), None for celeba).

    mnist, fashion_mnist: the official IDX files (.gz or not), padded by 2 pixels of -1;
    svhn: train_32x32.mat (+ extra_32x32.mat for "train"), test_32x32.mat; labels are the digits;
    cifar10: the python batches, from the folder or cifar-10-python.tar.gz;
    celeba: img_align_celeba/, cropped to the central 146x146 and resized bicubically to 32x32.
    See load_pixels for limit, verify and the errors."""
    images, labels = load_pixels(name, folder, split, limit=limit, verify=verify, progress=progress)
    return to_unit_range(images), labels
