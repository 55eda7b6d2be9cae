"""`echelon contest CONTEST.yaml`: the budget-matched contest of strategies.

Every strategy is tuned with the same pilot budget, then its chosen settings run at each budget
with several seeds; the command prints the tuning table, Tables 5, 6 and 10 (the paper's numbering)
and the table relative to the reference strategy, and writes
OUT/tuning.json, OUT/results.csv, OUT/tables.md and OUT/plots/. Rerunning resumes: finished runs
are skipped. See `echelon.contest` and docs/contest.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from echelon.cliargs import MAX_THREADS, count, out_path

WIDE = 160


def configure(parser: argparse.ArgumentParser) -> None:
    contest = parser
    contest.add_argument("contest_file", type=Path, help="contest file (YAML), see docs/contest.md")
    contest.add_argument(
        "--out",
        type=out_path(staged=False),
        default=None,
        help="output directory (default: contests/<file stem>[-quick])",
    )
    contest.add_argument(
        "--workers",
        type=count(MAX_THREADS),
        default=os.cpu_count() or 1,
        help="parallel run processes, one torch thread each (default: CPU count)",
    )
    contest.add_argument(
        "--quick",
        action="store_true",
        help="at most 2 seeds and 2 pilot trials per strategy (a smoke test of the whole protocol)",
    )
    contest.add_argument("--no-progress", action="store_true", help="no live progress bars")


def run(args: argparse.Namespace) -> int:
    from echelon.contest.protocol import RESULTS, TABLES, TUNING, run_finals, run_pilots
    from echelon.contest.report import write_report
    from echelon.contest.spec import load_contest
    from echelon.contest.tables import to_rich

    start = time.perf_counter()
    contest = load_contest(args.contest_file, quick=args.quick)
    out = args.out or Path("contests") / (args.contest_file.stem + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    # Piped or redirected output gets room for the tables rather than rich's default 80 columns.
    console = Console(width=None if sys.stdout.isatty() else WIDE)
    progress = not args.no_progress
    pilots = sum(len(t) for t in contest.pilots.values())
    console.print(
        f"pilots: {pilots} runs ({len(contest.strategies)} strategies, up to {contest.trials} trials of "
        f"{contest.spec.pilot.tokens} tokens each)",
        highlight=False,
    )
    tuning, pilot_runs = run_pilots(contest, out, workers=args.workers, progress=progress)
    planned = contest.finals({s: r.trial.settings for s, r in tuning.chosen.items()})
    console.print(
        f"finals: {len(planned)} runs ({len(tuning.chosen)} strategies x {len(contest.comparisons())} "
        f"budget comparisons x {len(contest.seeds)} seeds)",
        highlight=False,
    )
    finals, final_runs = run_finals(contest, planned, out, workers=args.workers, progress=progress)
    command = shlex.join(
        ["echelon", "contest", str(args.contest_file), "--out", str(out)]
        + (["--quick"] if args.quick else [])
    )
    report = write_report(contest, tuning, planned, finals, out, command)
    for table in report.tables:
        console.print(to_rich(table))
    failures = {**pilot_runs.failures, **final_runs.failures}
    trained = sum(len(e.summaries) - e.skipped for e in (pilot_runs, final_runs))
    skipped = pilot_runs.skipped + final_runs.skipped
    console.print(
        f"{trained} runs trained now, {skipped} already finished, {len(failures)} failed; "
        f"wall time {time.perf_counter() - start:.0f} s with {args.workers} workers",
        highlight=False,
    )
    for rid, error in failures.items():
        console.print(f"[red]failed[/] {rid}: {escape(error)}", highlight=False)
    for name in (TUNING, RESULTS, TABLES):
        console.print(f"{name}: {out / name}", highlight=False)
    for path in report.plots:
        console.print(f"plot: {path}", highlight=False)
    return 1 if failures else 0
