"""The `echelon` command line. Each subcommand lives in its own module.

A command module provides `configure(parser)` to declare its arguments and `run(args) -> int`.
User errors (bad files, fields, flags) print one clear message and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from rich.console import Console
from rich.markup import escape

from echelon import __version__
from echelon.errors import UserError

DESCRIPTION = (
    "Echelon: boundary-first, auditable training across administrative boundaries, and "
    "Yellowstone, its topology compiler."
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# name -> (module, one-line help); modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("echelon.commands.train", "train a run file in simulation"),
    "demo": ("echelon.commands.demo", "train the built-in demo run"),
    "plan": ("echelon.yellowstone.cli_plan", "compile a fleet and a model into a training plan"),
    "execute": ("echelon.yellowstone.cli_execute", "run a plan on this machine with torch.distributed"),
    "profile": ("echelon.yellowstone.cli_profile", "measure this machine's devices as fleet entries"),
    "audit": ("echelon.audit.cli", "verify a run's audit logs offline"),
    "serve": ("echelon.commands.serve", "run one plane member (global, boundary or device) over gRPC"),
    "launch": ("echelon.commands.launch", "run a whole deployment as local processes over gRPC"),
    "certs": ("echelon.commands.certs", "create the deployment CA and per-party certificates"),
    "report": ("echelon.commands.report", "plots and a markdown summary of a run directory"),
    "sweep": ("echelon.commands.sweep", "run a grid of simulated runs in parallel, resumably"),
    "law": ("echelon.commands.law", "fit the effective-divergence law to sweep results"),
    "contest": (
        "echelon.commands.contest",
        "tune every strategy with pilots, then run budget-matched finals",
    ),
    "redteam": ("echelon.commands.redteam", "attack a finished run from the global coordinator's seat"),
}


def _env_log_level() -> str:
    level = os.environ.get("ECHELON_LOG", "INFO").upper()
    return level if level in LOG_LEVELS else "INFO"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="echelon", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"echelon {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=_env_log_level(),
        help="how much the parties log (default: $ECHELON_LOG, else INFO); launched processes inherit it",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {
        name: sub.add_parser(name, help=help_, description=f"echelon {name}: {help_}.")
        for name, (_, help_) in COMMANDS.items()
    }
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, subparsers = build_parser()
    # Only the chosen command's module is imported (torch is slow to import).
    name = next((a for a in argv if a in COMMANDS), None)
    if name in COMMANDS:
        module = importlib.import_module(COMMANDS[name][0])
        module.configure(subparsers[name])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ["ECHELON_LOG"] = args.log_level  # `echelon serve`, and every process `launch` starts
    logging.getLogger("echelon").setLevel(args.log_level)
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        # soft_wrap: one logical line per line, so paths and field names stay copyable.
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        return e.exit_code
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
