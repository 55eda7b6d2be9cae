"""Show a plan: rich text for the terminal (with --explain reasons) and a PNG topology diagram.

Both cap what they show on large fleets (replicas, devices per cluster, standby devices, backup
rows) and always say what they left out and where to find it (plan.json).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from echelon.yellowstone.plan import Backup, BoundaryPlan, Plan, ReplicaPlan

SHOW_REPLICAS = 8
SHOW_BACKUPS = 12
SHOW_STANDBY = 20
SHOW_DEVICES = 3  # per cluster box in the diagram
GIB = 1024**3


def _listed(names: list[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _what(x: Backup, sites: dict[str, str], splits: dict[str, list]) -> str:
    if x.kind == "drop_replica":
        return f"{x.replica} stops; its devices go to standby"
    assert x.replacement is not None
    same = [s.units for s in x.replacement.stages] == splits.get(x.replica)
    split = "same layer split" if same else "layers re-split"
    if x.kind == "standby":
        where = sites.get(x.standby or "", "")
        away = where and where != sites.get(x.device)
        return f"standby {x.standby}{f' (at {where})' if away else ''} takes its place ({split})"
    if x.kind == "shrink":
        return f"{x.replica} continues without it ({split})"
    return f"{x.replica} switches to its precomputed re-plan"


def _sites(b: BoundaryPlan) -> dict[str, str]:
    out = {}
    for r in [*b.replicas, *(x.replacement for x in b.backups if x.replacement is not None)]:
        for c in r.clusters:
            out.update(dict.fromkeys(c.devices, c.site))
    return out


def render_text(plan: Plan, console: Console, explain: bool = False) -> None:
    """Print clusters, layers, parallelism, heads, backups, predicted figures, refusals and checks."""
    m = plan.model
    console.print(
        f"[bold]plan[/] fleet {plan.fleet}, model {m.name} ({m.trainable}, {m.dtype}), {m.layers} layers, "
        f"seq_len {m.seq_len}, micro-batch {m.micro_batch} x {plan.settings.micro_batches} per step"
    )
    for b in plan.boundaries:
        _boundary_text(b, console)
    for refusal in plan.refused:
        console.print(
            f"[bold red]refused[/] boundary {refusal.boundary} ({refusal.reason}): {escape(refusal.message)}"
        )
    console.print(f"[bold]total[/] {plan.tokens_per_s:,.0f} tokens/s predicted")
    for c in plan.checks:
        mark = "[green]ok[/]" if c.ok else "[red]FAILED[/]"
        console.print(f"  check {c.name}: {mark} - {escape(c.detail)}")
    if explain:
        console.print("[bold]why[/]")
        for line in plan.explain:
            console.print(f"  - {escape(line)}")


def _boundary_text(b: BoundaryPlan, console: Console) -> None:
    t = Table(title=f"boundary {b.id} (data tier {b.data_tier})", title_justify="left")
    for col in (
        "replica",
        "cluster",
        "site",
        "devices (sequences per micro-batch)",
        "parallel",
        "head",
        "stages",
        "memory",
    ):
        t.add_column(col, overflow="fold")
    for r in b.replicas[:SHOW_REPLICAS]:
        for k, c in enumerate(r.clusters):
            stages = "; ".join(f"{s.index}: {s.label}" for s in r.stages if s.cluster == c.id)
            peak = max(c.memory_bytes[d] / c.capacity_bytes[d] for d in c.devices)
            devices = ", ".join(f"{d} ({s})" for d, s in zip(c.devices, c.shares, strict=True))
            raw = " [yellow]raw data[/]" if c.raw_data else ""
            t.add_row(
                f"{r.id} ({r.structure})" if k == 0 else "", c.id.rsplit("/", 1)[-1] + raw, c.site, devices,
                c.parallelism, c.head, stages, f"{peak:.0%}",
            )  # fmt: skip
        p = r.predicted
        t.add_row(
            "", "", "", f"[dim]step {p.step_s:.2f} s, {p.tokens_per_s:,.0f} tokens/s, bubble {p.bubble_fraction:.0%}[/]",
            "", "", "", "",
        )  # fmt: skip
    console.print(t)
    if len(b.replicas) > SHOW_REPLICAS:
        console.print(f"  not shown: {len(b.replicas) - SHOW_REPLICAS} more replicas (see plan.json)")
    console.print(f"  {b.id}: {len(b.replicas)} replica(s), {b.tokens_per_s:,.0f} tokens/s predicted")
    if b.standby:
        console.print(f"  standby ({len(b.standby)}): {_listed(b.standby, SHOW_STANDBY)}")
    sites = _sites(b)
    splits = {r.id: [s.units for s in r.stages] for r in b.replicas}
    bt = Table(title=f"backups in {b.id}", title_justify="left")
    for col in ("device", "if it fails", "tokens/s after", "if the standby is taken", "second failure"):
        bt.add_column(col, overflow="fold")
    for x in b.backups[:SHOW_BACKUPS]:
        fallback = "" if x.fallback is None else _what(x.fallback, sites, splits)
        second = f"{len(x.then)} covered" if x.then else ""
        bt.add_row(x.device, _what(x, sites, splits), f"{x.tokens_per_s_after:,.0f}", fallback, second)
    if len(b.backups) > SHOW_BACKUPS:
        bt.add_row(f"not shown: {len(b.backups) - SHOW_BACKUPS} more (see plan.json)", "", "", "", "")
    console.print(bt)


def left_out(plan: Plan) -> list[str]:
    """What the diagram does not draw, by boundary."""
    out = []
    for b in plan.boundaries:
        if len(b.replicas) > SHOW_REPLICAS:
            hidden = b.replicas[SHOW_REPLICAS:]
            out.append(f"{b.id}: {len(hidden)} replicas ({hidden[0].id} to {hidden[-1].id})")
        crowded = sum(
            max(len(c.devices) - SHOW_DEVICES, 0) for r in b.replicas[:SHOW_REPLICAS] for c in r.clusters
        )
        if crowded:
            out.append(f"{b.id}: {crowded} device names in crowded clusters (counted in their boxes)")
        if len(b.standby) > 12:
            out.append(f"{b.id}: {len(b.standby) - 12} standby names (counted)")
        if b.backups:
            out.append(f"{b.id}: {len(b.backups)} backup entries")
    return out


def render_png(plan: Plan, path: Path) -> None:
    """Draw boundaries (frames), replicas (rows), clusters (boxes, raw-data ones orange),
    pipeline edges (arrows labelled with bandwidth), the head's return to cluster 0 (routed in a
    lane under the boxes), standby devices, and a footer naming everything left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    rows: list[tuple[str, ReplicaPlan | str]] = []
    left_out: list[str] = []
    for b in plan.boundaries:
        rows.append(("title", f"boundary {b.id} (data tier {b.data_tier}): {b.tokens_per_s:,.0f} tokens/s"))
        rows += [("replica", r) for r in b.replicas[:SHOW_REPLICAS]]
        if len(b.replicas) > SHOW_REPLICAS:
            hidden = b.replicas[SHOW_REPLICAS:]
            left_out.append(f"{b.id}: {len(hidden)} replicas ({hidden[0].id} to {hidden[-1].id})")
        if b.standby:
            rows.append(("note", f"standby ({len(b.standby)}): {_listed(b.standby, 12)}"))
        crowded = sum(
            max(len(c.devices) - SHOW_DEVICES, 0) for r in b.replicas[:SHOW_REPLICAS] for c in r.clusters
        )
        if crowded:
            left_out.append(f"{b.id}: {crowded} devices in crowded clusters (counted in their boxes)")
        if b.backups:
            left_out.append(f"{b.id}: {len(b.backups)} backup entries")
    for refusal in plan.refused:
        rows.append(("title", f"boundary {refusal.boundary}: refused ({refusal.reason})"))
    if left_out:
        rows.append(("note", "not drawn (see plan.json): " + "; ".join(left_out)))
    width = max([len(r.clusters) for kind, r in rows if kind == "replica"] or [1])
    heights = [2.3 if kind == "replica" else 0.5 for kind, _ in rows]
    fig, ax = plt.subplots(figsize=(3.0 * width + 2.5, sum(heights) + 0.6))
    ax.set_xlim(0, 3.0 * width + 2.5)
    ax.set_ylim(-sum(heights) - 0.3, 0.3)
    ax.axis("off")
    y = 0.0
    for (kind, item), h in zip(rows, heights, strict=True):
        y -= h
        if kind == "title":
            ax.text(0.1, y + 0.2, item, fontsize=11, weight="bold")
            ax.axhline(y + 0.5, color="0.6", lw=0.8, ls="--")
        elif kind == "note":
            ax.text(0.3, y + 0.2, item, fontsize=8, color="0.3", wrap=True)
        else:
            _draw_replica(ax, item, y, FancyBboxPatch)
    ax.set_title(
        f"{plan.fleet}: {plan.model.name} ({plan.model.trainable}), {plan.tokens_per_s:,.0f} tokens/s",
        fontsize=11,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _draw_replica(ax, r: ReplicaPlan, y: float, box_type) -> None:
    """One replica row: boxes from y+0.55 to y+2.1; the lane under them (y+0.1 to y+0.5) carries
    the arrow from the head's stage back to cluster 0, so it crosses no box and no label."""
    top, bottom, lane = y + 2.1, y + 0.55, y + 0.32
    ax.text(
        0.1, y + 1.3, f"{r.id.rsplit('/', 1)[-1]}\n{r.structure}\n{r.predicted.step_s:.2f} s/step", fontsize=8
    )
    left = []
    for k, c in enumerate(r.clusters):
        x = 1.5 + 3.0 * k
        ax.add_patch(
            box_type(
                (x, bottom), 2.4, top - bottom, boxstyle="round,pad=0.03",
                facecolor="#f6c28b" if c.raw_data else "#a9cce3", edgecolor="0.3",
            )
        )  # fmt: skip
        stages = "; ".join(s.label for s in r.stages if s.cluster == c.id)
        ax.text(x + 0.08, top - 0.08, f"{c.id.rsplit('/', 1)[-1]} @ {c.site} - {c.parallelism}\n{stages}",
                fontsize=6.5, va="top", weight="bold")  # fmt: skip
        shown = c.devices[:SHOW_DEVICES]
        more = len(c.devices) - len(shown)
        text = "\n".join(shown) + (f"\n+{more} more" if more else "")
        ax.text(x + 0.08, top - 0.62, text, fontsize=6.5, va="top")
        left.append(x)
    index = {c.id: k for k, c in enumerate(r.clusters)}
    mid = (top + bottom) / 2
    for e in r.edges:
        a, b = index[r.stages[e.src_stage].cluster], index[r.stages[e.dst_stage].cluster]
        label = f"{e.bandwidth_gbps:g}G" + (f" via {len(e.route) - 2}" if len(e.route) > 2 else "")
        if b > a:
            ax.annotate("", (left[b], mid), (left[a] + 2.4, mid), arrowprops={"arrowstyle": "->"})
            ax.text((left[a] + 2.4 + left[b]) / 2, mid + 0.07, label, fontsize=6, ha="center")
        else:
            xa, xb = left[a] + 1.2, left[b] + 1.2
            ax.plot([xa, xa, xb], [bottom, lane, lane], color="0.4", lw=1)
            ax.annotate("", (xb, bottom), (xb, lane), arrowprops={"arrowstyle": "->", "color": "0.4"})
            ax.text(
                (xa + xb) / 2, lane - 0.18, f"head back to c0 ({label})", fontsize=6, ha="center", color="0.4"
            )
