"""`echelon audit RUN`: verify a run's audit logs offline; exit 0 only when everything holds."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from echelon.audit.render import render
from echelon.audit.report import CRASH, IN_FLIGHT, UNANCHORED
from echelon.audit.verify import verify_run


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Re-verify every party's hash chain and checkpoint signatures, every record's schema, the "
        "parties against RUN/config.yaml, that each message's sender and receiver recorded it alike, "
        "and every chain head a peer countersigned. Exit 0 when all holds and no per-device payload "
        "crossed, 1 otherwise."
    )
    parser.add_argument("run", type=Path, help="run directory (holding audit/ and config.yaml)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument(
        "--keys",
        type=Path,
        metavar="PINS",
        help="the audit-keys.json written by `echelon certs init` (or a directory holding it, or one of "
        "trusted <party>.pub.pem): the keys the logs must be signed with",
    )
    parser.add_argument(
        "--trust-run-keys",
        action="store_true",
        help="accept the public keys in RUN/audit without pins (the audit then shows the logs agree "
        "with each other, not who wrote them)",
    )
    parser.add_argument(
        "--accept-crashes",
        action="store_true",
        help="accept logs reopened after a crash (failures otherwise)",
    )
    parser.add_argument(
        "--accept-in-flight",
        action="store_true",
        help="accept messages one end recorded and the other lost in a crash (failures otherwise)",
    )


def run(args: argparse.Namespace) -> int:
    accept = {UNANCHORED: args.trust_run_keys, CRASH: args.accept_crashes, IN_FLIGHT: args.accept_in_flight}
    report = verify_run(args.run, args.keys, frozenset(k for k, v in accept.items() if v))
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    else:
        render(report, Console(highlight=False))
    return 0 if report.ok else 1
