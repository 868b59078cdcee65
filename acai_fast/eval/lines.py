"""The lines benchmark's evaluation (SPEC.md section 4): decode interpolations between fresh test
lines and score them by Mean Distance (cosine distance to the nearest of 10,000 reference lines)
and Mean Smoothness (how evenly the matched angle moves along each interpolation).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..data.lines import SIZE, angle_labels, draw_lines, random_angles
from .probe import probe_accuracy

REFERENCE_LINES = 10_000  # reference set of the Mean Distance metric


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
                  probe_accuracy=probe_accuracy(trainer, x, labels))
    return (result, images) if return_images else result
