"""Pictures: grids of interpolations, like the paper's figures, and their back-and-forth GIF."""
from __future__ import annotations

import os

import numpy as np
import torch


def interpolation_grid(images: torch.Tensor, gap: int = 1) -> np.ndarray:
    """(rows, steps, colors, H, W) images in [-1, 1] -> one uint8 picture (H*rows, W*steps[, 3])
    with a `gap`-pixel white border between rows; values outside [-1, 1] are clipped."""
    if images.dim() != 5 or images.shape[2] not in (1, 3):
        raise ValueError(f"expected (rows, steps, 1 or 3, H, W), got {tuple(images.shape)}")
    rows, steps, colors, h, w = images.shape
    pix = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = np.full((rows * (h + gap) - gap, steps * w, colors), 255, dtype=np.uint8)
    for r in range(rows):
        # (steps, C, H, W) -> (H, steps*W, C)
        grid[r * (h + gap):r * (h + gap) + h] = pix[r].permute(2, 0, 3, 1).reshape(h, steps * w, colors).numpy()
    return grid[..., 0] if colors == 1 else grid


def save_interpolation_grid(images: torch.Tensor, path: str | os.PathLike, scale: int = 2) -> None:
    """Write the grid of `images` (rows of interpolations) as a PNG, each pixel `scale`x`scale`."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.image

    grid = interpolation_grid(images)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    tmp = f"{path}.tmp.png"
    matplotlib.image.imsave(tmp, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255)
    os.replace(tmp, path)


def save_interpolation_gif(images: torch.Tensor, path: str | os.PathLike, scale: int = 4,
                           frame_ms: int = 100, hold_ms: int = 600) -> None:
    """Write (rows, steps, colors, H, W) interpolations in [-1, 1] as an animated GIF that plays
    back and forth (steps 0 .. S-1 .. 1, looping): frame t shows step t of every row, stacked as
    in the grid, each pixel `scale`x`scale`; the two ends are held `hold_ms`, the others `frame_ms`."""
    from PIL import Image

    steps = images.shape[1]
    order = list(range(steps)) + list(range(steps - 2, 0, -1))
    frames = []
    for t in order:
        frame = interpolation_grid(images[:, t:t + 1]).repeat(scale, axis=0).repeat(scale, axis=1)
        frames.append(Image.fromarray(frame))
    durations = [hold_ms if t in (0, steps - 1) else frame_ms for t in order]
    tmp = f"{path}.tmp.gif"
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    os.replace(tmp, path)
