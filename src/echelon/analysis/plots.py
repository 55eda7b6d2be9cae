"""PNG plots of one run (and of a sweep's results). Figures are drawn with matplotlib's object API
on the Agg canvas.

No pyplot: nothing global is touched, so plotting is safe in worker processes and tests.
"""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from echelon.analysis.rundata import RunData

DPI = 120


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)


def _short(boundary: str) -> str:
    """`boundary/b0` -> `b0` for legends."""
    return boundary.split("/", 1)[-1]


def plot_loss(run: RunData, path: Path, target: float | None = None) -> None:
    """Validation loss against training tokens (left) and against virtual time (right)."""
    tokens = [r["tokens_total"] for r in run.outer]
    times = [r["time"] for r in run.outer]
    loss = [r["val_loss"] for r in run.outer]
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    left.plot(tokens, loss, marker="o", markersize=3)
    left.set_xlabel("training tokens")
    left.set_ylabel("validation loss")
    right.plot(times, loss, marker="o", markersize=3)
    right.set_xlabel("virtual time (s)")
    for ax in (left, right):
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
            ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.summary['name']} ({run.summary['strategy']}): validation loss")
    _save(fig, path)


def plot_controller(run: RunData, path: Path) -> None:
    """Controller trace per tick: drift proxy D_b, scheduled interval H_b per boundary, cadence H.

    Markers on H are coloured by the driving boundary (the one whose H_b set the cadence).
    """
    ticks = [r["tick"] for r in run.controller]
    boundaries = sorted({b for r in run.controller for b in r["drift"]})
    fig = Figure(figsize=(9, 7), layout="constrained")
    ax_d, ax_hb, ax_h = fig.subplots(3, 1, sharex=True)
    colours = {b: f"C{i % 10}" for i, b in enumerate(boundaries)}
    for b in boundaries:
        pts = [(r["tick"], r["drift"][b]) for r in run.controller if b in r["drift"]]
        ax_d.plot(*zip(*pts, strict=True), color=colours[b], label=_short(b))
        sched = [(r["tick"], r["scheduled"][b]) for r in run.controller if b in r.get("scheduled", {})]
        if sched:
            ax_hb.step(*zip(*sched, strict=True), where="post", color=colours[b], label=_short(b))
    ax_h.step(ticks, [r["interval"] for r in run.controller], where="post", color="black", linewidth=1)
    for b in boundaries:
        pts = [(r["tick"], r["interval"]) for r in run.controller if r.get("driver") == b]
        if pts:
            ax_h.scatter(*zip(*pts, strict=True), s=12, color=colours[b], label=f"driver {_short(b)}")
    ax_d.set_ylabel("drift proxy D_b")
    ax_hb.set_ylabel("scheduled H_b")
    ax_h.set_ylabel("cadence H = min H_b")
    ax_h.set_xlabel("controller tick")
    for ax in (ax_d, ax_hb, ax_h):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"{run.summary['name']}: controller trace")
    _save(fig, path)


def plot_bytes(run: RunData, trace: dict[str, list[tuple[float, int]]], path: Path) -> None:
    """Cross-boundary bytes: cumulative per message type over virtual time, and per-type totals.

    The per-type curves come from the audit logs (`trace`); the black line is the cumulative total
    the run recorded at each outer step (metrics.jsonl), so the two views cross-check each other.
    """
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    over_time, totals = fig.subplots(1, 2, width_ratios=(3, 2))
    for name, events in trace.items():
        times = [0.0, *(t for t, _ in events)]
        cumulative = [0, *accumulate(n for _, n in events)]
        over_time.step(times, cumulative, where="post", label=name.rsplit(".", 1)[-1])
    over_time.plot(
        [r["time"] for r in run.outer],
        [r["cross_boundary_bytes"] for r in run.outer],
        color="black",
        marker="o",
        markersize=3,
        linewidth=1,
        label="total at outer steps",
    )
    over_time.set_xlabel("virtual time (s)")
    over_time.set_ylabel("cumulative cross-boundary bytes")
    over_time.grid(alpha=0.3)
    over_time.legend(fontsize="small")
    per_type = sorted(run.summary["cross_boundary_bytes"].items(), key=lambda kv: kv[1])
    totals.barh([k.rsplit(".", 1)[-1] for k, _ in per_type], [v for _, v in per_type])
    totals.set_xscale("symlog")
    totals.set_xlabel("bytes (run total)")
    totals.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{run.summary['name']}: cross-boundary bytes by message type")
    _save(fig, path)


def plot_law(b_norm: list[float], gap: list[float], a: float, alpha: float, path: Path) -> None:
    """The rows on log-log axes (B~, dL) with the fitted law dL = a * B~^alpha."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(b_norm, gap, s=16, label="runs")
    lo, hi = min(b_norm), max(b_norm)
    xs = [lo * (hi / lo) ** (i / 99) for i in range(100)]
    ax.plot(xs, [a * x**alpha for x in xs], color="black", label=f"dL = {a:.3g} B~^{alpha:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("normalised effective divergence B~")
    ax.set_ylabel("loss gap dL")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, path)


def plot_footprint(rows: list[dict], path: Path) -> None:
    """Paper Table 7 as a figure: validation loss (left) and measured compute tokens/s (right)
    against the trainable parameters, one point per LoRA configuration (`label`, `trainable`,
    `loss`, `tokens_per_s` per row)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True)
    for ax, key, label in (
        (left, "loss", "validation loss"),
        (right, "tokens_per_s", "compute tokens per CPU second"),
    ):
        ax.plot([r["trainable"] for r in rows], [r[key] for r in rows], "o")
        for r in rows:
            ax.annotate(
                r["label"], (r["trainable"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Trainable footprint: quality against throughput (cf. paper Table 7)")
    _save(fig, path)
