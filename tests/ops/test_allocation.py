"""Exact budget splits: largest remainder, PyramidKV's line, VL-Cache's water-filling and online shares."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_mm.ops.allocation import (
    largest_remainder,
    online_share,
    pyramid_budgets,
    round_half_down,
    water_fill,
)
from tests.helpers.references import naive_pyramid, naive_water_fill

SETTINGS = settings(max_examples=200, deadline=None)


@SETTINGS
@given(parts=st.lists(st.integers(0, 1000), min_size=1, max_size=12), data=st.data())
def test_largest_remainder_sums_exactly_and_stays_within_one(parts: list[int], data: st.DataObject) -> None:
    total = sum(parts)
    # random positive shares with that total
    weights = [Fraction(data.draw(st.integers(1, 50))) for _ in parts]
    shares = [total * w / sum(weights) for w in weights]
    rounded = largest_remainder(shares, total)
    assert sum(rounded) == total
    assert all(s - 1 < r < s + 1 for r, s in zip(rounded, shares, strict=True))


def test_largest_remainder_ties_go_to_the_lower_index() -> None:
    assert largest_remainder([Fraction(1, 2)] * 4, 2) == [1, 1, 0, 0]
    assert largest_remainder([Fraction(3, 2), Fraction(5, 2)], 4) == [2, 2]
    with pytest.raises(ValueError, match="cannot round"):
        largest_remainder([Fraction(1), Fraction(1)], 5)


@SETTINGS
@given(
    length=st.integers(1, 400),
    keep=st.floats(0.0, 1.0),
    layers=st.integers(1, 40),
    beta=st.sampled_from([1.0, 1.5, 2.0, 5.0, 20.0, 100.0]),
    rule=st.sampled_from(["line", "spill"]),
)
def test_pyramid_is_exact_capped_and_matches_the_reference(
    length: int, keep: float, layers: int, beta: float, rule: str
) -> None:
    budget = int(length * keep)
    parts = pyramid_budgets(budget, layers, length, beta, rule)  # type: ignore[arg-type]
    assert parts == naive_pyramid(budget, layers, length, beta, rule)
    assert sum(parts) == layers * budget
    assert all(0 <= p <= length for p in parts)
    if rule == "line":  # a straight line: never increasing with depth
        assert all(a >= b for a, b in zip(parts, parts[1:]))
        low = Fraction(budget) / Fraction(beta)
        capped = 2 * budget - low > length
        assert min(parts) >= (int(2 * budget - length) if capped else int(low)), "no layer below the line's end"


def test_pyramid_examples_and_errors() -> None:
    # the uncapped line of 4 layers around 100: b_min = 5, b_max = 195
    assert pyramid_budgets(100, 4, 1000, 20) == [195, 132, 68, 5]
    # b_max above the cap (150): the official rule flattens the line around the same mean
    assert pyramid_budgets(100, 4, 150, 20) == [150, 117, 83, 50]
    assert pyramid_budgets(100, 4, 150, 20, "spill") == [150, 150, 95, 5]
    assert pyramid_budgets(100, 4, 1000, 1) == [100] * 4  # beta 1: uniform
    assert pyramid_budgets(7, 1, 10, 20) == [7]
    with pytest.raises(ValueError):
        pyramid_budgets(11, 4, 10, 20)
    with pytest.raises(ValueError):
        pyramid_budgets(5, 4, 10, 0.5)


@SETTINGS
@given(
    weights=st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=30),
    low=st.integers(0, 20),
    span=st.integers(0, 200),
    fill=st.floats(0.0, 1.0),
)
def test_water_fill_is_exact_bounded_and_matches_the_reference(
    weights: list[float], low: int, span: int, fill: float
) -> None:
    high = low + span
    n = len(weights)
    total = n * low + int(fill * n * span)
    parts = water_fill(weights, total, low, high)
    assert parts == naive_water_fill(weights, total, low, high)
    assert sum(parts) == total
    assert all(low <= p <= high for p in parts)
    # monotone in the weights, up to the rounding of one unit
    for i in range(n):
        for j in range(n):
            if weights[i] > weights[j]:
                assert parts[i] >= parts[j] - 1


def test_water_fill_examples_and_errors() -> None:
    assert water_fill([1.0, 1.0, 2.0], 8, 0, 10) == [2, 2, 4]
    assert water_fill([1.0, 1.0, 8.0], 12, 1, 6) == [3, 3, 6]  # the dense layer capped, the excess spread
    assert water_fill([0.5, 0.5, 0.5], 30, 0, 30) == [10, 10, 10]  # equal weights: uniform
    assert water_fill([1e-6, 1.0], 10, 3, 10) == [3, 7]  # the floor
    with pytest.raises(ValueError, match="positive"):
        water_fill([1.0, 0.0], 4, 0, 4)
    with pytest.raises(ValueError, match="cannot split"):
        water_fill([1.0, 1.0], 30, 0, 10)


def test_round_half_down() -> None:
    assert [round_half_down(Fraction(n, 2)) for n in range(-3, 6)] == [-2, -1, -1, 0, 0, 1, 1, 2, 2]
    assert round_half_down(Fraction(13, 5)) == 3


@SETTINGS
@given(
    densities=st.lists(st.floats(1e-3, 1.0), min_size=1, max_size=20),
    low=st.integers(0, 10),
    span=st.integers(0, 100),
    fill=st.floats(0.0, 1.0),
)
def test_online_shares_are_exact_and_feasible(densities: list[float], low: int, span: int, fill: float) -> None:
    high = low + span
    n = len(densities)
    total = n * low + int(fill * n * span)
    remaining, parts = total, []
    for layer, density in enumerate(densities):
        seen = densities[: layer + 1]
        part = online_share(remaining, density, sum(seen) / len(seen), n - 1 - layer, low, high)
        assert low <= part <= high
        remaining -= part
        parts.append(part)
    assert sum(parts) == total and remaining == 0
    if len(set(densities)) == 1 and total % n == 0:
        assert parts == [total // n] * n  # equal densities: uniform


def test_online_share_example() -> None:
    # the first layer is always its own running mean: T / N
    assert online_share(30, 0.9, 0.9, 2, 0, 30) == 10
    # a layer twice as dense as the mean of those before: twice the estimate of each later one
    assert online_share(40, 2.0, 1.0, 2, 0, 40) == 20
    # clamped so that the later layers stay feasible
    assert online_share(40, 100.0, 1.0, 2, 5, 40) == 30
