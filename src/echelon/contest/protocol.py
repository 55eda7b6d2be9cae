"""The contest protocol: pilots, selection, finals, and the files they leave in OUT.

1. Pilots: every strategy's trials (`Contest.pilots`) train with the same token budget each.
2. Selection (`select`): per strategy, the pilot with the lowest final validation loss; pilots
   within `pilot.tie_tolerance` of it are tied and the one with fewer cross-boundary bytes wins,
   then the earlier trial. The choice goes to OUT/tuning.json.
3. Finals: the chosen settings x seeds x budgets; OUT/results.csv has one row per finished run.

All runs train into OUT/runs/<id>/ (id: a hash of the run config, see `analysis.sweep.run_id`)
in parallel processes; a rerun skips every run that finished, so an interrupted contest resumes.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echelon.analysis.rundata import load_run_dir
from echelon.analysis.sweep import METRICS, Execution, execute, run_outcome
from echelon.contest.space import describe
from echelon.contest.spec import Contest, FinalRun, Trial
from echelon.contest.tables import Final, TextTable
from echelon.rundir import write_atomic
from echelon.strategies import get_strategy

RUNS = "runs"
TUNING = "tuning.json"
RESULTS = "results.csv"
TABLES = "tables.md"
PLOTS = "plots"
SELECTION_RULE = (
    "lowest final validation loss of the pilot; pilots within tie_tolerance of it are tied, and "
    "the one with fewer cross-boundary bytes wins (then the earlier trial)"
)


@dataclass(frozen=True)
class PilotResult:
    """A pilot trial's outcome: its final loss and cross-boundary bytes, or the error it hit."""

    trial: Trial
    end_val_loss: float | None = None
    cross_boundary_bytes: int | None = None
    error: str | None = None


def select(results: list[PilotResult], tolerance: float) -> PilotResult | None:
    """The selection rule (module docstring) over the pilots that finished; None if none did."""
    ok = [r for r in results if r.error is None]
    if not ok:
        return None
    best = min(r.end_val_loss for r in ok)
    tied = [r for r in ok if r.end_val_loss <= best + tolerance]
    return min(tied, key=lambda r: (r.cross_boundary_bytes, r.end_val_loss, r.trial.index))


@dataclass(frozen=True)
class Tuning:
    """Every strategy's pilot results and its chosen pilot (absent when all its pilots failed)."""

    results: dict[str, list[PilotResult]]
    chosen: dict[str, PilotResult]


def _bytes(summary: dict) -> int:
    return int(sum(summary["cross_boundary_bytes"].values()))


def run_pilots(contest: Contest, out: Path, *, workers: int, progress: bool) -> tuple[Tuning, Execution]:
    """Train every pilot (skipping finished ones), select per strategy, write OUT/tuning.json."""
    runs = {t.run_id: t.config for trials in contest.pilots.values() for t in trials}
    done = execute(runs, out / RUNS, workers=workers, progress=progress)
    results: dict[str, list[PilotResult]] = {}
    for strategy, trials in contest.pilots.items():
        results[strategy] = []
        for t in trials:
            if t.run_id in done.summaries:
                s = done.summaries[t.run_id]
                results[strategy].append(PilotResult(t, s["end_val_loss"], _bytes(s)))
            else:
                results[strategy].append(PilotResult(t, error=done.failures.get(t.run_id, "did not run")))
    chosen = {}
    for strategy, pilots in results.items():
        best = select(pilots, contest.spec.pilot.tie_tolerance)
        if best is not None:
            chosen[strategy] = best
    tuning = Tuning(results, chosen)
    write_atomic(out / TUNING, json.dumps(tuning_record(contest, tuning), indent=2) + "\n")
    return tuning, done


def _pilot_json(r: PilotResult) -> dict[str, Any]:
    return {
        "trial": r.trial.index,
        "settings": r.trial.settings,
        "run_id": r.trial.run_id,
        "end_val_loss": r.end_val_loss,
        "cross_boundary_bytes": r.cross_boundary_bytes,
        "error": r.error,
    }


def tuning_record(contest: Contest, tuning: Tuning) -> dict[str, Any]:
    """The content of tuning.json: the pilot budget, the rule, every trial and each choice."""
    pilot = contest.spec.pilot
    strategies = {}
    for name in contest.strategies:
        s = get_strategy(name)
        chosen = tuning.chosen.get(name)
        strategies[name] = {
            "label": s.label,
            "admissible": s.admissible,
            "space_source": contest.space_source[name],
            "space": contest.spaces[name],
            "chosen": None if chosen is None else _pilot_json(chosen),
            "trials": [_pilot_json(r) for r in tuning.results[name]],
        }
    return {
        "contest": str(contest.path),
        "quick": contest.quick,
        "pilot": {
            "tokens_per_trial": pilot.tokens,
            "trials_per_strategy": contest.trials,
            "token_budget_per_strategy": contest.trials * pilot.tokens,
            "search": pilot.search,
            "search_seed": pilot.seed,
            "run_seed": contest.pilot_seed,
            "tie_tolerance": pilot.tie_tolerance,
        },
        "selection_rule": SELECTION_RULE,
        "strategies": strategies,
    }


def tuning_table(contest: Contest, tuning: Tuning) -> TextTable:
    """Per strategy: its search space, pilots run, the chosen settings and their pilot outcome."""
    rows = []
    for name in contest.strategies:
        results = tuning.results[name]
        failed = sum(r.error is not None for r in results)
        chosen = tuning.chosen.get(name)
        space = ", ".join(contest.spaces[name]) or "none"
        rows.append(
            (
                get_strategy(name).label,
                f"{space} ({contest.space_source[name]})",
                f"{len(results)}" + (f" ({failed} failed)" if failed else ""),
                "none: every pilot failed" if chosen is None else describe(chosen.trial.settings),
                "—" if chosen is None else f"{chosen.end_val_loss:.4f}",
                "—" if chosen is None else f"{chosen.cross_boundary_bytes / 1e6:.3f}",
            )
        )
    pilot = contest.spec.pilot
    note = (
        f"Pilot budget per strategy: up to {contest.trials} trials x {pilot.tokens} tokens "
        f"({pilot.search} search, seed {pilot.seed}; pilot runs with seed {contest.pilot_seed}). "
        f"Selection: {SELECTION_RULE}; tie_tolerance {pilot.tie_tolerance:g}."
    )
    return TextTable(
        "Tuning: pilots and chosen settings",
        ("strategy", "search space", "pilots", "chosen settings", "pilot loss", "pilot MB"),
        rows,
        note,
    )


def final_row(run: FinalRun, run_dir: Path, target: float | None) -> dict[str, Any]:
    """One results.csv row: the run's identity, its settings and `run_outcome`'s columns."""
    return {
        "run_id": run.run_id,
        "strategy": run.strategy,
        "admissible": get_strategy(run.strategy).admissible,
        "budget": run.budget,
        "seed": run.seed,
        "settings": json.dumps(run.settings, sort_keys=True),
        **run_outcome(run_dir, target),
    }


def as_final(row: dict[str, Any]) -> Final:
    """The typed outcome of a results row."""
    ttt = row["time_to_target_s"]
    return Final(
        strategy=row["strategy"],
        budget=row["budget"],
        seed=int(row["seed"]),
        end_val_loss=float(row["end_val_loss"]),
        cross_boundary_bytes=int(row["cross_boundary_bytes"]),
        outer_steps=int(row["outer_steps"]),
        tokens=int(row["tokens"]),
        virtual_time_s=float(row["virtual_time_s"]),
        time_to_target_s=None if ttt in ("", None) else float(ttt),
        stop_reason=str(row["stop_reason"]),
    )


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write results.csv atomically."""
    columns = ["run_id", "strategy", "admissible", "budget", "seed", "settings", *METRICS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


def run_finals(
    contest: Contest, planned: list[FinalRun], out: Path, *, workers: int, progress: bool
) -> tuple[list[Final], Execution]:
    """Train the `planned` finals (`Contest.finals` of the chosen settings), skipping finished
    ones, and keep OUT/results.csv current; returns the outcomes of those that finished."""
    runs_dir = out / RUNS
    rows: dict[str, dict[str, Any]] = {}

    def refresh(_: Execution | None = None) -> None:
        for run in planned:
            if run.run_id not in rows and (runs_dir / run.run_id / "summary.json").is_file():
                rows[run.run_id] = final_row(run, runs_dir / run.run_id, contest.spec.target_loss)
        write_results(out / RESULTS, [rows[r.run_id] for r in planned if r.run_id in rows])

    done = execute(
        {r.run_id: r.config for r in planned}, runs_dir, workers=workers, progress=progress, on_finish=refresh
    )
    refresh()
    return [as_final(rows[r.run_id]) for r in planned if r.run_id in rows], done


def loss_curves(
    planned: list[FinalRun], out: Path
) -> dict[tuple[str, str], list[tuple[list[int], list[float]]]]:
    """(strategy, budget) -> each finished seed's (training tokens, validation loss) evaluations."""
    curves: dict[tuple[str, str], list[tuple[list[int], list[float]]]] = {}
    for run in planned:
        d = out / RUNS / run.run_id
        if (d / "summary.json").is_file():
            outer = load_run_dir(d).outer
            curves.setdefault((run.strategy, run.budget), []).append(
                ([r["tokens_total"] for r in outer], [r["val_loss"] for r in outer])
            )
    return curves
