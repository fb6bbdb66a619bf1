"""``modality-budget``: separate compression ratios for vision and text entries, around any scored strategy."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from kvpress_mm.compressor import Compressor, ScoredCompressor
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.modality import Modality
from kvpress_mm.ops.budget import clamp_window
from kvpress_mm.ops.plan import CompressionPlan, stack_rows
from kvpress_mm.ops.selection import check_scores
from kvpress_mm.ops.views import LayerView
from kvpress_mm.wrappers.base import Wrapper, refuse_budget_owner


def modality_counts(modality_row: torch.Tensor) -> tuple[int, int]:
    """``(vision, text)`` real entries of one row's modality map (vision = image + video)."""
    vision = int(((modality_row == Modality.IMAGE) | (modality_row == Modality.VIDEO)).sum())
    return vision, int((modality_row == Modality.TEXT).sum())


class ModalityBudget(Wrapper):
    """Keeps a fixed share of each row's vision entries and another of its text entries.

    Per row with ``L_v`` vision (image and video) and ``L_t`` text entries:

    - it keeps ``n_v = int(L_v * (1 - vision_ratio))`` vision entries and
      ``n_t = int(L_t * (1 - text_ratio))`` text entries, per layer and KV head (a ratio left
      ``None`` is ``compression_ratio``). If both are 0 the row keeps one entry: a text one if it
      has any, else a vision one. ``n_keep`` (the report's) is ``n_v + n_t``.
    - the inner strategy's protected window for ``n_keep`` counts against its own modalities:
      the window's most recent entries of each modality are kept, up to that modality's budget;
    - the rest of each modality's budget goes to its entries outside the window with the highest
      inner scores (each KV head its own, as the inner strategy ranks them);
    - then the inner strategy's :meth:`~kvpress_mm.ScoredCompressor.finish` (LOOK-M merges,
      ``h2o`` / ``tova`` decode-time state).

    Attributes:
        vision_ratio: fraction of the vision entries removed (``None``: ``compression_ratio``).
        text_ratio: fraction of the text entries removed (``None``: ``compression_ratio``).

    ``compression_ratio`` is the ratio of the modality without its own; setting it together with
    both modality ratios is refused (it would be unused).

    """

    vision_ratio: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="Vision entries removed (None: compression_ratio).",
    )
    text_ratio: float | None = Field(
        default=None, ge=0.0, lt=1.0, allow_inf_nan=False, description="Text entries removed (None: compression_ratio)."
    )

    @model_validator(mode="after")
    def _ratio_used(self) -> ModalityBudget:
        if (
            self.vision_ratio is not None
            and self.text_ratio is not None
            and "compression_ratio" in self.model_fields_set
        ):
            raise ValueError(
                "modality-budget: compression_ratio is unused when vision_ratio and text_ratio are both set; "
                "drop compression_ratio (or one of the modality ratios)"
            )
        return self

    @model_serializer(mode="wrap")
    def _drop_unused_ratio(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.vision_ratio is not None and self.text_ratio is not None:
            data.pop("compression_ratio", None)  # unused; a config that sets it would be refused
        return data

    @classmethod
    def check_inner(cls, inner: Compressor) -> None:
        """Refuse inners without scores, other budget owners and budget-ignoring inners."""
        super().check_inner(inner)
        if isinstance(inner, ModalityBudget):
            raise ValueError("modality-budget(modality-budget(...)) is meaningless: one sets both modalities' budgets")
        refuse_budget_owner("modality-budget", inner)
        if not isinstance(inner, ScoredCompressor):
            hint = f"; write {inner.name}(modality-budget(...)) instead" if isinstance(inner, Wrapper) else ""
            raise ValueError(
                "modality-budget needs an inner strategy that scores entries (a ScoredCompressor); "
                f"'{inner.name}' is not one{hint}"
            )

    @property
    def ratios(self) -> tuple[float, float]:
        """``(vision, text)`` ratios in effect."""
        vision = self.compression_ratio if self.vision_ratio is None else self.vision_ratio
        text = self.compression_ratio if self.text_ratio is None else self.text_ratio
        return vision, text

    @property
    def is_noop(self) -> bool:
        """True when both ratios in effect are 0 (the inner strategy's own ratio plays no part)."""
        return self.ratios == (0.0, 0.0)

    @property
    def allocates_budgets(self) -> bool:
        """True: the budgets come from the modality ratios."""
        return True

    def modality_budgets(self, modality_row: torch.Tensor) -> tuple[int, int]:
        """``(n_v, n_t)`` for one row's modality map."""
        vision, text = modality_counts(modality_row)
        vision_ratio, text_ratio = self.ratios
        n_vision, n_text = int(vision * (1 - vision_ratio)), int(text * (1 - text_ratio))
        if n_vision + n_text == 0:  # every row keeps at least one entry, as n_keep does
            return (0, 1) if text else (1, 0)
        return n_vision, n_text

    def budgets(self, modality: torch.Tensor) -> tuple[int, ...]:
        """Each row's ``n_v + n_t``."""
        return tuple(sum(self.modality_budgets(row)) for row in modality)

    def plan(self, layer: LayerView) -> CompressionPlan:
        """Per modality: its window entries up to its budget, then its top-scoring others."""
        inner = self.inner
        assert isinstance(inner, ScoredCompressor)  # check_inner
        pairs = [self.modality_budgets(layer.modality[b]) for b in range(layer.batch_size)]
        view = layer.with_budgets([n_vision + n_text for n_vision, n_text in pairs])
        scores = check_scores(inner.score(view), view, type(inner).__name__)
        windows = [clamp_window(inner.protected_window(n), n) for n in view.n_keep]
        ranked = view.selection_scores(scores, windows)
        is_text = layer.modality == Modality.TEXT
        rows = []
        for b, (n_vision, n_text) in enumerate(pairs):
            positions = layer.real_positions(b)
            length, window = int(positions.numel()), windows[b]
            kept = []
            for budget, in_modality in ((n_text, is_text[b, positions]), (n_vision, ~is_text[b, positions])):
                own = in_modality.nonzero().squeeze(-1)  # indices into the row's real positions
                in_window, outside = own[own >= length - window], own[own < length - window]
                protected = in_window[max(0, in_window.numel() - budget) :]  # its most recent ones
                rest = budget - int(protected.numel())
                top = ranked[b][:, positions[outside]].topk(rest, dim=-1).indices if rest > 0 else None
                kept.append(protected.expand(layer.kv_heads, -1))
                if top is not None:
                    kept.append(outside[top])
            chosen = torch.cat(kept, dim=-1).sort(dim=-1).values
            rows.append(positions[chosen])
        kept_indices, slot_valid = stack_rows(rows)
        return inner.finish(view, CompressionPlan(kept_indices, slot_valid))


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``modality-budget``."""
    register("modality-budget", ModalityBudget)
