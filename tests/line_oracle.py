"""An independent, scalar restatement of the official single-line rasteriser (SPEC.md section 4),
one line and one row at a time in Python floats: the oracle `draw_lines` is checked against."""
import math

import numpy as np


def draw_line_scalar(angle, size=32, w=2.0):
    img = np.zeros((size, size))
    u0 = v0 = size * 0.5
    u1 = u0 + (u0 - 1) * math.cos(-angle)
    v1 = v0 + (v0 - 1) * math.sin(-angle)
    major_is_u = abs(v0 - v1) < abs(u0 - u1)
    if major_is_u:
        p0, p1, q0, q1 = u0, u1, v0, v1
    else:
        p0, p1, q0, q1 = v0, v1, u0, u1
    if p1 < p0:
        p0, p1, q0, q1 = p1, p0, q1, q0
    q0, q1 = q0 - w / 2, q1 - w / 2
    slope = (q1 - q0) / (p1 - p0) if p1 != p0 else 0
    cells = []  # (p, q, weight)
    for p in range(int(p0), int(math.ceil(p1))):
        if p < math.ceil(p0):
            weight = math.ceil(p0) - p0
        elif p > int(p1):
            weight = p1 - int(p1)
        else:
            weight = 1
        s = q0 + (p - p0 - 0.5) * slope
        e = s + w
        lo, hi = int(math.ceil(s)), int(e)
        for q in range(lo, hi):
            cells.append((p, q, weight))
        if lo != s:
            cells.append((p, int(s), weight * (lo - s)))
        if hi != e:
            cells.append((p, hi, weight * (e - hi)))
    for p, q, weight in cells:
        row, col = (q, p) if major_is_u else (p, q)
        assert 0 <= row < size and 0 <= col < size, (angle, row, col)
        img[row, col] += 2 * weight
    return np.clip(img - 1, -1, 1)
