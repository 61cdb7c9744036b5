"""AIQ, RouterBench's one number for a quality-cost curve (Hu et al. 2024, arXiv 2403.12031).

A method evaluated at several operating points (here: every inference k) gives points
(cost c_i, quality q_i), quality oriented so that higher is better (minus BPC, minus perplexity,
accuracy). RouterBench takes their non-decreasing convex hull, R~(c): the upper concave envelope
of the points that no cheaper-or-equal point beats (Pareto-optimal), interpolated linearly between
hull points and flat after the last one, and defines

    AIQ = 1 / (c_max - c_min) * integral_{c_min}^{c_max} R~(c) dc,

the hull's average height over the cost range [c_min, c_max] (by default the method's own
cheapest and dearest points; pass a common range to compare methods on one footing: a method
whose points end early is then extended flat, one that starts late gets its first quality from
c_min on, an optimistic choice stated here). With one point, or all points at one cost, AIQ is
that point's (best) quality.

RouterBench's reference code (`evaluation/AIQ.py`, `calc_AIQ`) normalises otherwise: it extends
each hull flat to the largest cost of all the methods compared, integrates (trapezoids) from the
hull's own first point to there, and divides by that largest cost, not by the range
(`aiq_reference`): a method's number then depends on where 0 lies and shrinks when its cheapest
point is dear. We report the definition above; `aiq_reference` is there to compare with
published numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Point = tuple[float, float]


def nondecreasing_hull(points: Iterable[Point]) -> list[Point]:
    """The non-decreasing convex hull's vertices, by increasing cost: the Pareto-optimal points
    (higher quality than every cheaper-or-equal point) on their upper concave envelope."""
    pts = [(float(c), float(q)) for c, q in points]
    if not pts:
        raise ValueError("AIQ needs at least one (cost, quality) point")
    if any(not (math.isfinite(c) and math.isfinite(q)) for c, q in pts):
        raise ValueError(f"AIQ needs finite costs and qualities, got {pts}")
    pareto: list[Point] = []
    for c, q in sorted(pts, key=lambda p: (p[0], -p[1])):
        if pareto and c == pareto[-1][0]:
            continue  # same cost, lower quality
        if pareto and q <= pareto[-1][1]:
            continue  # dearer and no better
        pareto.append((c, q))
    hull: list[Point] = []
    for p in pareto:  # upper hull (monotone chain): drop points below the chord
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _height(hull: list[Point], c: float) -> float:
    if c <= hull[0][0]:
        return hull[0][1]
    for (c0, q0), (c1, q1) in zip(hull, hull[1:]):
        if c <= c1:
            return q0 + (q1 - q0) * (c - c0) / (c1 - c0)
    return hull[-1][1]


def _integral(hull: list[Point], lo: float, hi: float) -> float:
    """Integral of the hull's height from lo to hi (flat outside the hull's cost range)."""
    cuts = sorted({lo, hi, *(c for c, _ in hull if lo < c < hi)})
    return sum((b - a) * (_height(hull, a) + _height(hull, b)) / 2 for a, b in zip(cuts, cuts[1:]))


def aiq(points: Iterable[Point], c_min: float | None = None, c_max: float | None = None) -> float:
    """RouterBench's AIQ of the points over [c_min, c_max] (default: their own cost range)."""
    pts = list(points)
    hull = nondecreasing_hull(pts)
    lo = min(c for c, _ in pts) if c_min is None else float(c_min)
    hi = max(c for c, _ in pts) if c_max is None else float(c_max)
    if hi < lo:
        raise ValueError(f"AIQ's cost range is empty: c_min {lo} > c_max {hi}")
    if hi == lo:
        return _height(hull, lo)
    return _integral(hull, lo, hi) / (hi - lo)


def aiq_reference(points: Iterable[Point], c_max: float | None = None) -> float:
    """The RouterBench code's variant: the hull extended flat to `c_max` (default: its own largest
    cost; the code uses the largest of all methods compared), integrated from the hull's first
    point, divided by c_max."""
    pts = list(points)
    hull = nondecreasing_hull(pts)
    hi = max(c for c, _ in pts) if c_max is None else float(c_max)
    if hi <= 0:
        raise ValueError(f"aiq_reference needs a positive largest cost, got {hi}")
    return _integral(hull, hull[0][0], hi) / hi
