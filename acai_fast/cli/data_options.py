"""The --data option of the sub-commands: the preset's dataset read from a folder (the paper's
files), or your own images (a folder of PNG/JPEG files or an .npy/.npz array; acai_fast.data.images),
each a mistake reported in one line (exit 2) before any training."""
from __future__ import annotations

from ..config import ACAIConfig


def dataset_kind(config: ACAIConfig) -> str:
    """"lines" (generated) or "image" (a dataset read from --data)."""
    return "lines" if config.dataset == "lines" else "image"


# CelebA's "test" split is its training set (as in the paper's code): pictures need only a few.
TEST_LIMIT = {"celeba": 2048}


def load_split(parser, config: ACAIConfig, folder, split, *, pixels=False, limit=None):
    """The preset's dataset `split` from --data (or $ACAI_FAST_DATA): (float32 images in [-1, 1], or
    the stored uint8 pixels with pixels=True; int64 labels, None for CelebA). A missing folder or a
    missing or malformed file exits with status 2 and one line naming it."""
    from ..data import data_folder, dataset_of_preset, load_dataset, load_pixels

    name = dataset_of_preset(config.dataset)
    try:
        root = data_folder(folder)
    except ValueError as exc:
        parser.error(f"this preset trains on {name}: {exc}")
    if limit is None and split == "test":
        limit = TEST_LIMIT.get(name)
    try:
        return (load_pixels if pixels else load_dataset)(name, root, split, limit=limit)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--data: {exc}")


def own_images(parser, args, config: ACAIConfig):
    """--data (else $ACAI_FAST_DATA) as your own images, prepared in `config`'s colours (an
    acai_fast.data.ImageSet), or None when it names the paper's dataset files or is not set. A
    folder holding the paper's official file names is the paper's data; any other folder, or an
    .npy/.npz file, is yours. Unreadable data, or a lines preset given images, exits 2."""
    import os

    from ..data import is_own_data, load_images
    from ..data.datasets import DATA_ENV

    path = args.data if args.data is not None else os.environ.get(DATA_ENV) or None
    if path is None or not is_own_data(path):
        return None
    if config.dataset == "lines":
        parser.error(f"--data {path}: the lines preset generates its data; your own images need an image "
                     f"preset (mnist32, mnist256: grey; svhn32, celeba32, cifar256, ...: colour)")
    try:
        return load_images(path, config.colors, test_fraction=args.test_fraction,
                           progress=not getattr(args, "no_progress", False))
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--data: {exc}")


def own_splits(parser, own, config: ACAIConfig, *, train: bool = True):
    """(x_train, y_train, x_test, y_test) of your images for a model of `config`: its probe must
    hold their classes; training needs one batch of training images."""
    x, y = own.split("train")
    x_test, y_test = own.split("test")
    if own.nclass is not None and own.nclass > config.nclass:
        parser.error(f"--data: {own.nclass} classes ({', '.join(own.classes[:4])}{', ...' if own.nclass > 4 else ''}), "
                     f"but the model's probe has {config.nclass} (config.nclass); train on these images "
                     f"to get a probe for them")
    if train and len(x) < config.batch:
        parser.error(f"--data: the training split holds {len(x)} images, fewer than one batch of "
                     f"{config.batch} (lower --batch or --test-fraction, or add images)")
    return x, y, x_test, y_test


def probe_evaluation(x_test, y_test):
    from ..eval.probe import probe_accuracy

    def evaluate(trainer):
        return dict(probe_accuracy=probe_accuracy(trainer, x_test, y_test))
    return evaluate
