"""argparse types shared by every command line (echelon's subcommands and Yellowstone's)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

# The most torch threads a process may ask for: above the hardware threads of the largest hosts
# (dual-socket servers have a few hundred), so no real machine is refused, and a fixed number, so a
# command line valid on one host is valid on every host; torch itself overflows on values past a C int.
MAX_THREADS = 1024
# Limits of Linux and macOS filesystems (ext4, xfs, btrfs, APFS): bytes in one path component and
# in a whole path. A directory to create leaves room for the suffixes it is staged and replaced
# with (`.partial`, `.replaced`, `.<name>.tmp`).
NAME_MAX = 255
PATH_MAX = 4095
SUFFIX_ROOM = 16


def count(most: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number from 1 to `most` (None: no upper bound; larger values
    describe no real training run)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if most is None and value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
        if most is not None and not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"must be from 1 to {most:,}, got {value:,}")
        return value

    return parse


def out_path(staged: bool = True) -> Callable[[str], Path]:
    """argparse type: a path to write (--out, --run-dir): not empty, and short enough for the
    filesystem. `staged`: it is written beside itself under a suffixed name first (`<out>.partial`,
    `.<out>.tmp`), so it must end in a name (not `.`, `..` or `/`) that leaves room for the suffix."""
    room = SUFFIX_ROOM if staged else 0

    def parse(text: str) -> Path:
        if not text:
            raise argparse.ArgumentTypeError("the path is empty; give the path to write")
        path = Path(text)
        if staged and path.name in ("", ".", ".."):
            raise argparse.ArgumentTypeError(
                f"{text!r} does not end in a name; give the path to write, e.g. ./NAME"
            )
        full = os.path.abspath(path)
        *parents, last = Path(full).parts
        for part, most in [*((p, NAME_MAX) for p in parents), (last, NAME_MAX - room)]:
            size = len(os.fsencode(part))
            if size > most:
                raise argparse.ArgumentTypeError(
                    f"the name {part[:40]}... is too long ({size} bytes; at most {most} fit): shorten it"
                )
        size = len(os.fsencode(full)) + room
        if size > PATH_MAX:
            raise argparse.ArgumentTypeError(
                f"the path is too long ({size - room} bytes; at most {PATH_MAX - room} fit): shorten it"
            )
        return path

    return parse
