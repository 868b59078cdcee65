"""Clustering accuracy of latents (SPEC.md section 5; the paper's cluster.py): centre and whiten the
training latents by SVD, run K-means with K = number of classes from many random initialisations
(best inertia wins), assign the test latents to the nearest centre, and score them under the best
one-to-one cluster-to-class matching (Hungarian method).

K-means runs every restart at once in PyTorch, on the latents' device: the centres of R restarts are
one (R, K, D) tensor; an iteration runs the exact steps (argmin, one-hot, counts) for all of them at
once and two small GEMMs per restart (distances, then the new centres as one-hot @ x), and restarts
that have converged drop out of the batch. Restart r starts from K
distinct training points drawn by numpy.random.default_rng([seed, r]), so it does not depend on how
many restarts run beside it: more restarts can only lower the best inertia.

Faithfulness: the paper calls scikit-learn's KMeans(init="random", n_init=1000, max_iter=1000,
tol=1e-4). This restates its Lloyd iteration and its stopping rule (assignments unchanged, or the
squared centre shift at most tol x the mean per-dimension variance), then a final assignment step.
One difference: an empty cluster keeps its previous centre, where scikit-learn moves it to a far
point; with random initialisation on thousands of points this is rare.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


def pca_whiten(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
    """The paper's whitening: centre on the mean of `train` (N, D), project every input on the right
    singular vectors of the centred `train` and divide by the singular values (+ eps). Computed in
    float64 on the input's device; returns (train, *others) whitened, float32."""
    x = train.double()
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    scale = vt.T / (s + eps)  # (D, r): project on the singular vectors, divide by the singular values
    return tuple(((t.to(x.device).double() - mean) @ scale).float() for t in (train, *others))


class KMeansResult(NamedTuple):
    """centers (K, D) and labels (N,) of the best restart, its inertia (sum of squared distances to
    the nearest centre), its iteration count; inertias (R,) of every restart, float64."""
    centers: torch.Tensor
    labels: torch.Tensor
    inertia: float
    iterations: int
    inertias: torch.Tensor


def nearest_center(x: torch.Tensor, centers: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Index of the nearest of `centers` (K, D) for each row of x (N, D): (N,) int64."""
    c_sq = (centers * centers).sum(1)
    return torch.cat([(c_sq - 2 * part @ centers.T).argmin(1) for part in x.split(chunk)])


def _init_indices(n: int, k: int, restarts: range, seed: int) -> torch.Tensor:
    """(R, K) distinct random point indices, restart r drawn from default_rng([seed, r])."""
    return torch.from_numpy(np.stack([np.random.default_rng([seed, r]).choice(n, k, replace=False)
                                      for r in restarts]))


def kmeans(x: torch.Tensor, k: int, restarts: int = 1000, seed: int = 0, *, max_iter: int = 1000,
           tol: float = 1e-4, chunk: int | None = None, progress: bool = False) -> KMeansResult:
    """Lloyd's K-means on x (N, D) from `restarts` random initialisations run batched; the restart of
    lowest inertia wins (the first one on a tie). Deterministic for a seed on a given device.

    chunk: restarts per batch (default: as many as keep one (chunk, N, K) tensor near 2^24
    elements on the CPU, 2^27 on a GPU). tol: the stopping tolerance relative to the mean
    per-dimension variance of x (scikit-learn's)."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, D) tensor, got {tuple(x.shape)} {x.dtype}")
    n = x.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, N={n}], got {k!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite (no NaN or inf latents)")
    budget = 1 << (27 if x.device.type == "cuda" else 24)
    chunk = chunk or max(1, min(restarts, budget // (n * k)))
    tol_abs = tol * float(x.double().var(0, unbiased=False).mean())
    x64 = x.double()
    from ..progress import progress as progress_report

    best = None
    inertias = torch.empty(restarts, dtype=torch.float64)
    with progress_report(restarts, desc=f"k-means (k={k}, N={n}, D={x.shape[1]})", unit="restart",
                         enabled=progress) as bar:
        for start in range(0, restarts, chunk):
            block = range(start, min(restarts, start + chunk))
            centers = x[_init_indices(n, k, block, seed).to(x.device)]  # (C, K, D)
            iters = _lloyd(x, centers, max_iter, tol_abs)
            # Final assignment with the final centres, inertia in float64, per restart.
            for i, r in enumerate(block):
                labels = nearest_center(x, centers[i])
                inertias[r] = float(((x64 - centers[i].double()[labels]) ** 2).sum())
                if best is None or inertias[r] < best[2]:
                    best = (centers[i].clone(), labels, float(inertias[r]), int(iters[i]))
            bar.update(len(block))
    return KMeansResult(best[0], best[1], best[2], best[3], inertias)


def _lloyd(x: torch.Tensor, centers: torch.Tensor, max_iter: int, tol_abs: float) -> list[int]:
    """Lloyd iterations on (C, K, D) centres in place until each restart has converged (assignments
    unchanged, or squared centre shift <= tol_abs) or max_iter; returns each one's iteration count.

    Why one GEMM per restart rather than one for the whole batch: a restart's arithmetic then has
    the same shapes whatever runs beside it (a wide GEMM may round a column differently depending on
    how many columns it has), so restart r gives bit-identical centres in any batch. The exact parts
    (argmin, one-hot, counts) run batched."""
    c_count, k, d = centers.shape
    n = x.shape[0]
    active = list(range(c_count))
    previous = torch.full((c_count, n), -1, dtype=torch.long, device=x.device)
    iters = [max_iter] * c_count
    dist = torch.empty(c_count, n, k, dtype=x.dtype, device=x.device)
    for it in range(1, max_iter + 1):
        a = len(active)
        for i, r in enumerate(active):
            # ||c||^2 - 2 x.c: (N, D) @ (D, K) -> (N, K) (||x||^2 does not change the argmin)
            torch.addmm((centers[r] * centers[r]).sum(1), x, centers[r].T, alpha=-2, out=dist[i])
        labels = dist[:a].argmin(2)  # (A, N)
        one_hot = torch.zeros(a, n, k, dtype=x.dtype, device=x.device).scatter_(2, labels[..., None], 1.0)
        counts = one_hot.sum(1)  # (A, K): sums of ones, exact
        index = torch.tensor(active, device=x.device)
        unchanged = (labels == previous[index]).all(1).tolist()
        previous[index] = labels
        shifts = []
        for i, r in enumerate(active):
            sums = one_hot[i].T @ x  # (K, N) @ (N, D) -> (K, D)
            new = torch.where(counts[i, :, None] > 0, sums / counts[i].clamp_min(1)[:, None], centers[r])
            shifts.append(((new - centers[r]) ** 2).sum())
            centers[r] = new
        done = [u or s <= tol_abs for u, s in zip(unchanged, torch.stack(shifts).tolist())]
        for r, finished in zip(active, done):
            if finished:
                iters[r] = it
        active = [r for r, finished in zip(active, done) if not finished]
        if not active:
            break
    return iters


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_clusters: int | None = None,
                     num_classes: int | None = None) -> np.ndarray:
    """counts[i, j] = number of points in cluster i with class j (int64)."""
    pred, labels = np.asarray(pred, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(f"pred and labels must be 1-D of the same length, got {pred.shape} and {labels.shape}")
    if pred.size and (pred.min() < 0 or labels.min() < 0):
        raise ValueError("cluster and class indices must be >= 0")
    rows = max(num_clusters or 0, int(pred.max()) + 1 if pred.size else 0)
    cols = max(num_classes or 0, int(labels.max()) + 1 if labels.size else 0)
    counts = np.zeros((rows, cols), dtype=np.int64)
    np.add.at(counts, (pred, labels), 1)
    return counts


def hungarian_accuracy(pred, labels, num_clusters: int | None = None) -> float:
    """Accuracy of cluster indices `pred` against class `labels` under the one-to-one
    cluster-to-class assignment that maximises it (scipy.optimize.linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment

    pred = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("need at least one point")
    counts = confusion_matrix(pred, labels, num_clusters)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum()) / len(labels)


def cluster_latents(latents, labels, k: int | None = None, restarts: int = 1000, seed: int = 0, *,
                    test_latents=None, test_labels=None, max_iter: int = 1000, tol: float = 1e-4,
                    whiten: bool = True, progress: bool = False) -> dict:
    """The paper's clustering evaluation, with its details: whiten (fitted on `latents`), K-means on
    `latents` (k = number of classes by default), then the Hungarian accuracy on the test latents
    (on `latents` themselves when no test set is given). Latents (N, ...) are flattened.

    Returns {"accuracy", "train_accuracy", "inertia", "iterations", "k", "restarts"}."""
    x = _as_2d(latents, "latents")
    y = _as_labels(labels, x.shape[0], "labels")
    if (test_latents is None) != (test_labels is None):
        raise ValueError("give both test_latents and test_labels, or neither")
    if test_latents is not None:
        xt = _as_2d(test_latents, "test_latents").to(x.device)
        yt = _as_labels(test_labels, xt.shape[0], "test_labels")
        if xt.shape[1] != x.shape[1]:
            raise ValueError(f"test_latents have {xt.shape[1]} dims, latents {x.shape[1]}")
    k = int(y.max()) + 1 if k is None else k
    if whiten:
        x, *rest = pca_whiten(x, *([xt] if test_latents is not None else []))
        xt = rest[0] if rest else None
    else:
        x = x.float()
        xt = xt.float() if test_latents is not None else None
    result = kmeans(x, k, restarts, seed, max_iter=max_iter, tol=tol, progress=progress)
    train_acc = hungarian_accuracy(result.labels, y, k)
    acc = hungarian_accuracy(nearest_center(xt, result.centers), yt, k) if xt is not None else train_acc
    return dict(accuracy=acc, train_accuracy=train_acc, inertia=result.inertia,
                iterations=result.iterations, k=k, restarts=restarts)


def clustering_accuracy(latents, labels, k: int | None = None, restarts: int = 1000, seed: int = 0,
                        **kwargs) -> float:
    """Clustering accuracy in [0, 1] (see cluster_latents for the procedure and keyword arguments:
    test_latents/test_labels, max_iter, tol, whiten, progress)."""
    return cluster_latents(latents, labels, k, restarts, seed, **kwargs)["accuracy"]


@torch.no_grad()
def encode_images(trainer, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Flattened latents (N, D) of images (uint8 pixels or floats in [-1, 1]) through the trainer's
    public encode, a chunk at a time (uint8 sets stay small until their chunk is scaled)."""
    from ..data.common import to_unit_range

    return torch.cat([trainer.encode(to_unit_range(part), batch_size).flatten(1)
                      for part in images.split(batch_size)])


def evaluate_clustering(trainer, train_images, train_labels, test_images, test_labels, *,
                        restarts: int = 1000, seed: int = 0, max_train: int = 60000,
                        progress: bool = False) -> dict:
    """The paper's protocol on a trainer: latents of the first `max_train` training images (60,000 in
    the paper) and of the test set, then cluster_latents. Returns its dict."""
    z_train = encode_images(trainer, train_images[:max_train])
    z_test = encode_images(trainer, test_images)
    return cluster_latents(z_train, train_labels[:max_train], restarts=restarts, seed=seed,
                           test_latents=z_test, test_labels=test_labels, progress=progress)


def _as_2d(latents, name: str) -> torch.Tensor:
    t = torch.as_tensor(latents)
    if t.dim() < 2 or t.shape[0] < 1:
        raise ValueError(f"{name} must be (N, ...) with N >= 1, got {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t.flatten(1)


def _as_labels(labels, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(labels)
    if t.dim() != 1 or t.shape[0] != n or t.is_floating_point():
        raise ValueError(f"{name} must be ({n},) integer class indices, got {tuple(t.shape)} {t.dtype}")
    if int(t.min()) < 0:
        raise ValueError(f"{name} must be >= 0")
    return t.long().cpu()
