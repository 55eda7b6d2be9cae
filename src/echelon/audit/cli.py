"""`echelon audit RUN`: verify a run's audit logs offline; exit 0 only when everything holds."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from echelon.audit.render import render
from echelon.audit.verify import verify_run


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Re-verify every party's hash chain and checkpoint signatures, every record's schema, and "
        "that each message's sender and receiver recorded it alike. Exit 0 when all holds and no "
        "per-device payload crossed, 1 otherwise."
    )
    parser.add_argument("run", type=Path, help="run directory (holding audit/)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="take each party's <party>.pub.pem from DIR (keys you trust) instead of RUN/audit",
    )


def run(args: argparse.Namespace) -> int:
    report = verify_run(args.run, args.keys)
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    else:
        render(report, Console(highlight=False))
    return 0 if report.ok else 1
