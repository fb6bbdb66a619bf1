"""Naive references for the second-wave strategies and wrappers (tova, knorm, vl-cache, pyramid, mixkv).

Written from the definitions in the docstrings / docs pages, independently of kvpress_mm's code:
full ``[L, L]`` float64 softmax per head, python loops, exact fractions where a budget split must be
exact. Nothing here imports kvpress_mm's ops.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from kvpress_mm import LayerView, Modality
from tests.helpers.synthetic import real_positions


def causal_probabilities(view: LayerView, b: int, h: int) -> torch.Tensor:
    """``[L, L]`` float64 causal softmax of query head ``h`` of row ``b`` over the row's real positions."""
    idx = torch.tensor(real_positions(view.modality[b]))
    groups = view.queries.shape[1] // view.kv_heads
    q = view.queries[b, h, idx].double()
    k = view.keys[b, h // groups, idx].double()
    length = len(idx)
    logits = (q @ k.T) * view.scaling
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


# -- tova, knorm ----------------------------------------------------------------------------------


def naive_tova_scores(view: LayerView, head_average: str) -> list[torch.Tensor]:
    """Per row, ``[kvH, L]`` float64: the last query's probabilities, averaged over all heads or per group."""
    hq, kvh = view.queries.shape[1], view.kv_heads
    groups = hq // kvh
    result = []
    for b in range(view.batch_size):
        last = torch.stack([causal_probabilities(view, b, h)[-1] for h in range(hq)])  # [Hq, L]
        if head_average == "layer":
            result.append(last.mean(0).expand(kvh, -1))
        else:
            result.append(torch.stack([last[k * groups : (k + 1) * groups].mean(0) for k in range(kvh)]))
    return result


def naive_knorm_scores(view: LayerView) -> list[torch.Tensor]:
    """Per row, ``[kvH, L]`` float64: minus the keys' L2 norms."""
    result = []
    for b in range(view.batch_size):
        idx = torch.tensor(real_positions(view.modality[b]))
        keys = view.keys[b][:, idx].double()
        result.append(-keys.pow(2).sum(-1).sqrt())
    return result


# -- vl-cache -------------------------------------------------------------------------------------


def post_vision_start(modality_row: list[int], fallback: int) -> int:
    """Index (among the row's real entries) of the first post-vision query."""
    media = [i for i, c in enumerate(modality_row) if c in (Modality.IMAGE, Modality.VIDEO)]
    if media and media[-1] + 1 < len(modality_row):
        return media[-1] + 1
    return len(modality_row) - min(fallback, len(modality_row))


def naive_vl_cache_statistics(
    view: LayerView, threshold: float, fallback: int, shared_heads: bool
) -> tuple[list[torch.Tensor], list[float]]:
    """Per row: ``[kvH, L]`` float64 post-vision scores, and the layer's density."""
    hq, kvh = view.queries.shape[1], view.kv_heads
    groups = hq // kvh
    scores, densities = [], []
    for b in range(view.batch_size):
        row = [int(c) for c in view.modality[b] if int(c) != Modality.PADDING]
        start = post_vision_start(row, fallback)
        per_head_scores, per_head_density = [], []
        for h in range(hq):
            probs = causal_probabilities(view, b, h)
            significant, pairs = 0, 0
            for q in range(start, len(row)):
                visible = probs[q, : q + 1]
                significant += int((visible >= threshold * visible.max()).sum())
                pairs += q + 1
            per_head_density.append(significant / pairs)
            per_head_scores.append(probs[start:].sum(0))
        stacked = torch.stack(per_head_scores)  # [Hq, L]
        if shared_heads:
            scores.append(stacked.mean(0).expand(kvh, -1))
        else:
            scores.append(torch.stack([stacked[k * groups : (k + 1) * groups].mean(0) for k in range(kvh)]))
        densities.append(sum(per_head_density) / hq)
    return scores, densities


def naive_largest_remainder(shares: list[Fraction], total: int) -> list[int]:
    """Floors, then one more to the largest fractional parts (ties: lower index)."""
    parts = [math.floor(s) for s in shares]
    ranked = sorted(range(len(shares)), key=lambda i: (-(shares[i] - parts[i]), i))
    for i in ranked[: total - sum(parts)]:
        parts[i] += 1
    return parts


def naive_water_fill(weights: list[float], total: int, low: int, high: int) -> list[int]:
    """Exact ``clip(c * w, low, high)`` summing to ``total``: the classic fix-the-violators iteration."""
    exact = [Fraction(w) for w in weights]
    fixed: dict[int, Fraction] = {}
    while True:
        free = [i for i in range(len(exact)) if i not in fixed]
        remaining = total - sum(fixed.values(), Fraction(0))
        weight = sum((exact[i] for i in free), Fraction(0))
        shares = {i: remaining * exact[i] / weight for i in free}
        over = {i: s - high for i, s in shares.items() if s > high}
        under = {i: low - s for i, s in shares.items() if s < low}
        if not over and not under:
            break
        excess, deficit = sum(over.values(), Fraction(0)), sum(under.values(), Fraction(0))
        if excess >= deficit:
            fixed.update(dict.fromkeys(over, Fraction(high)))
        if deficit >= excess:
            fixed.update(dict.fromkeys(under, Fraction(low)))
    return naive_largest_remainder([fixed.get(i, shares.get(i, Fraction(0))) for i in range(len(exact))], total)


# -- pyramid --------------------------------------------------------------------------------------


def naive_pyramid(budget: int, layers: int, cap: int, beta: float, rule: str) -> list[int]:
    """PyramidKV's line (its cap rule, or STRATEGIES.md's spill), rounded to the exact total."""
    mean = Fraction(budget)
    low = mean / Fraction(beta)
    high = 2 * mean - low
    if rule == "line" and high > cap:
        high = Fraction(cap)
        low = 2 * mean - high
    shares = [mean] if layers == 1 else [high - (high - low) * Fraction(i, layers - 1) for i in range(layers)]
    parts = naive_largest_remainder(shares, layers * budget)
    if rule == "spill":
        carry = 0
        for i in range(layers):
            parts[i] += carry
            carry = max(0, parts[i] - cap)
            parts[i] -= carry
    return parts


# -- mixkv ----------------------------------------------------------------------------------------


def naive_mixkv_scores(view: LayerView, b: int, importance: torch.Tensor, window: int) -> torch.Tensor:
    """``[kvH, L - window]`` float64 MixKV scores of row ``b``'s candidates, from their importance ``a``."""
    idx = real_positions(view.modality[b])
    length = len(idx)
    candidates = idx[: length - window]
    out = []
    for h in range(view.kv_heads):
        a = [float(importance[h, i]) for i in range(len(candidates))]
        mean = sum(a) / len(a)
        norms = [float(view.values[b, h, p].double().pow(2).sum().sqrt()) for p in candidates]
        units = []
        for p in idx:
            key = view.keys[b, h, p].double()
            units.append(key / max(float(key.pow(2).sum().sqrt()), 1e-12))
        centre = sum(units) / length
        similarity = [float(units[i] @ centre) for i in range(len(candidates))]

        def normalise(values: list[float], mean: float = mean) -> list[float]:
            low, span = min(values), max(values) - min(values)
            scaled = [(v - low) / (span + 1e-8) for v in values]
            average = sum(scaled) / len(scaled)
            return [s * mean / (average + 1e-8) for s in scaled]

        value_term = normalise(norms)
        diversity = normalise([-s for s in similarity])
        # the mean cosine similarity over ordered pairs i != j of the head's keys
        if length > 1:
            pairs = sum(float(units[i] @ units[j]) for i in range(length) for j in range(length) if i != j)
            redundancy = min(1.0, max(0.0, pairs / (length * (length - 1))))
        else:
            redundancy = 0.0
        out.append(
            [redundancy * d + (1 - redundancy) * (x + v) for x, v, d in zip(a, value_term, diversity, strict=True)]
        )
    return torch.tensor(out, dtype=torch.float64)
