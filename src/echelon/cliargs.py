"""argparse types shared by every command line (echelon's subcommands and Yellowstone's)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

# The most torch threads a process may ask for: above the hardware threads of the largest hosts
# (dual-socket servers have a few hundred), so no real machine is refused, and a fixed number, so a
# command line valid on one host is valid on every host; torch itself overflows on values past a C int.
MAX_THREADS = 1024
MAX_SEED = 2**63 - 1  # as a run file's `seed`: every generator (torch, numpy, random) takes it
# Limits of Linux and macOS filesystems (ext4, xfs, btrfs, APFS): bytes in one path component and
# in a whole path. A directory to create leaves room for the suffixes it is staged and replaced
# with (`.partial`, `.replaced`, `.<name>.tmp`).
NAME_MAX = 255
PATH_MAX = 4095
SUFFIX_ROOM = 16


def count(most: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number from 1 to `most` (None: no upper bound; larger values
    describe no real training run)."""
    return whole(1, most)


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number from `low` to `high` (None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if high is None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:,}, got {value:,}")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:,} to {high:,}, got {value:,}")
        return value

    return parse


def real(above: float, most: float = math.inf) -> Callable[[str], float]:
    """argparse type: a finite number greater than `above` and at most `most` (inf: no upper bound)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if not above < value <= most:
            bound = "" if math.isinf(most) else f" and at most {most:g}"
            raise argparse.ArgumentTypeError(f"must be greater than {above:g}{bound}, got {value:g}")
        return value

    return parse


def writable_path(text: str, staged: bool = True) -> Path:
    """`text` as a path to write: not empty, and short enough for the filesystem; ValueError saying
    what is wrong. `staged`: it is written beside itself under a suffixed name first
    (`<out>.partial`, `.<out>.tmp`), so it must end in a name (not `.`, `..` or `/`) that leaves
    room for the suffix."""
    room = SUFFIX_ROOM if staged else 0
    if not text:
        raise ValueError("the path is empty; give the path to write")
    path = Path(text)
    if staged and path.name in ("", ".", ".."):
        raise ValueError(f"{text!r} does not end in a name; give the path to write, e.g. ./NAME")
    full = os.path.abspath(path)
    *parents, last = Path(full).parts
    for part, most in [*((p, NAME_MAX) for p in parents), (last, NAME_MAX - room)]:
        size = len(os.fsencode(part))
        if size > most:
            raise ValueError(
                f"the name {part[:40]}... is too long ({size} bytes; at most {most} fit): shorten it"
            )
    size = len(os.fsencode(full)) + room
    if size > PATH_MAX:
        raise ValueError(
            f"the path is too long ({size - room} bytes; at most {PATH_MAX - room} fit): shorten it"
        )
    return path


def out_path(staged: bool = True) -> Callable[[str], Path]:
    """argparse type: a path to write (--out, --run-dir), as `writable_path` takes it."""

    def parse(text: str) -> Path:
        try:
            return writable_path(text, staged)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse
