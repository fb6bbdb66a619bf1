"""AdaKV's per-head counts and the ragged selection that fills them, against a naive reference.

Scores come from a small set of values half of the time, so that ties (between heads and
within a head) are common: the tie rule is part of the definition.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_mm import LayerView, Modality
from kvpress_mm.ops.head_budgets import adaptive_head_counts, select_head_counts
from tests.helpers.adakv_reference import naive_adakv

SETTINGS = settings(max_examples=200, deadline=None)


@st.composite
def rows(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int]:
    """``(scores [H, L] float32, n_keep, window, floor)`` of one row."""
    heads = draw(st.integers(1, 5))
    length = draw(st.integers(1, 24))
    if draw(st.booleans()):
        values = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0])  # many ties
    else:
        values = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    scores = torch.tensor(
        draw(st.lists(st.lists(values, min_size=length, max_size=length), min_size=heads, max_size=heads))
    )
    n_keep = draw(st.integers(0, length + 2))
    window = draw(st.integers(0, length))
    floor = draw(st.integers(0, max(0, n_keep)))
    return scores.float(), n_keep, window, floor


def _view(scores: torch.Tensor, n_keep: int, padding: int = 0) -> LayerView:
    heads, length = scores.shape
    modality = torch.tensor([[Modality.PADDING] * padding + [Modality.TEXT] * length], dtype=torch.int8)
    tensors = torch.zeros(1, heads, padding + length, 2)
    return LayerView(
        layer_idx=0,
        keys=tensors,
        values=tensors,
        queries=tensors,
        scaling=1.0,
        modality=modality,
        n_keep=(n_keep,),
    )


@SETTINGS
@given(rows(), st.integers(0, 3))
def test_counts_and_kept_sets_equal_the_naive_reference(row: tuple[torch.Tensor, int, int, int], padding: int) -> None:
    scores, n_keep, window, floor = row
    heads, length = scores.shape
    expected = naive_adakv(scores.tolist(), n_keep, window, floor)
    counts = adaptive_head_counts(scores, n_keep, window, floor)
    assert counts.tolist() == [len(k) for k in expected]
    # exact total, floors, caps
    if n_keep < length:
        assert int(counts.sum()) == heads * n_keep
        assert all(max(min(window, n_keep), min(floor, n_keep)) <= c <= length for c in counts.tolist())
    else:
        assert counts.tolist() == [length] * heads
    # the selection that fills the counts keeps exactly the reference's entries (in a left-padded view)
    view = _view(scores, n_keep, padding)
    padded = torch.cat([torch.full((heads, padding), 99.0), scores], dim=1)[None]
    clamped = max(0, min(window, n_keep, length))
    plan = select_head_counts(view, padded, [clamped], [counts])
    valid = plan.valid_per_head()
    for h in range(heads):
        kept = plan.kept_indices[0, h][valid[0, h]] - padding
        assert kept.tolist() == expected[h]
    assert (plan.head_valid is None) == (len(set(counts.tolist())) == 1)


def test_the_floor_protects_a_head_whose_scores_are_all_low() -> None:
    scores = torch.tensor([[5.0, 6.0, 7.0, 8.0, 9.0, 10.0], [0.1, 0.3, 0.2, 0.0, 0.0, 0.0]])
    assert adaptive_head_counts(scores, n_keep=3, window=0, floor=0).tolist() == [6, 0]
    assert adaptive_head_counts(scores, n_keep=3, window=0, floor=2).tolist() == [4, 2]
    assert adaptive_head_counts(scores, n_keep=3, window=0, floor=3).tolist() == [3, 3]
    # the window counts against a head's floor: window 1 + floor 2 = 2 entries first
    assert adaptive_head_counts(scores, n_keep=3, window=1, floor=2).tolist() == [4, 2]


def test_ties_go_to_the_lower_head_then_the_earlier_entry() -> None:
    scores = torch.ones(3, 4)
    assert adaptive_head_counts(scores, n_keep=2, window=0, floor=0).tolist() == [4, 2, 0]
    view = _view(scores, 2)
    plan = select_head_counts(view, scores[None], [0], [torch.tensor([4, 2, 0])])
    assert plan.head_valid is not None
    assert [plan.kept_indices[0, h][plan.head_valid[0, h]].tolist() for h in range(3)] == [[0, 1, 2, 3], [0, 1], []]
