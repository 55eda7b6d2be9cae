"""`echelon report RUN`: PNG plots and a markdown summary of a run directory, in RUN/report/."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from echelon.cliargs import real


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", type=Path, help="run directory written by `echelon train` or `echelon sweep`"
    )
    parser.add_argument(
        "--target",
        type=real(0),
        default=None,
        metavar="LOSS",
        help="validation loss for time-to-target (adds it to the summary and the loss plot)",
    )


def run(args: argparse.Namespace) -> int:
    from echelon.analysis.report import write_report

    out = write_report(args.run_dir, args.target)
    console = Console()
    for f in sorted(out.iterdir()):
        console.print(f"wrote {f}", highlight=False)
    return 0
