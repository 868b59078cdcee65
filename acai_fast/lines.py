"""The synthetic lines benchmark of the paper (SPEC.md section 4): the rasteriser, the training stream,
and the Mean Distance / Smoothness metrics of interpolations.

`draw_lines` reproduces the official (brain-research/acai) single-line rasteriser bit-for-bit, but
for a whole batch of angles at once on any device: every (line, major-axis row) pair is one element of
a tensor, and each row touches at most ceil(w) + 2 cells, so the image is one scatter.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np
import torch

SIZE = 32  # the paper's lines are 32x32
WIDTH = 2.0  # line width in pixels
NCLASS = 10  # angle bins of the probe label
REFERENCE_LINES = 10_000  # reference set of the Mean Distance metric


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


@functools.lru_cache(maxsize=4)
def reference_lines(device: str = "cpu", size: int = SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """The 10,000 reference lines at angles linspace(0, 2pi - 2pi/10000, 10000), flattened and
    normalised to unit length in float64: ((10000, size*size) on `device`, angles). Built once."""
    angles = np.linspace(0, 2 * np.pi - 2 * np.pi / REFERENCE_LINES, REFERENCE_LINES)
    ref = draw_lines(angles, size, device=device, dtype=torch.float64).flatten(1)
    return ref / ref.norm(dim=1, keepdim=True), angles


def smoothness_scores(angles: np.ndarray) -> np.ndarray:
    """(interpolations, steps) matched angles -> (interpolations,) scores; NaN where undefined.

    Unwrap, then max(|consecutive differences|) / |first - last| - 1/(steps - 1)."""
    angles = np.unwrap(np.atleast_2d(angles), axis=-1)
    diffs = np.abs(np.diff(angles, axis=-1))
    total = np.abs(angles[:, :1] - angles[:, -1:])
    undefined = total[:, 0] < 1e-4
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.max(diffs / total, axis=-1) - 1.0 / (angles.shape[1] - 1)
    scores[undefined] = np.nan
    return scores


def nearest_reference(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distance from each image (M, 1, H, W) to its nearest reference line, and that line's
    angle: ((M,) float64, (M,) float64), on the images' device (matmuls of `chunk` rows at a time)."""
    size = images.shape[-1]
    ref, angles = reference_lines(str(images.device), size)
    flat = images.reshape(images.shape[0], -1).to(torch.float64)
    dists, idxs = [], []
    for q in flat.split(chunk):
        cos = (q / q.norm(dim=1, keepdim=True)) @ ref.T  # (chunk, 10000)
        best, idx = cos.max(dim=1)
        dists.append(1 - best)
        idxs.append(idx)
    idx = torch.cat(idxs)
    return torch.cat(dists), torch.as_tensor(angles, device=idx.device)[idx]


def line_metrics(images: torch.Tensor) -> tuple[float, float]:
    """(Mean Distance, Mean Smoothness) of interpolations shaped (pairs, steps, 1, H, W).

    Mean Distance: mean cosine distance of every image to its nearest reference line (the paper
    prints it x10^3). Mean Smoothness: sum of the defined smoothness scores over the number of
    interpolations (NaN when none is defined)."""
    if images.dim() != 5 or images.shape[2] != 1 or images.shape[1] < 2:
        raise ValueError(f"line_metrics: expected (pairs, steps >= 2, 1, H, W), got {tuple(images.shape)}")
    pairs, steps = images.shape[:2]
    dist, angles = nearest_reference(images.flatten(0, 1))
    scores = smoothness_scores(angles.cpu().numpy().reshape(pairs, steps))
    defined = ~np.isnan(scores)
    smoothness = float(np.sum(scores[defined]) / len(scores)) if defined.any() else float("nan")
    return float(dist.mean()), smoothness


def eval_pairs(pairs: int = 256, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Angles of the evaluation's test lines: image k is paired with image pairs + k."""
    angles = random_angles(2 * pairs, np.random.default_rng([seed, 0x7E57]))
    return angles[:pairs], angles[pairs:]


@torch.no_grad()
def evaluate_lines(trainer, pairs: int = 256, steps: int = 16, seed: int = 1234,
                   return_images: bool = False):
    """The paper's lines evaluation of a trained model: draw 2*pairs fresh test lines, interpolate
    each pair's latents linearly in `steps` steps (both ends included), decode (no clipping) and
    score. Returns {"mean_distance", "mean_smoothness", "probe_accuracy"} (and the images,
    (pairs, steps, 1, 32, 32), when return_images)."""
    a_angles, b_angles = eval_pairs(pairs, seed)
    x_a = draw_lines(a_angles, device=trainer.device)
    x_b = draw_lines(b_angles, device=trainer.device)
    images = trainer.interpolate(x_a, x_b, steps=steps)
    mean_distance, mean_smoothness = line_metrics(images)
    x = torch.cat([x_a, x_b])
    labels = angle_labels(np.concatenate([a_angles, b_angles])).to(trainer.device)
    result = dict(mean_distance=mean_distance, mean_smoothness=mean_smoothness,
                  probe_accuracy=trainer.probe_accuracy(x, labels))
    return (result, images) if return_images else result
