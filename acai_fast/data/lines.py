"""The synthetic lines data of the paper (SPEC.md section 4): the rasteriser and the training stream.
Its metrics (Mean Distance, Smoothness) are in acai_fast.eval.lines.

`draw_lines` reproduces the official (brain-research/acai) single-line rasteriser bit-for-bit, but
for a whole batch of angles at once on any device: every (line, major-axis row) pair is one element of
a tensor, and each row touches at most ceil(w) + 2 cells, so the image is one scatter.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

SIZE = 32  # the paper's lines are 32x32
WIDTH = 2.0  # line width in pixels
NCLASS = 10  # angle bins of the probe label


def angle_labels(angles) -> torch.Tensor:
    """The probe label of each angle: floor(10 * a / (2*pi - 1e-6)), as int64.

    For a in [2*pi - 1e-6, 2*pi) the formula gives 10 (the official code's one-hot is then all
    zeros, a sample without loss); it is clamped to 9 here so that every label is a valid class."""
    a = torch.as_tensor(angles, dtype=torch.float64)
    return torch.floor(10 * a / (2 * math.pi - 1e-6)).long().clamp_(0, NCLASS - 1)


def _endpoints(angles: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N,) angles -> (N, 4) float64 [u0, v0, u1, v1].

    Why math.cos/math.sin one angle at a time: torch's vectorised float64 cos/sin differ from the C
    library in the last bit for ~0.1% of angles (242 of 200,000 seen on this CPU), which moves a
    pixel by 1 ulp; the official code uses math.cos, and 10,000 scalar calls take ~3 ms.
    """
    u0, v0 = h * 0.5, w * 0.5
    out = np.empty((len(angles), 4), dtype=np.float64)
    out[:, 0], out[:, 1] = u0, v0
    out[:, 2] = [u0 + (u0 - 1) * math.cos(-a) for a in angles]
    out[:, 3] = [v0 + (v0 - 1) * math.sin(-a) for a in angles]
    return out


def draw_lines(angles, size: int = SIZE, width: float = WIDTH, *, device=None,
               dtype=torch.float32) -> torch.Tensor:
    """Rasterise one line per angle (radians): -> (N, 1, size, size) in [-1, 1], background -1.

    The line starts at the image centre and is size/2 - 1 pixels long; angle 0 points right and
    pi/2 up. Computed in float64 (as the official code) and cast to `dtype` at the end.
    """
    angles = np.asarray(torch.as_tensor(angles, dtype=torch.float64).cpu(), dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(angles)):
        raise ValueError("draw_lines: angles must be finite")
    if size < 4:
        raise ValueError(f"draw_lines: size must be >= 4, got {size}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    n, h, w = len(angles), size, size
    f64 = dict(dtype=torch.float64, device=device)
    ends = torch.from_numpy(_endpoints(angles, h, w)).to(device)
    u0, v0, u1, v1 = ends.unbind(1)

    # The major axis p is v (rows) unless the line is flatter than 45 degrees; q is the minor axis.
    flip = (v0 - v1).abs() < (u0 - u1).abs()
    p0, p1 = torch.where(flip, u0, v0), torch.where(flip, u1, v1)
    q0, q1 = torch.where(flip, v0, u0), torch.where(flip, v1, u1)
    swap = p1 < p0  # order the end points so that p0 <= p1
    p0, p1, q0, q1 = (torch.where(swap, p1, p0), torch.where(swap, p0, p1),
                      torch.where(swap, q1, q0), torch.where(swap, q0, q1))
    q0, q1 = q0 - width / 2, q1 - width / 2
    dp = p1 - p0
    slope = torch.where(dp != 0, (q1 - q0) / torch.where(dp != 0, dp, 1.0), 0.0)
    p_in, p_out = torch.ceil(p0), torch.trunc(p1)  # rows strictly inside get weight 1

    # Every major-axis row p = trunc(p0) + k, k < size + 1, that lies before ceil(p1): (N, K).
    k = torch.arange(size + 1, **f64)
    p = torch.trunc(p0)[:, None] + k[None, :]
    row_ok = p < torch.ceil(p1)[:, None]
    weight = torch.where(p < p_in[:, None], (p_in - p0)[:, None],
                         torch.where(p > p_out[:, None], (p1 - p_out)[:, None], torch.ones_like(p)))
    start = q0[:, None] + (p - p0[:, None] - 0.5) * slope[:, None]
    end = start + width
    first_full, stop = torch.ceil(start), torch.trunc(end)  # full cells first_full .. stop-1

    # Cells of each row: the full ones, then the partial cell before them and the one after them.
    j = torch.arange(int(math.ceil(width)) + 1, **f64)
    full_q = first_full[..., None] + j  # (N, K, J)
    full_ok = row_ok[..., None] & (full_q < stop[..., None])
    full_w = weight[..., None].expand_as(full_q)
    head_ok = row_ok & (first_full != start)
    head_w = weight * (first_full - start)
    tail_ok = row_ok & (stop != end)
    tail_w = weight * (end - stop)

    q_all = torch.cat([full_q.flatten(1), torch.trunc(start), stop], dim=1)  # (N, K*J + 2K)
    ok_all = torch.cat([full_ok.flatten(1), head_ok, tail_ok], dim=1)
    w_all = torch.cat([full_w.flatten(1), head_w, tail_w], dim=1)
    p_all = torch.cat([p[..., None].expand_as(full_q).flatten(1), p, p], dim=1)
    flip_all = flip[:, None].expand_as(q_all)
    row = torch.where(flip_all, q_all, p_all).long()
    col = torch.where(flip_all, p_all, q_all).long()
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    if bool((ok_all & ~inside).any()):
        raise AssertionError("draw_lines: a cell fell outside the image (please report the angle)")
    # Each pixel receives at most one cell, so the scatter-add is exact: unused slots add 0.0 to
    # pixel 0 of their own line, which leaves it unchanged.
    flat = torch.where(ok_all, row * w + col, 0)  # (N, slots) -> index into that line's h*w pixels
    image = torch.zeros(n, h * w, **f64)
    image.scatter_add_(1, flat, torch.where(ok_all, 2 * w_all, 0.0))
    image = (image - 1).clamp_(-1, 1).view(n, h, w)
    return image[:, None].to(dtype)


def random_angles(n: int, rng: np.random.Generator) -> np.ndarray:
    """n training angles ~ U[0, 2*pi), computed as the official code does (2 * u * pi)."""
    return 2 * rng.random(n) * math.pi


def lines_batches(batch: int, *, seed: int = 0, device=None, start_step: int = 0,
                  chunk_steps: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of training batches (x (batch, 1, 32, 32) float32, labels (batch,) int64).

    Batch number s is a pure function of (seed, s), so a resumed run (start_step=s) sees exactly the
    batches it would have seen. Lines are drawn `chunk_steps` batches at a time on `device`.
    """
    if batch < 1:
        raise ValueError(f"lines_batches: batch must be >= 1, got {batch}")
    chunk = start_step // chunk_steps
    offset = start_step % chunk_steps
    while True:
        rng = np.random.default_rng([seed, chunk])
        angles = random_angles(batch * chunk_steps, rng)
        images = draw_lines(angles, device=device)
        labels = angle_labels(angles).to(images.device)
        for s in range(offset, chunk_steps):
            sl = slice(s * batch, (s + 1) * batch)
            yield images[sl], labels[sl]
        chunk, offset = chunk + 1, 0
