"""AIQ (RouterBench) on hand-computed cases: one point, a dominated point, unsorted input, ties,
equal costs, a point below the chord, a common cost range, and the reference code's variant."""

from __future__ import annotations

import pytest

from hyperrouter.analysis.aiq import aiq, aiq_reference, nondecreasing_hull


def test_single_point_is_its_quality() -> None:
    assert aiq([(3.0, -2.5)]) == -2.5
    assert nondecreasing_hull([(3.0, -2.5)]) == [(3.0, -2.5)]


def test_two_points_average_the_line() -> None:
    assert aiq([(1, 0.0), (3, 1.0)]) == pytest.approx(0.5)


def test_dominated_point_is_ignored_and_order_does_not_matter() -> None:
    # (2, 0.2) is dearer than (1, 0.5) and worse: off the hull
    points = [(3, 1.0), (2, 0.2), (1, 0.5)]
    assert nondecreasing_hull(points) == [(1.0, 0.5), (3.0, 1.0)]
    assert aiq(points) == pytest.approx(0.75)  # mean height of the line from 0.5 to 1.0


def test_point_below_the_chord_is_not_on_the_convex_hull() -> None:
    # (2, 0.4) is Pareto-optimal but below the chord from (1, 0) to (3, 1): the hull skips it
    points = [(1, 0.0), (2, 0.4), (3, 1.0)]
    assert nondecreasing_hull(points) == [(1.0, 0.0), (3.0, 1.0)]
    assert aiq(points) == pytest.approx(0.5)
    # above the chord it stays: area 0.5 * (0 + 0.8) + 0.5 * (0.8 + 1) = 1.3 over a width of 2
    assert aiq([(1, 0.0), (2, 0.8), (3, 1.0)]) == pytest.approx(1.3 / 2)


def test_ties_and_equal_costs() -> None:
    # equal quality at a higher cost adds nothing; equal cost keeps the better point
    assert nondecreasing_hull([(1, 0.5), (2, 0.5), (1, 0.2)]) == [(1.0, 0.5)]
    assert aiq([(1, 0.5), (2, 0.5), (1, 0.2)]) == pytest.approx(0.5)  # flat after the hull
    assert aiq([(2, 0.1), (2, 0.7)]) == pytest.approx(0.7)


def test_common_cost_range_extends_flat() -> None:
    # over [0, 4]: 0.5 from 0 to 1 (first quality), the line to 3, then flat at 1.0
    got = aiq([(1, 0.0), (3, 1.0)], c_min=0, c_max=4)
    assert got == pytest.approx((1 * 0.0 + 2 * 0.5 + 1 * 1.0) / 4)
    with pytest.raises(ValueError, match="cost range is empty"):
        aiq([(1, 0.0)], c_min=2, c_max=1)
    with pytest.raises(ValueError, match="finite"):
        aiq([(1, float("nan"))])


def test_reference_variant_divides_by_the_largest_cost() -> None:
    # hull from cost 1 to 3 (area 1.0), extended flat to 4 (area 1.0): 2.0 / 4
    assert aiq_reference([(1, 0.0), (3, 1.0)], c_max=4) == pytest.approx(0.5)
    assert aiq_reference([(1, 0.0), (3, 1.0)]) == pytest.approx(1.0 / 3)
