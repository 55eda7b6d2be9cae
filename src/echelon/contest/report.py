"""The contest's report: its tables (console and OUT/tables.md) and plots (OUT/plots/)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from echelon.contest.plots import plot_final_loss, plot_loss_curves
from echelon.contest.protocol import PLOTS, RESULTS, TABLES, TUNING, Tuning, loss_curves, tuning_table
from echelon.contest.spec import Contest, FinalRun
from echelon.contest.tables import (
    Final,
    TextTable,
    cells,
    relative_table,
    table5,
    table6,
    table10,
    to_markdown,
)
from echelon.rundir import write_atomic

LOSS_PLOT = "loss_vs_tokens.png"
BAR_PLOT = "final_loss.png"


@dataclass(frozen=True)
class Report:
    """The tables in print order and the plot files written."""

    tables: list[TextTable]
    plots: list[Path]


def build_tables(contest: Contest, tuning: Tuning, finals: list[Final]) -> list[TextTable]:
    """The tuning table, then Tables 5, 6 and 10 (the paper's numbering) and the table relative to
    the reference strategy, over the finished finals."""
    grid = cells(finals)
    budgets = {name: limits for name, (limits, _) in contest.comparisons().items()}
    strategies = contest.strategies
    return [
        tuning_table(contest, tuning),
        table5(grid, strategies, list(budgets)),
        table6(grid, strategies, budgets),
        table10(grid, strategies, list(budgets), contest.spec.target_loss),
        relative_table(grid, strategies, list(budgets), contest.spec.reference),
    ]


def write_report(
    contest: Contest, tuning: Tuning, planned: list[FinalRun], finals: list[Final], out: Path, command: str
) -> Report:
    """Write OUT/tables.md and the plots (when any final finished); return what was written."""
    tables = build_tables(contest, tuning, finals)
    budgets = list(contest.comparisons())
    plots = []
    if finals:
        (out / PLOTS).mkdir(parents=True, exist_ok=True)
        plots = [out / PLOTS / LOSS_PLOT, out / PLOTS / BAR_PLOT]
        curves = loss_curves(planned, out)
        plot_loss_curves(curves, contest.strategies, budgets, plots[0], contest.spec.target_loss)
        plot_final_loss(cells(finals), contest.strategies, budgets, plots[1])
    lines = [
        f"# Contest: {contest.path}",
        "",
        f"Reproduce: `{command}`. Chosen settings: [{TUNING}]({TUNING}); every final run: [{RESULTS}]({RESULTS}).",
        "",
    ]
    lines += [to_markdown(t) for t in tables]
    lines += [f"![{p.stem}]({PLOTS}/{p.name})\n" for p in plots]
    write_atomic(out / TABLES, "\n".join(lines))
    return Report(tables, plots)
