"""`echelon train RUN.yaml`: train a run file in simulation and write its run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from echelon.cliargs import out_path
from echelon.config import RunConfig, load_run


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_file", type=Path, help="run file (YAML); see examples/")
    add_run_options(parser)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=out_path(), default=None, help="run directory (default: runs/<name>)")
    parser.add_argument("--force", action="store_true", help="replace an existing run directory")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to <out>/tb (the run file's metrics.tensorboard)",
    )


def with_options(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """The run file's configuration with the command line's overrides."""
    if args.tensorboard:
        return cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"tensorboard": True})})
    return cfg


def run(args: argparse.Namespace) -> int:
    return train_file(args.run_file, args)


def train_file(path: Path, args: argparse.Namespace) -> int:
    from echelon.preflight import preflight
    from echelon.runner import train

    cfg = with_options(load_run(path), args)
    out = args.out or Path("runs") / cfg.name
    preflight(cfg, path, out, deploy=False)
    summary = train(cfg, out, force=args.force, progress=not args.no_progress)
    print_summary(summary, out)
    return 0


def print_summary(s: dict, out: Path) -> None:
    console = Console()
    t = Table(title=f"run {s['name']}", show_header=False)
    t.add_row("validation loss", f"{s['start_val_loss']:.4f} -> {s['end_val_loss']:.4f}")
    t.add_row("tokens", f"{s['tokens']:,}")
    t.add_row("outer steps", f"{s['outer_steps']} (stopped by {s['stop_reason']})")
    t.add_row("middle steps", ", ".join(f"{b}: {n}" for b, n in s["middle_steps"].items()))
    # A deployment's clock is the wall clock since the global plane started.
    clock = "elapsed time (since the global plane started)" if s["runtime"] == "grpc" else "virtual time"
    t.add_row(clock, f"{s['virtual_time_s']:.1f} s")
    t.add_row("wall time", f"{s['wall_time_s']:.1f} s")
    console.print(t)
    b = Table(title="bytes by message type")
    b.add_column("message type")
    b.add_column("channel")
    b.add_column("bytes", justify="right")
    for name, n in s["cross_boundary_bytes"].items():
        b.add_row(name, "cross-boundary", f"{n:,}")
    for name, n in s["intra_boundary_bytes"].items():
        b.add_row(name, "inside boundary", f"{n:,}")
    console.print(b)
    console.print(f"run directory: {out}")
