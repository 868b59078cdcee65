"""Your own images: a folder of image files (PNG, JPEG, BMP, GIF, TIFF, WebP; any size, any nesting)
or a NumPy array file (.npy, .npz), prepared for a preset's networks as the paper prepares CelebA:
centre-cropped to a square, resized to 32x32 by TF1's bicubic resize (acai_fast.data.celeba,
`resize_bicubic`), in the preset's colours, scaled to [-1, 1] and split into train and test by a
seeded fraction.

    data = load_images("my_photos/", colors=3)           # an ImageSet
    x, y = data.split("train")                           # float32 (N, 3, 32, 32) in [-1, 1], labels or None

Labels (the torchvision ImageFolder convention): when the images lie in first-level subfolders,
each subfolder is a class (sorted names: the first is label 0) and deeper nesting is ignored for
labels; images directly in the folder and no subfolders: no labels. Images both directly in the
folder and in subfolders are refused (which would be meant?). Arrays: an .npy holds the images; an
.npz holds them under `images` (or `x`, or its only array) with optional `labels` (or `y`), one per
image, integers or strings, and optional `names` (strings). Images are uint8 (N, H, W) grey or
(N, H, W, C) with C 1 (grey) or 3 (RGB). Labels are numbered in the sorted order of their values
(`ImageSet.classes` holds the values as text).

Preparation, per image: decoded by Pillow (EXIF rotation applied; 16-bit grey scaled to 8 bits;
alpha dropped), converted to the preset's colours (grey -> RGB repeats the channel; RGB -> grey is
Pillow's luma, L = (19595 R + 38470 G + 7471 B + 2^15) >> 16), scaled x * 2/255 - 1, the central
square kept, shrunk first by an integer box average when its side is 256 or more (to a side in
[64, 128): TF1's bicubic resize reads only 4x4 pixels per output pixel, so a 3000-pixel photo would
otherwise be sampled at 4 of every 94 pixels; CelebA's 146-pixel crop is resized as it is), resized
bicubically (TF1) to 32x32 and clipped to [-1, 1] (the bicubic overshoot), as CelebA. A square
32x32 image comes out exactly as x * 2/255 - 1 (the resize is then the identity).

The split: `round(N * test_fraction)` images (when the fraction is > 0: at least 2, a pair, and at
most N - 1) chosen by numpy.random.default_rng(seed).permutation(N) form "test", the others
"train", both in source order. A fraction of 0 makes "test" the training images (as CelebA's test split is).
Sources are read in a fixed order (files sorted by their relative path), so a split is a pure
function of the folder's contents, the fraction and the seed.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .celeba import resize_bicubic
from .common import to_unit_range

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_KEYS, LABEL_KEYS, NAME_KEYS = ("images", "x"), ("labels", "y"), ("names",)
SIZE = 32  # every preset's image size
SHRINK_FROM, SHRINK_TO = 256, 64  # a side >= 256 is box-averaged by side // 64 first (to [64, 128))
_CHUNK = 256  # images decoded per chunk
_RESIZE_FLOATS = 1 << 25  # at most this many floats (128 MiB) per resize call


# ------------------------------------------------------------------------------------------------
# Which --data is yours: the paper's datasets are recognised by their official file names
# (acai_fast.data.datasets.is_official)
# ------------------------------------------------------------------------------------------------

def is_own_data(path: str | os.PathLike) -> bool:
    """Whether --data `path` names your own images rather than the paper's dataset files: an
    .npy/.npz file, or an existing folder that holds an image file (at any depth) and that
    `is_official` does not recognise. A folder without any image (empty, or the paper's files
    not downloaded yet) is taken as the paper's dataset, whose loader names the files it misses."""
    from .datasets import is_official

    path = Path(path)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return True
    return path.is_dir() and not is_official(path) and _holds_an_image(path)


def _holds_an_image(folder: Path) -> bool:
    """Any image file below `folder` (stops at the first one found)."""
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES for f in files):
            return True
    return False


# ------------------------------------------------------------------------------------------------
# The prepared set
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageSet:
    """Your images, prepared (see the module docstring).

    images: (N, colors, 32, 32) float32 in [-1, 1], in source order; labels: (N,) int64 in
    [0, nclass) or None; classes: the class names (subfolders or label values as text), label k is
    classes[k], or None; names: each image's file path relative to the folder (arrays: the
    array's `names`, else "images[i]"); is_test: (N,) bool, the test split; source: the path read."""
    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] | None
    names: list[str]
    is_test: torch.Tensor
    source: str

    @property
    def nclass(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def indices(self, split: str = "all") -> torch.Tensor:
        """Positions of the images of `split` ("train", "test" or "all"), in source order."""
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        every = torch.arange(len(self.images))
        if split == "all" or not self.is_test.any():  # fraction 0: test = train = everything
            return every
        return every[self.is_test if split == "test" else ~self.is_test]

    def split(self, split: str = "all") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, labels or None) of `split`."""
        idx = self.indices(split)
        return self.images[idx], (self.labels[idx] if self.labels is not None else None)


def load_images(path: str | os.PathLike, colors: int, *, test_fraction: float = 0.1, seed: int = 0,
                progress: bool = True) -> ImageSet:
    """Your images at `path` (a folder or an .npy/.npz file), prepared for a preset of `colors`
    channels (1 grey, 3 RGB) and split (module docstring). Raises FileNotFoundError for a missing
    path and ValueError, in one line naming the file, for everything else: no images, fewer than 2,
    an unreadable, truncated or unconvertible file, bad array keys, shapes, dtypes or labels."""
    if colors not in (1, 3):
        raise ValueError(f"colors must be 1 (grey) or 3 (RGB), got {colors!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        images, labels, classes, names = _load_folder(path, colors, progress)
    elif path.suffix.lower() in ARRAY_SUFFIXES:
        images, labels, classes, names = _load_array(path, colors)
    else:
        raise ValueError(f"{path}: expected a folder of images or an .npy/.npz array file")
    n = len(names)
    is_test = torch.zeros(n, dtype=torch.bool)
    if test_fraction > 0:
        n_test = min(max(round(n * test_fraction), 2), n - 1)
        is_test[torch.from_numpy(np.random.default_rng(seed).permutation(n)[:n_test])] = True
    return ImageSet(images, labels, classes, names, is_test, str(path))


def load_image_files(paths, colors: int) -> torch.Tensor:
    """Image files prepared as load_images prepares a folder's: (len(paths), colors, 32, 32)
    float32 in [-1, 1] (acai-fast interpolate --between)."""
    return prepare([read_image(Path(p)) for p in paths], colors)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def find_images(folder: Path) -> list[Path]:
    """The image files under `folder` (by suffix, any depth, hidden files and folders skipped),
    sorted by their relative path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / f for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _labels_of_folder(folder: Path, files: list[Path]) -> tuple[torch.Tensor | None, list[str] | None]:
    """ImageFolder labels: the first-level subfolder of each file (sorted names), or None."""
    firsts = [p.relative_to(folder).parts for p in files]
    top = [p for p in firsts if len(p) == 1]
    if len(top) == len(firsts):
        return None, None
    if top:
        subs = sorted({p[0] for p in firsts if len(p) > 1})
        shown = ", ".join(s + "/" for s in subs[:5]) + (" ..." if len(subs) > 5 else "")
        raise ValueError(f"{folder}: {len(top)} image(s) (e.g. {top[0][0]}) lie directly in the folder beside "
                         f"the class subfolders {shown}: put every image in a class subfolder (the labels), "
                         f"or no image in one")
    classes = sorted({p[0] for p in firsts})
    index = {c: k for k, c in enumerate(classes)}
    return torch.tensor([index[p[0]] for p in firsts], dtype=torch.long), classes


def read_image(path: Path) -> np.ndarray:
    """One image file -> uint8 (H, W, 1) grey or (H, W, 3) RGB (module docstring); ValueError naming
    the file when it cannot be read (truncated, damaged, not an image) or converted."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # loads the pixels: a truncated file fails here
            mode = im.mode
            if mode.startswith("I;16"):  # 16-bit grey: round(v * 255 / 65535)
                v = np.asarray(im).astype(np.uint32)
                return ((v * 255 + 32767) // 65535).astype(np.uint8)[..., None]
            if mode in ("I", "F"):
                kind = "32-bit integer" if mode == "I" else "floating-point"
                raise ValueError(f"{path}: {kind} pixels (mode {mode}) have no agreed 8-bit colours; save "
                                 f"it as an 8-bit PNG or JPEG")
            grey = mode in ("1", "L", "LA", "La")
            try:
                im = im.convert("L" if grey else "RGB")
            except ValueError as exc:
                raise ValueError(f"{path}: mode {mode} cannot be converted to grey or RGB ({exc})") from None
            pixels = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc}); truncated or damaged?") from None
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _load_folder(folder: Path, colors: int, progress: bool):
    files = find_images(folder)
    if not files:
        raise ValueError(f"{folder}: no images found ({', '.join(s[1:] for s in IMAGE_SUFFIXES)} files, in "
                         f"the folder or its subfolders)")
    if len(files) < 2:
        raise ValueError(f"{folder}: found 1 image ({files[0].name}); need at least 2 (ACAI mixes pairs)")
    labels, classes = _labels_of_folder(folder, files)
    out = torch.empty(len(files), colors, SIZE, SIZE)
    workers = min(8, os.cpu_count() or 1)
    # Each image is prepared in its worker as soon as it is decoded: only `workers` full-size photos
    # are in memory at once (a 24-megapixel photo decodes to 72 MB).
    with ThreadPoolExecutor(workers) as pool, _progress_bar(len(files), folder.name, progress) as bar:
        for start in range(0, len(files), _CHUNK):
            chunk = files[start:start + _CHUNK]
            for i, image in enumerate(pool.map(lambda path: prepare([read_image(path)], colors)[0], chunk)):
                out[start + i] = image
            bar.update(len(chunk))
    return out, labels, classes, [p.relative_to(folder).as_posix() for p in files]


def _progress_bar(total: int, desc: str, enabled: bool):
    """acai_fast.progress for sets large enough to wait for (a bar on a terminal, lines in a log)."""
    from ..progress import progress

    return progress(total, desc=desc, unit="img", enabled=enabled and total >= 4 * _CHUNK)


def _load_array(path: Path, colors: int):
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable {path.suffix} array file ({str(exc).splitlines()[0]}); "
                         f"truncated or damaged?") from None
    labels = names = None
    if isinstance(loaded, np.ndarray):  # .npy: the images alone
        images = loaded
    else:
        with loaded:
            keys = list(loaded.keys())
            key = _key(keys, IMAGE_KEYS) or (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{path}: no images array: expected the key 'images' or 'x' (or a single array); "
                                 f"found {', '.join(repr(k) for k in keys) or 'no arrays'}")
            try:
                images = loaded[key]
                labels = loaded[_key(keys, LABEL_KEYS)] if _key(keys, LABEL_KEYS) else None
                names = loaded[_key(keys, NAME_KEYS)] if _key(keys, NAME_KEYS) else None
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # a damaged member, or an object array
                raise ValueError(f"{path}: not a readable .npz array file ({str(exc).splitlines()[0]}); "
                                 f"truncated or damaged?") from None
    images = _check_images(path, images)
    n = images.shape[0]
    out_labels = classes = None
    if labels is not None:
        if labels.shape != (n,) or not (labels.dtype.kind in "iu" or labels.dtype.kind == "U"):
            raise ValueError(f"{path}: labels must be one integer or string per image, shape ({n},), got "
                             f"{labels.shape} {labels.dtype}")
        values, index = np.unique(labels, return_inverse=True)
        out_labels = torch.from_numpy(index.reshape(-1).astype(np.int64))
        classes = [str(v) for v in values]
    if names is not None:
        if names.shape != (n,) or names.dtype.kind != "U":
            raise ValueError(f"{path}: names must be one string per image, shape ({n},), got {names.shape} "
                             f"{names.dtype}")
        names = [str(s) for s in names]
    else:
        names = [f"images[{i}]" for i in range(n)]
    pixels = images if images.ndim == 4 else images[..., None]
    out = [prepare(pixels[s:s + 4 * _CHUNK], colors) for s in range(0, n, 4 * _CHUNK)]
    return torch.cat(out), out_labels, classes, names


def _key(keys, wanted) -> str | None:
    return next((k for k in wanted if k in keys), None)


def _check_images(path: Path, images: np.ndarray) -> np.ndarray:
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        hint = ("; channels first? transpose to (N, H, W, C)" if images.ndim == 4 and images.shape[1] in (1, 3)
                else "")
        raise ValueError(f"{path}: images must be (N, H, W) grey or (N, H, W, C) with C 1 or 3, got shape "
                         f"{images.shape}{hint}")
    if images.dtype != np.uint8:
        hint = ("; if they lie in [0, 1]: (x * 255).round().astype(numpy.uint8)" if images.dtype.kind == "f"
                else "")
        raise ValueError(f"{path}: images must be uint8 pixels (0..255), got {images.dtype}{hint}")
    if images.shape[0] < 2:
        raise ValueError(f"{path}: {images.shape[0]} image(s); need at least 2 (ACAI mixes pairs)")
    if min(images.shape[1:3]) < 1:
        raise ValueError(f"{path}: images of shape {images.shape[1:3]} hold no pixels")
    return images


# ------------------------------------------------------------------------------------------------
# Preparation: colours, centre crop, shrink, TF1 bicubic resize
# ------------------------------------------------------------------------------------------------


def to_colors(pixels: np.ndarray, colors: int) -> np.ndarray:
    """uint8 (..., H, W, 1 or 3) -> (..., H, W, colors): grey repeated to RGB, or RGB to Pillow's
    luma L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 (exactly Image.convert("L"))."""
    have = pixels.shape[-1]
    if have == colors:
        return pixels
    if colors == 3:
        return np.repeat(pixels, 3, axis=-1)
    rgb = pixels.astype(np.uint32)
    grey = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return grey.astype(np.uint8)[..., None]


def square_crop(pixels: np.ndarray) -> np.ndarray:
    """The central square of (..., H, W, C): side min(H, W), offsets (H - side) // 2, (W - side) // 2."""
    h, w = pixels.shape[-3:-1]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return pixels[..., top:top + side, left:left + side, :]


def shrink_factor(side: int) -> int:
    """The integer box-average factor applied before the bicubic resize: side // 64 for a side of
    256 or more (leaving a side in [64, 128)), else 1."""
    return side // SHRINK_TO if side >= SHRINK_FROM else 1


def prepare(images, colors: int) -> torch.Tensor:
    """uint8 images ((H, W, C) arrays of any sizes, or one (N, H, W, C) array), C 1 or 3 -> float32
    (N, colors, 32, 32) in [-1, 1] (module docstring): colours, scale, central square, box shrink,
    TF1 bicubic resize, clip. Images of one square size are resized together."""
    squares = [to_colors(square_crop(np.asarray(im)), colors) for im in images]
    out = torch.empty(len(squares), colors, SIZE, SIZE)
    by_side: dict[int, list[int]] = {}
    for i, sq in enumerate(squares):
        by_side.setdefault(sq.shape[0], []).append(i)
    for side, members in by_side.items():
        f = shrink_factor(side)
        kept = side // f * f  # a multiple of f, centred
        step = max(1, _RESIZE_FLOATS // (side * side * colors))
        for s in range(0, len(members), step):
            group = members[s:s + step]
            pix = np.stack([squares[i] for i in group])  # (B, side, side, C)
            off = (side - kept) // 2
            pix = pix[:, off:off + kept, off:off + kept]
            x = to_unit_range(torch.from_numpy(np.ascontiguousarray(pix))).permute(0, 3, 1, 2)  # -> (B, C, s, s)
            if f > 1:  # (B, C, s, s) -> (B, C, s/f, f, s/f, f) -> (B, C, s/f, s/f)
                x = x.reshape(len(group), colors, kept // f, f, kept // f, f).mean(dim=(3, 5))
            out[group] = resize_bicubic(x.contiguous(), (SIZE, SIZE), "tf1").clamp_(-1, 1)
    return out
