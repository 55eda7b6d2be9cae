"""`echelon demo [--deploy]`: the built-in demo run (two boundaries of three devices, 20 ms WAN,
non-IID), simulated, or deployed as local processes over gRPC with mutual TLS."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from echelon.cliargs import MAX_THREADS, count
from echelon.commands.train import add_run_options, train_file
from echelon.config import RunConfig


def demo_file() -> Path:
    return Path(str(resources.files("echelon") / "presets" / "demo.yaml"))


def demo_config(tokens: int, smoke: bool = False) -> RunConfig:
    """The demo run with a budget of `tokens`; `smoke`: its fleet and strategy on a small corpus,
    short sequences and rounds and a small evaluation, for benchmarks' quick modes (not figures)."""
    import yaml

    spec = yaml.safe_load(demo_file().read_text())
    spec["budget"] = {"tokens": tokens}
    if smoke:
        spec["data"] |= {"max_documents": 40, "seq_len": 32}
        spec["train"] |= {"inner_steps": 2, "micro_batch": 4}
        spec["eval"] = {"sequences": 8, "batch": 8}
    return RunConfig.model_validate(spec)


def configure(parser: argparse.ArgumentParser) -> None:
    add_run_options(parser)
    parser.add_argument(
        "--deploy",
        action="store_true",
        help="run it as a local deployment (processes over gRPC with mutual TLS) instead of simulating it",
    )
    parser.add_argument(
        "--threads", type=count(MAX_THREADS), default=1, help="torch threads per device process (--deploy)"
    )


def run(args: argparse.Namespace) -> int:
    if args.deploy:
        from echelon.commands.launch import launch_file

        return launch_file(demo_file(), args)
    return train_file(demo_file(), args)
