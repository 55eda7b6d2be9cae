"""A live progress bar for a run: its clock, tokens, outer steps, latest validation loss."""

from __future__ import annotations

from typing import Any, Literal

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from echelon.config import BudgetConfig


class RunProgress:
    """Tracks the budget that is expected to end the run (tokens, outer steps or virtual time).
    `clock` names the run's time: `virtual` (simulation) or `elapsed` (a deployment's wall clock)."""

    def __init__(
        self, budget: BudgetConfig, clock: Literal["virtual", "elapsed"], enabled: bool = True
    ) -> None:
        self._clock = clock
        if budget.tokens is not None:
            self._unit, self._total = "tokens", budget.tokens
        elif budget.outer_steps is not None:
            self._unit, self._total = "outer_steps", budget.outer_steps
        elif budget.virtual_seconds is not None:
            self._unit, self._total = "virtual_seconds", budget.virtual_seconds
        else:
            self._unit, self._total = "cross_boundary_bytes", None
        self._progress = Progress(
            TextColumn("[bold]echelon"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task("run", total=self._total, status="starting")

    def update(self, record: dict[str, Any]) -> None:
        """Show an outer step's metrics record."""
        now, tokens, outer_step = record["time"], record["tokens_total"], record["outer_step"]
        done = {"tokens": tokens, "outer_steps": outer_step, "virtual_seconds": now}.get(self._unit)
        status = (
            f"{self._clock} {now:7.1f} s | {tokens:>10,} tokens | outer {outer_step:3d} | "
            f"val loss {record['val_loss']:.4f}"
        )
        self._progress.update(self._task, completed=done, status=status)

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
