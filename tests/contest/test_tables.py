"""Tables 5, 6 and 10 (the paper's numbering) and the relative table from synthetic final runs:
mean, sample std, ratios and the labels."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from echelon.config import BudgetConfig, RunConfig
from echelon.contest.protocol import PilotResult, select
from echelon.contest.spec import Trial
from echelon.contest.tables import (
    Final,
    cells,
    relative_table,
    stat,
    table5,
    table6,
    table10,
    to_markdown,
    to_rich,
)
from tests.helpers import small_run

BUDGETS = {"tokens": BudgetConfig(tokens=1000), "bytes": BudgetConfig(cross_boundary_bytes=5000)}


def _final(strategy: str, budget: str, seed: int, loss: float, nbytes: int, ttt: float | None) -> Final:
    return Final(strategy, budget, seed, loss, nbytes, 4 + seed, 1000, 10.0 + seed, ttt, "tokens")


FINALS = [
    _final("echelon", "tokens", 0, 4.0, 1_000_000, 5.0),
    _final("echelon", "tokens", 1, 4.2, 1_000_000, 7.0),
    _final("echelon", "tokens", 2, 4.1, 1_000_000, None),
    _final("fedavg", "tokens", 0, 4.4, 3_000_000, None),
    _final("fedavg", "tokens", 1, 4.6, 1_000_000, 9.0),
    _final("echelon", "bytes", 0, 3.9, 500_000, 2.0),
]


def test_stat_is_the_mean_and_sample_std():
    s = stat([4.0, 4.2, 4.1])
    assert s.mean == pytest.approx(4.1) and s.std == pytest.approx(0.1) and s.n == 3
    assert stat([2.0, 4.0]).std == pytest.approx(math.sqrt(2))
    assert stat([3.0]).std is None and stat([3.0]).fmt() == "3.0000"
    assert stat([]) is None


def test_cells_group_by_strategy_and_budget():
    grid = cells(FINALS)
    e = grid[("echelon", "tokens")]
    assert e.runs == 3 and e.loss.mean == pytest.approx(4.1) and e.loss.std == pytest.approx(0.1)
    assert e.syncs.mean == pytest.approx(5.0)  # outer steps 4, 5, 6
    assert e.reached == 2 and e.ttt.mean == pytest.approx(6.0) and e.ttt.std == pytest.approx(math.sqrt(2))
    f = grid[("fedavg", "tokens")]
    assert f.bytes.mean == pytest.approx(2_000_000) and f.reached == 1 and f.ttt.std is None
    assert ("fedavg", "bytes") not in grid


def test_tables_carry_the_papers_numbers_and_columns():
    grid = cells(FINALS)
    t5 = table5(grid, ["echelon", "fedavg"], list(BUDGETS))
    assert t5.title.startswith("Table 5:")
    assert t5.header == (
        "budget",
        "strategy",
        "val loss",
        "PPL",
        "cross-boundary MB",
        "syncs",
        "tokens",
        "stop",
    )
    assert t5.rows[0][:6] == (
        "tokens",
        "echelon",
        "4.1000 ± 0.1000",
        f"{math.exp(4.1):.2f}",
        "1.000 ± 0.000",
        "5.0 ± 1.0",
    )
    assert t5.rows[1][4] == "2.000 ± 1.414"
    assert t5.rows[3][1] == "fedavg [not admissible: simulation only]" and t5.rows[3][2] == "—"

    t6 = table6(grid, ["echelon", "fedavg"], BUDGETS)  # the paper's fixed-budget normalisations
    assert t6.title.startswith("Table 6:")
    assert t6.header == ("strategy", "tokens budget", "bytes budget")
    assert t6.rows[0] == ("echelon", "4.1000 ± 0.1000 *", "3.9000 *")
    assert t6.rows[1] == ("fedavg [not admissible: simulation only]", "4.5000 ± 0.1414", "—")

    t10 = table10(grid, ["echelon", "fedavg"], list(BUDGETS), 4.3)
    assert t10.title.startswith("Table 10:")
    assert t10.rows[0][2] == "6.00 ± 1.41 (2/3)" and t10.rows[1][2] == "9.00 (1/2)"

    rel = relative_table(grid, ["echelon", "fedavg"], list(BUDGETS), "echelon")
    assert not rel.title.startswith("Table")  # the paper has no such table
    assert rel.rows[0][2:] == ("+0.00%", "1.00x")
    gap = 100 * (4.5 - 4.1) / 4.1
    assert rel.rows[1][2:] == (f"{gap:+.2f}%", "2.00x")
    assert rel.rows[3][2:] == ("—", "—")  # fedavg has no bytes-budget runs


def test_non_admissible_label_survives_console_and_markdown():
    t6 = table6(cells(FINALS), ["echelon", "fedavg"], BUDGETS)
    console = Console(width=200, record=True)
    console.print(to_rich(t6))
    text = console.export_text()
    assert "fedavg [not admissible: simulation only]" in text  # not swallowed as rich markup
    assert "simulation only" in t6.note
    assert "| fedavg [not admissible: simulation only] |" in to_markdown(t6)


CONFIG = RunConfig.model_validate(small_run())


def _pilot(index: int, loss: float | None, nbytes: int | None, error: str | None = None) -> PilotResult:
    trial = Trial("echelon", index, {"train.lr": index}, f"id{index}", CONFIG)
    return PilotResult(trial, loss, nbytes, error)


def test_selection_rule():
    pilots = [_pilot(0, 4.5, 100), _pilot(1, 4.2, 300), _pilot(2, 4.25, 200), _pilot(3, None, None, "boom")]
    assert select(pilots, 0.0).trial.index == 1  # lowest loss
    assert select(pilots, 0.06).trial.index == 2  # tied within 0.06: fewer bytes wins
    assert select([_pilot(0, 4.2, 300), _pilot(1, 4.2, 300)], 0.0).trial.index == 0  # then trial order
    assert select([_pilot(0, None, None, "boom")], 0.0) is None
