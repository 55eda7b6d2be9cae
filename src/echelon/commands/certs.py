"""`echelon certs init RUN.yaml --out DIR`: the deployment CA, one certificate per party, and the
pinned audit keys (DIR/audit-keys.json) an auditor verifies the run's logs against."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from rich.console import Console

from echelon.cliargs import out_path
from echelon.config import load_run
from echelon.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create the CA and the certificates of every party in a run file")
    init.add_argument(
        "run_file", type=Path, help="the run file whose boundaries and devices get certificates"
    )
    init.add_argument("--out", type=out_path(), required=True, help="directory to create (absent or empty)")


def run(args: argparse.Namespace) -> int:
    from echelon.audit.anchor import PINS_FILE

    cfg = load_run(args.run_file)
    parties = init_whole(args.out, cfg.certified_devices())
    Console().print(
        f"created a deployment CA and {len(parties)} party certificates in {args.out} "
        "(the CA key was discarded: no further certificate can be minted).\n"
        f"Give {args.out / PINS_FILE} to the auditor now: `echelon audit RUN --keys {PINS_FILE}` "
        "checks every log against these keys."
    )
    return 0


def init_whole(out: Path, boundaries: dict[str, list[str]]) -> list[str]:
    """`init_certs` into `<out>.partial`, renamed to `out` only once complete: `out` is never left
    half made. UserError when `out` exists and is not an empty directory. Returns the parties."""
    from echelon.runtime.grpc.tls import init_certs

    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory; choose another directory")
        if out.is_dir() and any(out.iterdir()):
            raise UserError(
                f"--out {out} exists and is not empty (certificates already, or what an interrupted "
                "`certs init` left?); remove it or choose another directory"
            )
    except OSError as e:
        raise UserError(f"--out {out}: cannot look into it ({e.strerror})") from None
    staging = out.with_name(out.name + ".partial")
    # What a killed `certs init` left: incomplete keys nobody was given, so it is replaced.
    shutil.rmtree(staging, ignore_errors=True)
    try:
        parties = init_certs(staging, boundaries)
        os.replace(staging, out)  # an empty `out` directory is replaced as a whole
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write certificates in {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return parties
