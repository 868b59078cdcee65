"""Clustering accuracy (SPEC.md section 5): PCA whitening, batched K-means restarts against a plain
one-restart Lloyd loop, the Hungarian matching on a hand-computed confusion matrix, invariances,
determinism, and that more restarts never lose on inertia."""
import numpy as np
import pytest
import torch

from acai_fast.eval import (cluster_latents, clustering_accuracy, hungarian_accuracy, kmeans,
                            pca_whiten)
from acai_fast.eval.cluster import confusion_matrix


def blobs(n=300, k=4, d=6, spread=0.5, seed=0, scale=None):
    """k well-separated Gaussian blobs (centres ~ N(0, 10^2)), optionally stretched per dimension."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 10
    labels = torch.arange(n) % k
    x = centres[labels] + spread * torch.randn(n, d, generator=g)
    if scale is not None:
        x = x * scale
    return x, labels


def lloyd_reference(x, init, max_iter=1000, tol=1e-4, gaps=None):
    """One K-means run written plainly (float64): assign, recompute the means (an empty cluster
    keeps its centre), stop when nothing moves or the shift is within tol x mean variance.
    gaps: a list that gets, per assignment step, the smallest gap between a point's nearest and
    second-nearest squared distance, relative to |x|^2 + max |c|^2 (how near a tie came)."""
    x = x.double()
    c = init.double().clone()
    tol_abs = tol * x.var(0, unbiased=False).mean()
    prev = None
    for _ in range(max_iter):
        if gaps is not None:
            two = (torch.cdist(x, c) ** 2).topk(2, largest=False).values
            gaps.append(float(((two[:, 1] - two[:, 0]) / (x.square().sum(1) + c.square().sum(1).max())).min()))
        labels = torch.cdist(x, c).argmin(1)
        new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
        shift = ((new - c) ** 2).sum()
        c = new
        if (prev is not None and torch.equal(labels, prev)) or shift <= tol_abs:
            break
        prev = labels
    return c, torch.cdist(x, c).argmin(1)


def test_hungarian_on_a_hand_computed_confusion_matrix():
    # cluster 0 holds 5 of class 0 and 4 of class 1; cluster 1 holds 4 of class 0; cluster 2, 3 of class 2.
    pred = [0] * 5 + [0] * 4 + [1] * 4 + [2] * 3
    labels = [0] * 5 + [1] * 4 + [0] * 4 + [2] * 3
    np.testing.assert_array_equal(confusion_matrix(pred, labels), [[5, 4, 0], [4, 0, 0], [0, 0, 3]])
    # Greedy (cluster 0 -> class 0) would score (5 + 0 + 3) / 16; the best one-to-one matching is
    # 0 -> 1, 1 -> 0, 2 -> 2: (4 + 4 + 3) / 16.
    assert hungarian_accuracy(pred, labels) == 11 / 16
    assert hungarian_accuracy(torch.tensor([2, 2, 0, 1]), torch.tensor([0, 0, 1, 2])) == 1.0
    assert hungarian_accuracy([0, 0, 0, 0], [0, 1, 2, 3], num_clusters=4) == 0.25


def test_pca_whitening_is_the_papers():
    x, _ = blobs(200, d=5, scale=torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]))
    white, other = pca_whiten(x, x[:7])
    # projected on the singular vectors and divided by the singular values: orthonormal columns
    torch.testing.assert_close(white.double().T @ white.double(), torch.eye(5, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(white.mean(0), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(other, white[:7])  # other sets use the training mean and basis


def test_batched_kmeans_equals_one_plain_run_per_restart():
    """fp32 batched K-means against float64 Lloyd runs: they assign alike as long as no point comes
    nearer a tie than fp32's rounding of |x|^2 + |c|^2 - 2 x.c (D = 4 products: about 3 D 2^-24 =
    7e-7 of |x|^2 + |c|^2, on any CPU's kernels); the runs checked keep every gap above 20x that."""
    x, _ = blobs(240, k=5, d=4, spread=3.0, seed=1)  # overlapping: runs take several iterations
    result = kmeans(x, 5, restarts=6, seed=2)
    gaps = []
    for r in (0, 3):
        init = x[np.random.default_rng([2, r]).choice(240, 5, replace=False)]
        centres, labels = lloyd_reference(x, init, gaps=gaps)
        inertia = float(((x.double() - centres[labels]) ** 2).sum())
        assert result.inertias[r].item() == pytest.approx(inertia, rel=1e-5)
    best = int(result.inertias.argmin())
    init = x[np.random.default_rng([2, best]).choice(240, 5, replace=False)]
    centres, labels = lloyd_reference(x, init, gaps=gaps)
    torch.testing.assert_close(result.centers.double(), centres, atol=1e-4, rtol=0)
    assert torch.equal(result.labels, labels) and result.iterations > 1
    assert min(gaps) > 20 * 3 * 4 * 2 ** -24, min(gaps)  # no near-tie: the comparison holds on any CPU


def test_more_restarts_never_lose_and_runs_are_deterministic():
    x, _ = blobs(300, k=6, d=5, spread=4.0, seed=3)
    few, many = kmeans(x, 6, restarts=3, seed=7), kmeans(x, 6, restarts=16, seed=7, chunk=7)
    assert torch.equal(many.inertias[:3], few.inertias)  # restart r does not depend on the others
    assert many.inertia <= few.inertia and many.inertia == many.inertias.min().item()
    assert len(set(many.inertias.tolist())) > 1  # the restarts really differ
    again = kmeans(x, 6, restarts=16, seed=7)
    assert torch.equal(again.inertias, many.inertias) and torch.equal(again.labels, many.labels)
    assert not torch.equal(kmeans(x, 6, restarts=3, seed=8).inertias, few.inertias)


def test_clustering_perfect_on_separated_blobs_with_a_test_set():
    x, y = blobs(400, k=5, d=8, seed=4)
    x_test, y_test = blobs(100, k=5, d=8, seed=4)  # same centres, fresh noise
    y_test = y_test.roll(1)[torch.argsort(torch.arange(100).roll(1))]  # (same labels, reindexed)
    details = cluster_latents(x, y, restarts=10, seed=0, test_latents=x_test, test_labels=y_test)
    assert details["accuracy"] == 1.0 and details["train_accuracy"] == 1.0 and details["k"] == 5
    # latents may come as (N, C, H, W) maps, as the encoder makes them
    assert clustering_accuracy(x.view(400, 2, 2, 2), y, restarts=10) == 1.0


def test_clustering_invariant_to_label_permutation_and_point_order():
    x, y = blobs(300, k=4, d=6, spread=8.0, seed=5)  # overlapping: imperfect
    base = clustering_accuracy(x, y, restarts=8, seed=1)
    assert 0.5 < base < 1.0
    perm_labels = torch.tensor([2, 0, 3, 1])[y]
    assert clustering_accuracy(x, perm_labels, restarts=8, seed=1) == base
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    # a reordering changes which points the random inits pick, not the converged answer
    assert clustering_accuracy(x[order], y[order], restarts=8, seed=1) == pytest.approx(base, abs=0.01)


@pytest.mark.parametrize("call, message", [
    (lambda x, y: kmeans(x, 0), r"k must be an integer in \[1, N=20\]"),
    (lambda x, y: kmeans(x, 3, restarts=0), "restarts must be a positive integer"),
    (lambda x, y: kmeans(x.long(), 3), "floating"),
    (lambda x, y: kmeans(torch.full((20, 2), float("nan")), 3), "finite"),
    (lambda x, y: clustering_accuracy(x, y[:5]), r"labels must be \(20,\)"),
    (lambda x, y: clustering_accuracy(x, y, test_latents=x), "both test_latents and test_labels"),
    (lambda x, y: clustering_accuracy(x, y, test_latents=x[:, :1], test_labels=y), "test_latents have 1 dims"),
])
def test_bad_input(call, message):
    x, y = blobs(20, k=2, d=2)
    with pytest.raises(ValueError, match=message):
        call(x, y)
