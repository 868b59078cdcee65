"""CelebA from the aligned JPEG folder `img_align_celeba/` (202,599 files 000001.jpg.., 178 wide x
218 high), prepared as the paper's code does (SPEC.md section 3): pixels scaled to [-1, 1], the
central 146x146 region kept (36 rows off the top and bottom, 16 columns off the left and right),
then resized to 32x32 by TF1's `tf.image.resize_bicubic` (restated in `resize_bicubic`).

The resized pixels are not bytes, so CelebA is returned as float32. Bicubic resizing overshoots
[-1, 1] a little at sharp edges; the paper's code keeps the overshoot, but acai_fast's trainer takes
images in [-1, 1] only, so they are clipped there by default (clip=False keeps the paper's values). No labels: the paper's code gives every
image class 0 of 1, so the probe learns nothing and clustering does not apply. Split "test" is the
same images, as in the paper's code (its celeba32_test reads the training records)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .common import check_folder, to_unit_range

HEIGHT, WIDTH = 218, 178  # the aligned images
CROP_TOP, CROP_LEFT, CROP = 36, 16, 146  # rows 36..181, columns 16..161
OFFICIAL_COUNT = 202599
_TABLE_SIZE = 1024  # TF1 looks the cubic weights up in a table of 1024 steps per pixel


def _keys_cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (TF1 and PyTorch use -0.75)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_weights(in_size: int, out_size: int, coordinates: str = "tf1") -> np.ndarray:
    """The (out_size, in_size) float64 matrix of a 1-D bicubic resize (Keys, a = -0.75; taps
    outside the image repeat the edge pixel).

    coordinates "tf1": TF1's resize_bicubic without align_corners or half-pixel centres, which the
    paper's code calls: output pixel i samples input position i * in/out, and the fractional part
    is rounded to 1/1024 (TF's weight table). "half_pixel": PyTorch's
    interpolate(mode="bicubic", align_corners=False): position (i + 0.5) * in/out - 0.5."""
    if coordinates not in ("tf1", "half_pixel"):
        raise ValueError(f"coordinates must be 'tf1' or 'half_pixel', got {coordinates!r}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got {in_size} -> {out_size}")
    out = np.arange(out_size)
    if coordinates == "tf1":
        scale = np.float32(in_size) / np.float32(out_size)  # TF computes the scale and position in fp32
        pos = out.astype(np.float32) * scale
        base = np.floor(pos)
        delta = np.rint((pos - base) * _TABLE_SIZE) / _TABLE_SIZE
    else:
        pos = (out + 0.5) * (in_size / out_size) - 0.5
        base = np.floor(pos)
        delta = pos - base
    weights = np.zeros((out_size, in_size))
    for tap in (-1, 0, 1, 2):
        idx = np.clip(base.astype(np.int64) + tap, 0, in_size - 1)
        np.add.at(weights, (out, idx), _keys_cubic(delta.astype(np.float64) - tap))
    return weights


def resize_bicubic(images: torch.Tensor, size: tuple[int, int], coordinates: str = "tf1") -> torch.Tensor:
    """Bicubic resize of (N, C, H, W) floating images to (N, C, *size), separably, in fp32 (see
    bicubic_weights for `coordinates`). No clipping: like TF, the result may overshoot the input range."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating (N, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    rows = torch.from_numpy(bicubic_weights(images.shape[2], size[0], coordinates)).to(images)
    cols = torch.from_numpy(bicubic_weights(images.shape[3], size[1], coordinates)).to(images)
    # (N, C, H, W) -> (N, C, h, W) -> (N, C, h, w)
    return torch.einsum("ih,nchw,jw->ncij", rows, images, cols)


def prepare_celeba(pixels: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Aligned CelebA images, uint8 (N, 3, 218, 178) -> the paper's float32 (N, 3, 32, 32): scale to
    [-1, 1], crop the central 146x146, resize bicubically (TF1) to 32x32 (the paper's order), then
    clip the resize's overshoot back to [-1, 1] (clip=True, the trainer's input range)."""
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, HEIGHT, WIDTH):
        raise ValueError(f"expected (N, 3, {HEIGHT}, {WIDTH}) aligned CelebA images, got {tuple(pixels.shape)}")
    x = to_unit_range(pixels)[:, :, CROP_TOP:CROP_TOP + CROP, CROP_LEFT:CROP_LEFT + CROP]
    x = resize_bicubic(x, (32, 32), "tf1")
    return x.clamp_(-1, 1) if clip else x


def _image_folder(folder: Path) -> Path:
    for base in (folder / "img_align_celeba", folder):
        if base.is_dir() and any(base.glob("*.jpg")):
            return base
    raise FileNotFoundError(f"{folder}: no img_align_celeba/ folder of JPEGs (the aligned CelebA images: "
                            f"{OFFICIAL_COUNT:,} files 000001.jpg ..., {WIDTH}x{HEIGHT} pixels)")


def _read_jpeg(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # Pillow: a dependency of matplotlib (>= 3.3), ours

    try:
        with Image.open(path) as im:
            if im.format != "JPEG":
                raise ValueError(f"{path}: a {im.format} image, expected a JPEG")
            if im.size != (WIDTH, HEIGHT) or im.mode != "RGB":
                raise ValueError(f"{path}: {im.size[0]}x{im.size[1]} {im.mode}, expected a {WIDTH}x{HEIGHT} "
                                 f"RGB JPEG (an aligned CelebA image)")
            return np.asarray(im)  # (218, 178, 3)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: not a readable JPEG ({exc}); truncated or damaged") from None


def load_celeba(folder: str | os.PathLike, split: str = "train", *, limit: int | None = None,
                progress: bool = True, chunk: int = 2048, clip: bool = True) -> tuple[torch.Tensor, None]:
    """CelebA as the paper prepares it: ((N, 3, 32, 32) float32, None), N = every JPEG of
    img_align_celeba/ in file-name order (the first `limit` if given), clipped to [-1, 1] unless
    clip=False (see prepare_celeba). Decodes in threads, `chunk` images at a time, with a progress
    bar (about 1 ms per image per core)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (the same images), got {split!r}")
    files = sorted(_image_folder(check_folder(folder)).glob("*.jpg"))[:limit]
    from ..progress import progress as progress_report

    out = []
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool, progress_report(len(files), unit="img", desc="celeba",
                                                               enabled=progress and len(files) >= chunk) as bar:
        for start in range(0, len(files), chunk):
            block = np.stack(list(pool.map(_read_jpeg, files[start:start + chunk])))
            pixels = torch.from_numpy(block).permute(0, 3, 1, 2)  # (B, 218, 178, 3) -> (B, 3, 218, 178)
            out.append(prepare_celeba(pixels, clip))
            bar.update(len(block))
    return torch.cat(out), None

