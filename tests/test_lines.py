"""The lines rasteriser, the training stream and the metrics (SPEC 4)."""
import math

import numpy as np
import pytest
import torch

from acai_fast.data.lines import angle_labels, draw_lines, lines_batches
from acai_fast.eval.lines import line_metrics, reference_lines, smoothness_scores
from line_oracle import draw_line_scalar


def ink(rows, cols, size=32):
    """A -1 image with full ink (+1) on rows x cols."""
    img = -np.ones((size, size))
    img[np.ix_(rows, cols)] = 1
    return img


# Worked out by hand from SPEC 4. Angle 0: start (16, 16), end u1 = 31; the major axis is u
# (columns 16..30, weight 1), the minor span v - 1 .. v + 1 = 15 .. 17 covers rows 15 and 16 fully.
# pi/2: end v1 = 1; major axis v, rows 1..15, columns 15 and 16. pi and 3pi/2 mirror them, up to
# the 1e-15 tilt that sin(-pi) and cos(-3pi/2) leave in float64.
HAND_WORKED = {
    0.0: ink([15, 16], range(16, 31)),
    math.pi / 2: ink(range(1, 16), [15, 16]),
    math.pi: ink([15, 16], range(1, 16)),
    3 * math.pi / 2: ink(range(16, 31), [15, 16]),
}


@pytest.mark.parametrize("angle", sorted(HAND_WORKED))
def test_axis_aligned_lines_by_hand(angle):
    got = draw_lines([angle], dtype=torch.float64)[0, 0].numpy()
    np.testing.assert_allclose(got, HAND_WORKED[angle], rtol=0, atol=1e-12)


def test_diagonal_line_partial_pixels_by_hand():
    """Angle pi/4: cos(-pi/4) is one ulp above |sin(-pi/4)|, so the major axis is u (columns
    16 .. 26, each weight 1: p0 = 16 is whole, and the official code never weights the last row).
    Each column's span starts at s = 15 + (u - 16.5) * slope with slope ~ -1: half a pixel, a
    full pixel, half a pixel."""
    img = draw_lines([math.pi / 4], dtype=torch.float64)[0, 0].numpy()
    u1, v1 = 16 + 15 * math.cos(-math.pi / 4), 16 + 15 * math.sin(-math.pi / 4)
    slope = ((v1 - 1) - 15) / (u1 - 16)
    for col in range(16, 27):
        s = 15 + (col - 16 - 0.5) * slope
        assert img[math.floor(s), col] == pytest.approx(2 * (math.ceil(s) - s) - 1, abs=1e-12)
        assert img[math.ceil(s), col] == 1.0
        assert img[math.ceil(s) + 1, col] == pytest.approx(2 * (s + 2 - math.floor(s + 2)) - 1, abs=1e-12)
        assert (img[:math.floor(s), col] == -1).all() and (img[math.ceil(s) + 2:, col] == -1).all()
    assert (img[:, 27:] == -1).all() and (img[:, :16] == -1).all()
    assert img[15, 16] == pytest.approx(0, abs=1e-12) and img[6, 26] == 1.0


def test_matches_scalar_oracle_bit_for_bit():
    rng = np.random.default_rng(0)
    angles = np.concatenate([rng.uniform(0, 2 * np.pi, 1500),
                             [k * np.pi / 8 for k in range(16)], [1e-9, 2 * np.pi - 1e-9]])
    got = draw_lines(angles, dtype=torch.float64)[:, 0].numpy()
    want = np.stack([draw_line_scalar(a) for a in angles])
    mismatch = np.argwhere(got != want)
    assert len(mismatch) == 0, f"first mismatches (line, row, col): {mismatch[:5].tolist()}"


def test_range_shape_and_symmetries():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 2 * np.pi, 500)
    img = draw_lines(a)
    assert img.shape == (500, 1, 32, 32) and img.dtype == torch.float32
    assert img.min() == -1 and img.max() == 1
    ink_amount = ((img.double() + 1) / 2).sum(dim=(1, 2, 3))
    # A 15 px long, 2 px wide line: 30 px of ink along an axis, 15*sqrt(2) at 45 degrees.
    assert ink_amount.min() >= 15 * math.sqrt(2) - 1e-6 and ink_amount.max() <= 30 + 1e-6
    # Rotations by quarter turns of axis-aligned lines are exact.
    h = draw_lines([0.0, math.pi / 2, math.pi, 3 * math.pi / 2])[:, 0]
    assert torch.equal(h[2], h[0].flip(-1)) and torch.equal(h[3], h[1].flip(-2))
    # The ink's centre of mass lies along the angle's direction (v grows downward).
    w = (img.double()[:, 0] + 1) / 2
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cu = (w * cols).sum((1, 2)) / w.sum((1, 2)) - 15.5
    cv = (w * rows).sum((1, 2)) / w.sum((1, 2)) - 15.5
    est = torch.atan2(-cv, cu) % (2 * math.pi)
    err = torch.remainder(est - torch.from_numpy(a) + math.pi, 2 * math.pi) - math.pi
    assert err.abs().max() < 0.15


def test_labels():
    labels = angle_labels([0.0, 0.6, 2 * math.pi / 10 + 1e-3, 2 * math.pi - 2e-6, 2 * math.pi - 1e-9])
    # The official formula gives 10 in the last 1e-6 rad; it is clamped into the 10 classes.
    assert labels.tolist() == [0, 0, 1, 9, 9]


def test_batches_are_reproducible_and_resumable():
    s1 = lines_batches(8, seed=3, chunk_steps=4)
    first = [next(s1) for _ in range(7)]
    s2 = lines_batches(8, seed=3, start_step=5, chunk_steps=4)
    for i in range(5, 7):
        x, y = next(s2)
        assert torch.equal(x, first[i][0]) and torch.equal(y, first[i][1])
    x, y = first[0]
    assert x.shape == (8, 1, 32, 32) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10
    assert not torch.equal(first[0][0], first[1][0])


def test_reference_lines_are_unit_and_cached():
    ref, angles = reference_lines()
    assert ref.shape == (10_000, 1024) and ref.dtype == torch.float64
    assert torch.allclose(ref.norm(dim=1), torch.ones(10_000, dtype=torch.float64))
    assert angles[0] == 0 and angles[-1] == pytest.approx(2 * np.pi - 2 * np.pi / 10_000)
    assert reference_lines()[0] is ref


def _interp(angles_2d):
    pairs, steps = angles_2d.shape
    return draw_lines(angles_2d.reshape(-1)).view(pairs, steps, 1, 32, 32)


def test_metrics_perfect_interpolation():
    """Interpolations drawn exactly on reference angles: distance 0 and smoothness 0."""
    _, ref_angles = reference_lines()
    starts = np.array([0, 1234, 5000, 9000])
    steps = np.arange(16) * 100  # evenly spaced reference angles
    angles = ref_angles[(starts[:, None] + steps[None, :]) % 10_000]
    distance, smoothness = line_metrics(_interp(angles))
    assert distance == pytest.approx(0, abs=1e-12)
    assert smoothness == pytest.approx(0, abs=1e-9)


def test_metrics_abrupt_switch():
    """Eight images of the start then eight of the end: smoothness 1 - 1/15."""
    _, ref_angles = reference_lines()
    a, b = ref_angles[100], ref_angles[2600]
    angles = np.array([[a] * 8 + [b] * 8])
    distance, smoothness = line_metrics(_interp(angles))
    assert distance == pytest.approx(0, abs=1e-12)
    assert smoothness == pytest.approx(1 - 1 / 15, abs=1e-9)


def test_metrics_nan_handling():
    _, ref_angles = reference_lines()
    const = np.full((1, 16), ref_angles[42])
    smooth = ref_angles[(np.arange(16) * 50)][None]
    # One undefined (no movement) and one perfect: undefined counts 0 but stays in the denominator.
    assert math.isnan(line_metrics(_interp(const))[1])
    both = np.concatenate([const, smooth])
    assert line_metrics(_interp(both))[1] == pytest.approx(0, abs=1e-9)
    jump = np.array([[ref_angles[100]] * 8 + [ref_angles[2600]] * 8])
    mixed = np.concatenate([const, jump])
    assert line_metrics(_interp(mixed))[1] == pytest.approx((1 - 1 / 15) / 2, abs=1e-9)
    scores = smoothness_scores(np.array([[1.0] * 16, np.linspace(0, 1, 16)]))
    assert math.isnan(scores[0]) and scores[1] == pytest.approx(0, abs=1e-12)


def test_smoothness_unwraps_angles():
    """An interpolation across the 2pi -> 0 seam is as smooth as one away from it."""
    t = np.linspace(-0.5, 0.5, 16) % (2 * np.pi)
    assert smoothness_scores(t[None])[0] == pytest.approx(0, abs=1e-9)


def test_distance_of_noisy_lines_is_positive():
    rng = np.random.default_rng(4)
    img = draw_lines(rng.uniform(0, 2 * np.pi, 32)).view(2, 16, 1, 32, 32)
    noisy = img + 0.3 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))
    d_clean, _ = line_metrics(img)
    d_noisy, _ = line_metrics(noisy)
    assert d_clean < 1e-3 < d_noisy
    with pytest.raises(ValueError, match="pairs, steps"):
        line_metrics(img[0])
