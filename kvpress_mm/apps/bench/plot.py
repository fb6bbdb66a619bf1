"""The fidelity benchmark's figure: quality against compression ratio, one line per strategy.

Two panels: teacher-forced top-1 agreement with the full cache (higher is better) and the
mean KL divergence from the full cache's next-token distributions (lower is better, log
scale). Drawn with matplotlib's non-interactive Agg backend (optional dependency: the
``bench`` extra, ``pip install 'kvpress-mm[bench]'``).
"""

from __future__ import annotations

import math
from pathlib import Path

from kvpress_mm.apps.bench.fidelity import FidelityResult
from kvpress_mm.errors import UsageError


def plot_fidelity(result: FidelityResult, path: str | Path) -> Path:
    """Write the figure of ``result`` to ``path`` (PNG) and return the path.

    Raises:
        UsageError: matplotlib is not installed.

    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("the plot needs matplotlib: pip install 'kvpress-mm[bench]' (or pass --no-plot)") from None

    figure, (top1_axes, kl_axes) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    any_positive_kl = False
    for strategy in result.strategies:
        rows = sorted((r for r in result.summary if r.strategy == strategy), key=lambda r: r.compression_ratio)
        ratios = [r.compression_ratio for r in rows]
        top1_axes.plot(ratios, [100 * r.top1_agreement for r in rows], marker="o", label=strategy)
        kl = [r.kl if r.kl > 0 else math.nan for r in rows]
        any_positive_kl = any_positive_kl or any(not math.isnan(v) for v in kl)
        kl_axes.plot(ratios, kl, marker="o", label=strategy)
    top1_axes.set_xlabel("compression ratio (fraction of the prompt's KV cache removed)")
    top1_axes.set_ylabel("top-1 agreement with the full cache (%)")
    top1_axes.set_ylim(-2, 102)
    top1_axes.set_title("next-token top-1 agreement (teacher-forced)")
    kl_axes.set_xlabel("compression ratio (fraction of the prompt's KV cache removed)")
    kl_axes.set_ylabel("mean KL(full || strategy), nats")
    if any_positive_kl:
        kl_axes.set_yscale("log")
    kl_axes.set_title("divergence from the full cache (lower is better)")
    for axes in (top1_axes, kl_axes):
        axes.grid(True, alpha=0.3)
    top1_axes.legend(fontsize="small", loc="lower left")
    caveat = " - RANDOM-WEIGHT model: fidelity, not answer quality" if result.random_weights else ""
    n_prompts = len(result.references)
    figure.suptitle(f"kvpress-mm fidelity: {n_prompts} prompt(s), {result.new_tokens} tokens{caveat}", fontsize=10)
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
