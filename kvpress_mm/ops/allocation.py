"""Splitting a budget into exact integer parts: per layer (PyramidKV, VL-Cache) and the rounding they share.

Everything here is exact rational arithmetic (:class:`fractions.Fraction`): a budget split must
sum to its total exactly, and a tie must go the same way on every machine. The numbers are
small (one part per decoder layer), so exactness costs nothing measurable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

PyramidCap = Literal["line", "spill"]


def largest_remainder(shares: Sequence[Fraction], total: int) -> list[int]:
    """Integers ``a[i]``, each ``floor(shares[i])`` or one more, that sum to ``total`` exactly.

    The ``total - sum(floor(shares))`` extra units go to the largest fractional parts, ties to
    the lower index. ``shares`` should sum to ``total`` (then the extra units are fewer than the
    parts).

    Raises:
        ValueError: the floors alone exceed ``total``, or fall short of it by more than the number of parts.

    Examples:
        >>> largest_remainder([Fraction(5, 2), Fraction(5, 2)], 5)
        [3, 2]
        >>> largest_remainder([Fraction(1, 3)] * 3, 1)
        [1, 0, 0]

    """
    floors = [math.floor(share) for share in shares]
    extra = total - sum(floors)
    if not 0 <= extra <= len(floors):
        raise ValueError(f"cannot round shares summing to {float(sum(shares))} to a total of {total}")
    order = sorted(range(len(floors)), key=lambda i: (floors[i] - shares[i], i))  # largest remainder first
    for i in order[:extra]:
        floors[i] += 1
    return floors


def pyramid_budgets(budget: int, num_layers: int, cap: int, beta: float, rule: PyramidCap = "line") -> list[int]:
    """PyramidKV's per-layer budgets: a straight line decreasing with depth, summing to ``num_layers * budget``.

    ``b_min = budget / beta``, ``b_max = 2 * budget - b_min``; layer ``l`` (0 = first) gets
    ``b_max - l * (b_max - b_min) / (num_layers - 1)``, rounded by :func:`largest_remainder` to
    the exact total. No layer may exceed ``cap`` (the entries there are):

    - ``rule="line"`` (PyramidKV's official code): when ``b_max > cap``, ``b_max = cap`` and
      ``b_min = 2 * budget - cap``, a flatter line with the same mean;
    - ``rule="spill"``: the line is rounded as is, then each layer above ``cap`` keeps ``cap``
      and passes its excess on to the next layer, in layer order.

    Examples:
        >>> pyramid_budgets(100, 4, 1000, 20)
        [195, 132, 68, 5]
        >>> pyramid_budgets(100, 4, 150, 20)
        [150, 117, 83, 50]
        >>> pyramid_budgets(100, 4, 150, 20, rule="spill")
        [150, 150, 95, 5]

    """
    if num_layers < 1 or not 0 <= budget <= cap or beta < 1:
        raise ValueError(
            f"need num_layers >= 1, 0 <= budget <= cap and beta >= 1, got {num_layers}, {budget}, {cap}, {beta}"
        )
    mean = Fraction(budget)
    low = mean / Fraction(beta)
    high = 2 * mean - low
    if rule == "line" and high > cap:
        high, low = Fraction(cap), 2 * mean - cap
    if num_layers == 1:
        shares = [mean]
    else:
        step = (high - low) / (num_layers - 1)
        shares = [high - layer * step for layer in range(num_layers)]
    parts = largest_remainder(shares, num_layers * budget)
    if rule == "spill":
        for layer in range(num_layers - 1):
            excess = max(0, parts[layer] - cap)
            parts[layer] -= excess
            parts[layer + 1] += excess
    return parts


def _clipped_sum(weights: Sequence[Fraction], scale: Fraction, low: int, high: int) -> Fraction:
    return sum((min(max(scale * w, Fraction(low)), Fraction(high)) for w in weights), Fraction(0))


def water_fill(weights: Sequence[float], total: int, low: int, high: int) -> list[int]:
    """Integer parts proportional to ``weights``, each in ``[low, high]``, summing to ``total`` exactly.

    The real parts are ``t[i] = clip(c * weights[i], low, high)`` with the one scale ``c`` for
    which they sum to ``total`` (the sum is piecewise linear and non-decreasing in ``c``; its
    breakpoints are searched exactly); :func:`largest_remainder` rounds them.

    Raises:
        ValueError: a weight is not positive, or ``total`` is outside ``[n * low, n * high]``.

    Examples:
        >>> water_fill([1.0, 1.0, 2.0], 8, 0, 10)
        [2, 2, 4]
        >>> water_fill([1.0, 1.0, 8.0], 12, 1, 6)
        [3, 3, 6]

    """
    n = len(weights)
    if n == 0 or not all(w > 0 and math.isfinite(w) for w in weights):
        raise ValueError(f"water_fill needs positive finite weights, got {list(weights)}")
    if not (0 <= low <= high and n * low <= total <= n * high):
        raise ValueError(f"cannot split {total} into {n} parts in [{low}, {high}]")
    exact = [Fraction(w) for w in weights]
    # the scales at which a part reaches its lower or upper bound, where the sum's slope changes
    breakpoints = sorted({Fraction(0)} | {Fraction(bound) / w for w in exact for bound in (low, high)})
    lo_index, hi_index = 0, len(breakpoints) - 1  # sum <= total at lo_index, >= total at hi_index
    while hi_index - lo_index > 1:
        middle = (lo_index + hi_index) // 2
        if _clipped_sum(exact, breakpoints[middle], low, high) <= total:
            lo_index = middle
        else:
            hi_index = middle
    c1, c2 = breakpoints[lo_index], breakpoints[hi_index]
    s1, s2 = _clipped_sum(exact, c1, low, high), _clipped_sum(exact, c2, low, high)
    scale = c1 if s2 == s1 else c1 + (total - s1) * (c2 - c1) / (s2 - s1)
    shares = [min(max(scale * w, Fraction(low)), Fraction(high)) for w in exact]
    return largest_remainder(shares, total)


def round_half_down(value: Fraction) -> int:
    """The nearest integer, halves rounded down (``2.5 -> 2``, ``2.6 -> 3``)."""
    return math.ceil(value - Fraction(1, 2))


def online_share(remaining: int, weight: float, mean_weight: float, later_layers: int, low: int, high: int) -> int:
    """One layer's part of ``remaining`` when the later layers' weights are not known yet.

    Each of the ``later_layers`` is estimated at ``mean_weight``: the part is
    ``round_half_down(remaining * weight / (weight + later_layers * mean_weight))``, clamped to
    what keeps the rest feasible (``[max(low, remaining - later * high), min(high, remaining - later * low)]``).
    The last layer (``later_layers == 0``) takes exactly ``remaining``.

    Examples:
        >>> online_share(30, 1.0, 1.0, 2, 0, 30)
        10
        >>> online_share(30, 2.0, 1.0, 2, 0, 30)
        15

    """
    if later_layers == 0:
        return remaining
    total = Fraction(weight) + later_layers * Fraction(mean_weight)
    # no weight at all (a row whose prefill chunk so far is all padding): an equal share
    exact = Fraction(remaining) * Fraction(weight) / total if total > 0 else Fraction(remaining, later_layers + 1)
    lowest = max(low, remaining - later_layers * high)
    highest = min(high, remaining - later_layers * low)
    return min(max(round_half_down(exact), lowest), highest)
