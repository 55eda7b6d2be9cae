"""The contest's tables, numbered as the paper numbers them (Tables 5, 6 and 10), from the final
runs, and an unnumbered table relative to a reference strategy.

Every statistic is over a strategy's seeds at one budget: the mean and the sample standard
deviation (n - 1 in the denominator; none with a single seed). Losses are validation losses
(nats per token), bytes are exact cross-boundary wire bytes, times are virtual seconds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from echelon.config import BudgetConfig
from echelon.strategies import get_strategy


@dataclass(frozen=True)
class Final:
    """The outcome of one finished final run (one row of results.csv)."""

    strategy: str
    budget: str
    seed: int
    end_val_loss: float
    cross_boundary_bytes: int
    outer_steps: int
    tokens: int
    virtual_time_s: float
    time_to_target_s: float | None
    stop_reason: str


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (None for one value) of n values."""

    mean: float
    std: float | None
    n: int

    def fmt(self, spec: str = ".4f") -> str:
        """`mean ± std`, or the mean alone for a single value."""
        if self.std is None:
            return format(self.mean, spec)
        return f"{format(self.mean, spec)} ± {format(self.std, spec)}"


def stat(values: Iterable[float]) -> Stat | None:
    """The Stat of `values`; None when there are none."""
    xs = [float(v) for v in values]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return Stat(mean, None, 1)
    return Stat(mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)), len(xs))


@dataclass(frozen=True)
class Cell:
    """One strategy at one budget, over its seeds. `ttt` is over the seeds that reached the target."""

    runs: int
    loss: Stat
    bytes: Stat
    syncs: Stat
    tokens: Stat
    virtual_time: Stat
    ttt: Stat | None
    reached: int
    stop_reasons: tuple[str, ...]


def cells(finals: Iterable[Final]) -> dict[tuple[str, str], Cell]:
    """(strategy, budget) -> Cell over every final run of that pair."""
    groups: dict[tuple[str, str], list[Final]] = {}
    for f in finals:
        groups.setdefault((f.strategy, f.budget), []).append(f)
    out = {}
    for key, runs in groups.items():
        reached = [f.time_to_target_s for f in runs if f.time_to_target_s is not None]
        reasons = Counter(f.stop_reason for f in runs)
        out[key] = Cell(
            runs=len(runs),
            loss=stat(f.end_val_loss for f in runs),
            bytes=stat(f.cross_boundary_bytes for f in runs),
            syncs=stat(f.outer_steps for f in runs),
            tokens=stat(f.tokens for f in runs),
            virtual_time=stat(f.virtual_time_s for f in runs),
            ttt=stat(reached),
            reached=len(reached),
            stop_reasons=tuple(f"{r} x{n}" if n > 1 else r for r, n in sorted(reasons.items())),
        )
    return out


@dataclass(frozen=True)
class TextTable:
    """A table as text cells: a title, a header, rows and an explanatory note."""

    title: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    note: str = ""


MISSING = "—"


def describe_budget(budget: BudgetConfig) -> str:
    """`tokens 40000`, `cross_boundary_bytes 3000000 or tokens 80000`: the limits of a budget."""
    limits = budget.model_dump(exclude_none=True).items()
    return " or ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in limits)


def _ppl(s: Stat) -> str:
    """Perplexity exp(mean loss) (of the mean, so no std)."""
    return f"{math.exp(s.mean):.2f}"


def table5(
    grid: Mapping[tuple[str, str], Cell], strategies: Iterable[str], budgets: Iterable[str]
) -> TextTable:
    """Paper Table 5: per budget and strategy, final validation loss and perplexity, cross-boundary
    bytes, syncs and tokens (mean ± std over seeds), and what stopped the runs."""
    rows = []
    for b in budgets:
        for s in strategies:
            c = grid.get((s, b))
            if c is None:
                rows.append((b, get_strategy(s).label, *(MISSING,) * 6))
                continue
            rows.append(
                (
                    b,
                    get_strategy(s).label,
                    c.loss.fmt(),
                    _ppl(c.loss),
                    _megabytes(c.bytes),
                    c.syncs.fmt(".1f"),
                    c.tokens.fmt(".0f"),
                    ", ".join(c.stop_reasons),
                )
            )
    return TextTable(
        "Table 5: final validation loss, perplexity, communication and syncs at matched budgets",
        ("budget", "strategy", "val loss", "PPL", "cross-boundary MB", "syncs", "tokens", "stop"),
        rows,
        "Mean ± sample std over seeds; PPL = exp(mean val loss). Syncs: outer steps. Stop: which budget "
        "ended the runs. Strategies marked [not admissible: simulation only] send per-device updates or "
        "pool data across boundaries: they run in simulation only.",
    )


def table6(
    grid: Mapping[tuple[str, str], Cell], strategies: Iterable[str], budgets: Mapping[str, BudgetConfig]
) -> TextTable:
    """Paper Table 6: final validation loss (mean ± std over seeds) per strategy under each fixed
    budget (bytes, wall clock, tokens, syncs); * marks the best."""
    best = {}
    for b in budgets:
        means = [c.loss.mean for (s, bb), c in grid.items() if bb == b]
        best[b] = min(means) if means else None
    rows = []
    for s in strategies:
        row = [get_strategy(s).label]
        for b in budgets:
            c = grid.get((s, b))
            row.append(MISSING if c is None else c.loss.fmt() + (" *" if c.loss.mean == best[b] else ""))
        rows.append(tuple(row))
    seeds = sorted({c.runs for c in grid.values()})
    note = (
        "Final validation loss, mean ± sample std over "
        f"{'/'.join(map(str, seeds)) or 0} seeds; * lowest mean at that budget. Budgets: "
        + "; ".join(f"{b} = {describe_budget(v)}" for b, v in budgets.items())
        + ". Strategies marked [not admissible: simulation only] send per-device updates or pool data "
        "across boundaries: they run in simulation only."
    )
    return TextTable(
        "Table 6: final validation loss under each fixed budget",
        ("strategy", *(f"{b} budget" for b in budgets)),
        rows,
        note,
    )


def _megabytes(s: Stat) -> str:
    return Stat(s.mean / 1e6, None if s.std is None else s.std / 1e6, s.n).fmt(".3f")


def table10(
    grid: Mapping[tuple[str, str], Cell],
    strategies: Iterable[str],
    budgets: Iterable[str],
    target: float | None,
) -> TextTable:
    """Paper Table 10: per budget and strategy, time to the target loss and validation perplexity."""
    rows = []
    for b in budgets:
        for s in strategies:
            c = grid.get((s, b))
            if c is None:
                rows.append((b, get_strategy(s).label, *(MISSING,) * 3))
                continue
            if target is None:
                ttt = MISSING
            else:
                ttt = f"{MISSING if c.ttt is None else c.ttt.fmt('.2f')} ({c.reached}/{c.runs})"
            rows.append((b, get_strategy(s).label, ttt, _ppl(c.loss), c.virtual_time.fmt(".2f")))
    reached = (
        "no target_loss set"
        if target is None
        else f"virtual seconds to the first evaluation at or below {target:g}, over the seeds that "
        "reached it (reached/runs)"
    )
    return TextTable(
        "Table 10: time to target and validation perplexity",
        ("budget", "strategy", "time to target s", "PPL", "virtual s"),
        rows,
        f"Mean ± sample std over seeds. Time to target: {reached}. PPL = exp(mean final val loss).",
    )


def relative_table(
    grid: Mapping[tuple[str, str], Cell], strategies: Iterable[str], budgets: Iterable[str], reference: str
) -> TextTable:
    """Each strategy against the reference at each budget: loss gap % and bytes ratio of the means
    (the paper has no such table; it is unnumbered)."""
    rows = []
    for b in budgets:
        ref = grid.get((reference, b))
        for s in strategies:
            c = grid.get((s, b))
            if c is None or ref is None:
                rows.append((b, get_strategy(s).label, MISSING, MISSING))
                continue
            gap = 100 * (c.loss.mean - ref.loss.mean) / ref.loss.mean
            ratio = c.bytes.mean / ref.bytes.mean if ref.bytes.mean else math.inf
            rows.append((b, get_strategy(s).label, f"{gap:+.2f}%", f"{ratio:.2f}x"))
    return TextTable(
        f"Relative to {reference}",
        ("budget", "strategy", f"loss gap vs {reference}", f"bytes vs {reference}"),
        rows,
        f"Loss gap = (mean loss - {reference}'s mean loss) / {reference}'s mean loss (positive: worse); "
        f"bytes = mean cross-boundary bytes / {reference}'s.",
    )


def to_rich(table: TextTable) -> Table:
    """The table for the console (cells are text, never rich markup: labels keep their brackets)."""
    out = Table(title=escape(table.title), caption=escape(table.note) or None, caption_justify="left")
    for i, col in enumerate(table.header):
        out.add_column(escape(col), justify="left" if i == 0 or col in ("budget", "strategy") else "right")
    for row in table.rows:
        out.add_row(*(escape(cell) for cell in row))
    return out


def to_markdown(table: TextTable) -> str:
    """The table as a markdown section: a heading, the table, the note."""
    lines = [f"## {table.title}", "", "| " + " | ".join(table.header) + " |"]
    lines.append("|" + "|".join("---" for _ in table.header) + "|")
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"
