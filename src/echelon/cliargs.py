"""argparse types shared by every command line (echelon's subcommands and Yellowstone's)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


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
