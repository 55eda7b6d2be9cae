"""The contest's PNG plots: loss-vs-tokens curves (mean over seeds) and a bar chart of final loss.

Drawn with matplotlib's object API on the Agg canvas (no pyplot), like `echelon.analysis.plots`.
Non-admissible strategies are drawn dashed (curves) and hatched (bars).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from echelon.analysis.plots import DPI
from echelon.contest.tables import Cell
from echelon.strategies import get_strategy

Curve = tuple[Sequence[float], Sequence[float]]
GRID_POINTS = 60


def mean_curve(curves: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeds' (tokens, loss) curves on a common token grid: (tokens, mean loss, std of loss).

    The grid spans the tokens every seed covers (from the latest first evaluation to the earliest
    last one); each curve is linearly interpolated onto it. The std is over seeds (0 for one).
    """
    lo = max(float(x[0]) for x, _ in curves)
    hi = min(float(x[-1]) for x, _ in curves)
    grid = np.linspace(lo, hi, GRID_POINTS) if hi > lo else np.array([lo])
    ys = np.stack([np.interp(grid, np.asarray(x, float), np.asarray(y, float)) for x, y in curves])
    std = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(grid)
    return grid, ys.mean(axis=0), std


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)


def plot_loss_curves(
    curves: Mapping[tuple[str, str], Sequence[Curve]],
    strategies: Sequence[str],
    budgets: Sequence[str],
    path: Path,
    target: float | None = None,
) -> None:
    """Validation loss against training tokens, one panel per budget, one line per strategy
    (mean over seeds, shaded ± one std)."""
    cols = min(2, len(budgets))
    rows = math.ceil(len(budgets) / cols)
    fig = Figure(figsize=(6.5 * cols, 4.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, budget in zip(axes, budgets, strict=False):
        for i, s in enumerate(strategies):
            if (s, budget) not in curves:
                continue
            x, mean, std = mean_curve(curves[(s, budget)])
            style = "-" if get_strategy(s).admissible else "--"
            ax.plot(x, mean, style, color=f"C{i % 10}", label=get_strategy(s).label)
            ax.fill_between(x, mean - std, mean + std, color=f"C{i % 10}", alpha=0.15, linewidth=0)
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{budget} budget")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    for ax in axes[len(budgets) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    fig.suptitle("Contest: validation loss (mean over seeds, ± one std)")
    _save(fig, path)


def plot_final_loss(
    grid: Mapping[tuple[str, str], Cell], strategies: Sequence[str], budgets: Sequence[str], path: Path
) -> None:
    """Final validation loss per budget (groups) and strategy (bars), error bars one std."""
    fig = Figure(
        figsize=(max(6.0, 1.6 * len(budgets) * max(1, len(strategies)) / 3), 4.8), layout="constrained"
    )
    ax = fig.subplots()
    width = 0.8 / max(1, len(strategies))
    lows = []
    for i, s in enumerate(strategies):
        xs, means, errs = [], [], []
        for j, b in enumerate(budgets):
            c = grid.get((s, b))
            if c is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                means.append(c.loss.mean)
                errs.append(c.loss.std or 0.0)
        if not xs:
            continue
        lows += [m - e for m, e in zip(means, errs, strict=True)]
        admissible = get_strategy(s).admissible
        ax.bar(
            xs,
            means,
            width,
            yerr=errs,
            capsize=3,
            color=f"C{i % 10}",
            hatch=None if admissible else "//",
            edgecolor="black" if not admissible else None,
            label=get_strategy(s).label,
        )
    if lows:
        top = max(c.loss.mean + (c.loss.std or 0.0) for c in grid.values())
        ax.set_ylim(min(lows) - 0.05 * (top - min(lows) + 1e-9), top + 0.05 * (top - min(lows) + 1e-9))
    ax.set_xticks(range(len(budgets)), [f"{b} budget" for b in budgets])
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3, axis="y")
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    ax.set_title("Contest: final validation loss (mean over seeds, error bar one std)")
    _save(fig, path)
