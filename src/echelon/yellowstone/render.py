"""Show a plan: rich text for the terminal (with --explain reasons) and a PNG topology diagram."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from echelon.yellowstone.plan import Plan, ReplicaPlan

SHOW_REPLICAS = 8
SHOW_BACKUPS = 12
GIB = 1024**3


def _gib(x: float) -> str:
    return f"{x / GIB:,.1f}"


def render_text(plan: Plan, console: Console, explain: bool = False) -> None:
    """Print clusters, layers, parallelism, heads, backups, predicted figures and checks."""
    m = plan.model
    console.print(
        f"[bold]plan[/] fleet {plan.fleet}, model {m.name} ({m.trainable}, {m.dtype}), {m.layers} layers, "
        f"seq_len {m.seq_len}, micro-batch {m.micro_batch} x {plan.settings.micro_batches} per step"
    )
    for b in plan.boundaries:
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
            console.print(f"  ... and {len(b.replicas) - SHOW_REPLICAS} more replicas (see plan.json)")
        console.print(f"  {b.id}: {len(b.replicas)} replica(s), {b.tokens_per_s:,.0f} tokens/s predicted")
        if b.standby:
            console.print(f"  standby: {', '.join(b.standby[:20])}{' ...' if len(b.standby) > 20 else ''}")
        bt = Table(title=f"backups in {b.id}", title_justify="left")
        for col in ("device", "if it fails", "tokens/s after"):
            bt.add_column(col)
        for x in b.backups[:SHOW_BACKUPS]:
            what = {
                "standby": f"standby {x.standby} takes its place",
                "shrink": f"{x.replica} continues without it (micro-batch re-split)",
                "replan": f"{x.replica} switches to its precomputed re-plan",
                "drop_replica": f"{x.replica} stops; its devices go to standby",
            }[x.kind]
            bt.add_row(x.device, what, f"{x.tokens_per_s_after:,.0f}")
        if len(b.backups) > SHOW_BACKUPS:
            bt.add_row(f"... {len(b.backups) - SHOW_BACKUPS} more", "", "")
        console.print(bt)
    console.print(f"[bold]total[/] {plan.tokens_per_s:,.0f} tokens/s predicted")
    for c in plan.checks:
        mark = "[green]ok[/]" if c.ok else "[red]FAILED[/]"
        console.print(f"  check {c.name}: {mark} - {c.detail}")
    if explain:
        console.print("[bold]why[/]")
        for line in plan.explain:
            console.print(f"  - {line}")


def _devices_text(names: list[str], limit: int = 3) -> str:
    shown = names[:limit]
    return "\n".join(shown) + (f"\n+{len(names) - limit} more" if len(names) > limit else "")


def render_png(plan: Plan, path: Path) -> None:
    """Draw boundaries (frames), replicas (rows), clusters (boxes, raw-data ones orange),
    pipeline edges (arrows labelled with link bandwidth) and standby devices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    rows: list[tuple[str, ReplicaPlan | str]] = []
    for b in plan.boundaries:
        rows.append(("title", f"boundary {b.id} (data tier {b.data_tier}): {b.tokens_per_s:,.0f} tokens/s"))
        rows += [("replica", r) for r in b.replicas[:SHOW_REPLICAS]]
        extra = (
            f"... {len(b.replicas) - SHOW_REPLICAS} more replicas; "
            if len(b.replicas) > SHOW_REPLICAS
            else ""
        )
        if b.standby or extra:
            rows.append(("note", f"{extra}standby: {', '.join(b.standby[:12]) or 'none'}"))
    width = max([len(r.clusters) for kind, r in rows if kind == "replica"] or [1])
    heights = [1.9 if kind == "replica" else 0.5 for kind, _ in rows]
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
            continue
        if kind == "note":
            ax.text(0.3, y + 0.2, item, fontsize=8, color="0.3")
            continue
        r = item
        ax.text(
            0.1,
            y + 0.9,
            f"{r.id.rsplit('/', 1)[-1]}\n{r.structure}\n{r.predicted.step_s:.2f} s/step",
            fontsize=8,
        )
        centers = []
        for k, c in enumerate(r.clusters):
            x = 1.5 + 3.0 * k
            box = FancyBboxPatch(
                (x, y + 0.15), 2.4, 1.55, boxstyle="round,pad=0.03",
                facecolor="#f6c28b" if c.raw_data else "#a9cce3", edgecolor="0.3",
            )  # fmt: skip
            ax.add_patch(box)
            stages = "; ".join(s.label for s in r.stages if s.cluster == c.id)
            ax.text(
                x + 0.08, y + 1.62, f"{c.id.rsplit('/', 1)[-1]} @ {c.site} - {c.parallelism}\n{stages}",
                fontsize=6.5, va="top", weight="bold",
            )  # fmt: skip
            ax.text(x + 0.08, y + 1.05, _devices_text(c.devices), fontsize=6.5, va="top")
            centers.append(x)
        for e in r.edges:
            a = next(i for i, c in enumerate(r.clusters) if c.id == r.stages[e.src_stage].cluster)
            b2 = next(i for i, c in enumerate(r.clusters) if c.id == r.stages[e.dst_stage].cluster)
            if b2 > a:
                ax.annotate(
                    "", (centers[b2], y + 0.9), (centers[a] + 2.4, y + 0.9), arrowprops={"arrowstyle": "->"}
                )
                ax.text(
                    (centers[a] + 2.4 + centers[b2]) / 2,
                    y + 0.97,
                    f"{e.bandwidth_gbps:g}G",
                    fontsize=6,
                    ha="center",
                )
            else:
                ax.annotate(
                    "", (centers[b2] + 1.2, y + 0.15), (centers[a] + 1.2, y + 0.15),
                    arrowprops={"arrowstyle": "->", "connectionstyle": "arc3,rad=0.15", "color": "0.4"},
                )  # fmt: skip
                ax.text((centers[a] + centers[b2]) / 2 + 1.2, y + 0.02, f"head back to c0 ({e.bandwidth_gbps:g}G)",
                        fontsize=6, ha="center", color="0.4")  # fmt: skip
    ax.set_title(
        f"{plan.fleet}: {plan.model.name} ({plan.model.trainable}), {plan.tokens_per_s:,.0f} tokens/s",
        fontsize=11,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
