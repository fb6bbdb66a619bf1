"""``pyramid``: per-layer budgets that decrease linearly with depth, at the same total (PyramidKV).

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", https://arxiv.org/abs/2406.02069
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kvpress_mm.compressor import Compressor
from kvpress_mm.errors import InvalidPlanError
from kvpress_mm.hookspecs import hookimpl
from kvpress_mm.ops.allocation import PyramidCap, pyramid_budgets
from kvpress_mm.ops.plan import CompressionPlan
from kvpress_mm.ops.views import LayerView
from kvpress_mm.wrappers.base import Wrapper, protected_window_of, refuse_budget_owner


class Pyramid(Wrapper):
    """Gives lower layers more of the budget and higher layers less, around any inner strategy.

    Per row (prompt length ``L``, uniform budget ``B = min(n_keep, L)``), ``N`` decoder layers:

    - ``w`` = the inner strategy's protected window for ``B`` (``snapkv``: 32, ``h2o`` / LOOK-M:
      ``B // 2``) with ``window_outside`` (default), else 0; every layer keeps ``r = max(w, 1)``
      entries on top of its share of the rest, ``N * (B - r)``. So deep layers never lose the
      window (PyramidKV's official layout), and no layer keeps nothing. With
      ``window_outside=False`` the window counts inside each layer's budget (kvpress's layout,
      STRATEGIES.md's definition) and ``r = 1``.
    - The line: ``b_min = (B - r) / beta``, ``b_max = 2 * (B - r) - b_min``; layer ``l`` (0 =
      first) gets ``b_max - l * (b_max - b_min) / (N - 1)``, rounded by largest remainder (ties to
      the lower layer) so that the layer budgets sum to ``N * B`` exactly.
    - A layer may keep at most ``L - r`` besides ``r``. ``cap="line"`` (default, the official
      code): if ``b_max > L - r``, ``b_max = L - r`` and ``b_min = 2 * (B - r) - b_max``, a flatter
      line with the same mean. ``cap="spill"`` (STRATEGIES.md): the uncapped line is rounded and a
      layer's excess over the cap moves to the next layers, in order.
    - Layer ``l``'s inner strategy then plans with ``n_keep = r + share[l]``.

    Differences from the official code, kept on purpose: budgets are exact (its integer
    ``steps`` overshoot slightly), and short prompts get the pyramid too (it falls back to a
    uniform budget when more than half of the prompt is kept). kvpress's ``PyramidKVPress``
    counts the window inside each layer and silently runs plain SnapKV when ``b_min`` is
    smaller than the window; neither fallback exists here.

    With an inner ``h2o`` (``decode_eviction``), each layer keeps its own budget while decoding.
    Models with sliding-window layers: those are never compressed, and the others keep their
    place on the line (budgets by ``layer_idx`` and ``num_layers``).

    Attributes:
        beta: steepness, ``b_max / b_min`` of the uncapped line is ``2 * beta - 1`` (default 20; 1 = uniform).
        window_outside: keep the inner strategy's window on top of every layer's share (default True).
        cap: ``"line"`` (default) or ``"spill"``, what happens when the first layers would exceed the prompt.

    """

    beta: float = Field(default=20.0, ge=1.0, allow_inf_nan=False, description="Steepness of the pyramid.")
    window_outside: bool = Field(default=True, description="The inner window on top of every layer's share.")
    cap: PyramidCap = Field(default="line", description="Above-the-prompt rule: 'line' or 'spill'.")

    @classmethod
    def check_inner(cls, inner: Compressor) -> None:
        """Refuse another budget owner (``pyramid``, ``modality-budget``, ``vl-cache``) and budget-ignoring inners."""
        super().check_inner(inner)
        if isinstance(inner, Pyramid):
            raise ValueError("pyramid(pyramid(...)) is meaningless: one pyramid already sets every layer's budget")
        refuse_budget_owner("pyramid", inner)

    @property
    def allocates_budgets(self) -> bool:
        """True: the pyramid decides each layer's budget."""
        return True

    def layer_budgets(self, layer: LayerView) -> tuple[int, ...]:
        """Each row's budget in ``layer`` (its place on the pyramid)."""
        if layer.num_layers is None or not 0 <= layer.layer_idx < layer.num_layers:
            raise InvalidPlanError(
                f"pyramid needs the view's num_layers (got {layer.num_layers} for layer {layer.layer_idx}): "
                "build the LayerView with num_layers"
            )
        budgets = []
        for length, n_keep in zip(layer.prompt_lengths, layer.n_keep, strict=True):
            uniform = min(n_keep, length)
            reserved = self.reserved(uniform)
            shares = pyramid_budgets(uniform - reserved, layer.num_layers, length - reserved, self.beta, self.cap)
            budgets.append(reserved + shares[layer.layer_idx])
        return tuple(budgets)

    def reserved(self, uniform: int) -> int:
        """Entries every layer keeps before the split: the inner window (``window_outside``), at least 1."""
        window = protected_window_of(self.inner, uniform) if self.window_outside else 0
        return min(uniform, max(window, 1))

    def plan(self, layer: LayerView) -> CompressionPlan:
        """The inner strategy's plan with this layer's budgets."""
        return self.inner.plan(layer.with_budgets(self.layer_budgets(layer)))


@hookimpl
def kvpress_mm_register_strategies(register: Any) -> None:
    """Register ``pyramid``."""
    register("pyramid", Pyramid)
