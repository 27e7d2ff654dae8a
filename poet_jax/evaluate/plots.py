"""PNG plots of prefix-margin curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_prefix_margins(
    reports: Mapping[str, "object"],
    path: str | Path,
    *,
    max_k: int | None = None,
    title: str = "prefix margin M_k on held-out pairs",
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Path:
    """Two panels over absolute ``k``: mean ``M_k`` and fraction of pairs with ``M_k > 0``,
    one curve per label (a checkpoint or a run); a third panel shows the relative positions.

    ``reports``: label -> :class:`~poet_jax.evaluate.margins.PrefixMarginReport` (or any
    object with ``ks``, ``mean_by_k``, ``positive_by_k``, ``fractions``,
    ``mean_by_fraction``). ``bands`` (optional): label -> (low, high) of ``mean_by_k``
    across seeds, drawn as a shaded band. Returns the written path.
    """
    if not reports:
        raise ValueError("plot_prefix_margins needs at least one report")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, rep in reports.items():
        ks = np.asarray(rep.ks)
        n = len(ks) if max_k is None else min(max_k, len(ks))
        (line,) = axes[0].plot(ks[:n], np.asarray(rep.mean_by_k)[:n], marker=".", label=label)
        if bands and label in bands:
            lo, hi = bands[label]
            axes[0].fill_between(ks[:n], np.asarray(lo)[:n], np.asarray(hi)[:n], color=line.get_color(), alpha=0.15)
        axes[1].plot(ks[:n], np.asarray(rep.positive_by_k)[:n], marker=".", label=label)
        fr = [f"{f:g}" for f in rep.fractions]
        axes[2].plot(fr, np.asarray(rep.mean_by_fraction), marker="o", label=label)
    axes[0].axhline(0.0, color="grey", lw=0.8)
    axes[0].set(xlabel="k (response tokens)", ylabel="mean M_k", title="mean prefix margin")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[1].set(xlabel="k (response tokens)", ylabel="fraction of pairs with M_k > 0", title="prefix accuracy",
                ylim=(-0.02, 1.02))
    axes[2].axhline(0.0, color="grey", lw=0.8)
    axes[2].set(xlabel="fraction of the shorter response", ylabel="mean M_k", title="relative positions")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
