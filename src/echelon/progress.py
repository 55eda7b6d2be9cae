"""A live progress bar for a run: virtual time, tokens, outer steps, latest validation loss."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from echelon.config import BudgetConfig


class RunProgress:
    """Tracks the budget that is expected to end the run (tokens, outer steps or virtual time)."""

    def __init__(self, budget: BudgetConfig, enabled: bool = True) -> None:
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

    def update(self, now: float, tokens: int, outer_step: int, val_loss: float) -> None:
        done = {"tokens": tokens, "outer_steps": outer_step, "virtual_seconds": now}.get(self._unit)
        status = (
            f"virtual {now:7.1f} s | {tokens:>10,} tokens | outer {outer_step:3d} | val loss {val_loss:.4f}"
        )
        self._progress.update(self._task, completed=done, status=status)

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
