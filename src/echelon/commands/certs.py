"""`echelon certs init RUN.yaml --out DIR`: the deployment CA, one certificate per party, and the
pinned audit keys (DIR/audit-keys.json) an auditor verifies the run's logs against."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from echelon.config import load_run


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create the CA and the certificates of every party in a run file")
    init.add_argument(
        "run_file", type=Path, help="the run file whose boundaries and devices get certificates"
    )
    init.add_argument("--out", type=Path, required=True, help="directory to create (must not hold a CA)")


def run(args: argparse.Namespace) -> int:
    from echelon.audit.anchor import PINS_FILE
    from echelon.runtime.grpc.tls import init_certs

    cfg = load_run(args.run_file)
    parties = init_certs(args.out, cfg.certified_devices())
    Console().print(
        f"created a deployment CA and {len(parties)} party certificates in {args.out} "
        "(the CA key was discarded: no further certificate can be minted).\n"
        f"Give {args.out / PINS_FILE} to the auditor now: `echelon audit RUN --keys {PINS_FILE}` "
        "checks every log against these keys."
    )
    return 0
