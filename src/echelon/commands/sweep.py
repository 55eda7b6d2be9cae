"""`echelon sweep SWEEP.yaml`: a grid of simulated runs in parallel processes, resumable.

Each grid point trains into DIR/runs/<id>/ (id: a hash of the point's run config); rerunning
the same command after an interruption skips the finished runs. DIR/results.csv has one row per
grid point whose run finished. See `echelon.analysis.sweep` for the sweep file's fields.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from echelon.cliargs import MAX_THREADS, count, out_path

SHOWN_ROWS = 40


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", type=Path, help="sweep file (YAML): base, grid, optional target_loss")
    parser.add_argument(
        "--out",
        type=out_path(staged=False),
        default=None,
        help="sweep directory (default: sweeps/<file stem>)",
    )
    parser.add_argument(
        "--workers",
        type=count(MAX_THREADS),
        default=os.cpu_count() or 1,
        help="parallel run processes, one torch thread each (default: CPU count)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")


def run(args: argparse.Namespace) -> int:
    from echelon.analysis.sweep import RESULTS, load_sweep, run_sweep

    sweep, points = load_sweep(args.sweep_file)
    out = args.out or Path("sweeps") / args.sweep_file.stem
    outcome = run_sweep(points, out, sweep.target_loss, workers=args.workers, progress=not args.no_progress)
    console = Console()
    _print_results(console, out / RESULTS, list(sweep.grid))
    ran = len(outcome.summaries) - outcome.skipped
    console.print(
        f"{len(points)} grid points, {len({p.run_id for p in points})} runs: {ran} trained now, "
        f"{outcome.skipped} already finished, {len(outcome.failures)} failed",
        highlight=False,
    )
    for rid, error in outcome.failures.items():
        console.print(f"[red]failed[/] {rid}: {escape(error)}", highlight=False)
    console.print(f"results: {out / RESULTS}", highlight=False)
    return 1 if outcome.failures else 0


def _print_results(console: Console, path: Path, grid_cols: list[str]) -> None:
    import csv

    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    table = Table(title=f"{path} ({len(rows)} rows)")
    shown = [
        "run_id",
        *grid_cols,
        "end_val_loss",
        "time_to_target_s",
        "cross_boundary_bytes",
        "outer_steps",
        "b_eff",
    ]
    for col in shown:
        table.add_column(col, justify="left" if col in ("run_id", *grid_cols) else "right")
    for row in rows[:SHOWN_ROWS]:
        table.add_row(*(_fmt(row[c]) for c in shown))
    console.print(table)
    if len(rows) > SHOWN_ROWS:
        console.print(f"... {len(rows) - SHOWN_ROWS} more rows in {path}", highlight=False)


def _fmt(cell: str) -> str:
    try:
        value = float(cell)
    except ValueError:
        return cell
    return cell if value.is_integer() else f"{value:.4g}"
