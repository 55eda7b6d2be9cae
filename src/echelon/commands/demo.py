"""`echelon demo`: the built-in demo run (two boundaries of three devices, 20 ms WAN, non-IID)."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from echelon.commands.train import add_run_options, train_file


def demo_file() -> Path:
    return Path(str(resources.files("echelon") / "presets" / "demo.yaml"))


def configure(parser: argparse.ArgumentParser) -> None:
    add_run_options(parser)


def run(args: argparse.Namespace) -> int:
    return train_file(demo_file(), args)
