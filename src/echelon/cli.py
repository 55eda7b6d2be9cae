"""The `echelon` command line. Each subcommand lives in its own module.

A command module provides `configure(parser)` to declare its arguments and `run(args) -> int`.
User errors (bad files, fields, flags) print one clear message and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rich.console import Console
from rich.markup import escape

from echelon.errors import UserError

# name -> (module, one-line help); modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("echelon.commands.train", "train a run file in simulation"),
    "demo": ("echelon.commands.demo", "train the built-in demo run"),
    "plan": ("echelon.yellowstone.cli_plan", "compile a fleet and a model into a training plan"),
    "profile": ("echelon.yellowstone.cli_profile", "measure this machine's devices as fleet entries"),
    "audit": ("echelon.audit.cli", "verify a run's audit logs offline"),
    "serve": ("echelon.commands.serve", "run one plane member (global, boundary or device) over gRPC"),
    "launch": ("echelon.commands.launch", "run a whole deployment as local processes over gRPC"),
    "certs": ("echelon.commands.certs", "create the deployment CA and per-party certificates"),
    "report": ("echelon.commands.report", "plots and a markdown summary of a run directory"),
    "sweep": ("echelon.commands.sweep", "run a grid of simulated runs in parallel, resumably"),
    "law": ("echelon.commands.law", "fit the effective-divergence law to sweep results"),
    "redteam": ("echelon.commands.redteam", "attack a finished run from the global coordinator's seat"),
    "bench": ("echelon.commands.bench", "run the budget-matched contest of strategies (bench contest FILE)"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="echelon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {name: sub.add_parser(name, help=help_) for name, (_, help_) in COMMANDS.items()}
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, subparsers = build_parser()
    # Only the chosen command's module is imported (torch is slow to import).
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in COMMANDS:
        module = importlib.import_module(COMMANDS[name][0])
        module.configure(subparsers[name])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
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
