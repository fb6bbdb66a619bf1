"""Cache budgets: how many prompt entries each row keeps."""

from __future__ import annotations


def n_keep_for(prompt_length: int, compression_ratio: float) -> int:
    """Entries kept from a prompt of ``prompt_length`` real tokens: ``int(L * (1 - r))``, at least 1.

    Evaluated literally with Python floats: ``1 - 0.8`` is ``0.19999999999999996``, so a ratio
    of 0.8 keeps one entry less than a decimal reading suggests when ``L * 0.2`` is whole.

    Examples:
        >>> n_keep_for(100, 0.8)
        19
        >>> n_keep_for(90, 0.8)
        17
        >>> n_keep_for(100, 0.5)
        50
        >>> n_keep_for(3, 0.9)
        1

    """
    if prompt_length <= 0:
        return 0
    return max(1, int(prompt_length * (1 - compression_ratio)))


def clamp_window(window_size: int, n_keep: int) -> int:
    """A window larger than the budget is clamped to the budget."""
    return max(0, min(window_size, n_keep))


def half_budget_window(window_size: int | None, n_keep: int) -> int:
    """The protected window of ``h2o`` and LOOK-M: ``window_size``, or half the budget when it is ``None``."""
    return n_keep // 2 if window_size is None else window_size
