"""The markdown summary of one run (report.md), linking the plots written beside it."""

from __future__ import annotations

from collections import Counter

from echelon.analysis.rundata import RunData, time_to_target, tokens_to_target


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _settings(cfg: dict) -> list[tuple[str, str]]:
    """A few run-file settings that explain the numbers (absent keys are left out)."""
    rows = []
    boundaries = cfg.get("boundaries") or []
    if boundaries:
        devices = sum(len(b.get("devices", [])) for b in boundaries)
        rows.append(("boundaries / devices", f"{len(boundaries)} / {devices}"))
    wan = (cfg.get("network") or {}).get("wan") or {}
    if wan:
        rows.append(("WAN latency, jitter", f"{wan.get('latency_ms')} ms, +/- {wan.get('jitter_pct')} %"))
    part = (cfg.get("data") or {}).get("partition") or {}
    if part:
        kind = part.get("kind")
        rows.append(
            ("data partition", f"dirichlet alpha {part.get('alpha')}" if kind == "dirichlet" else kind)
        )
    if "seed" in cfg:
        rows.append(("seed", str(cfg["seed"])))
    return rows


def render(
    run: RunData, trace: dict[str, list[tuple[float, int]]], images: dict[str, str], target: float | None
) -> str:
    """report.md for `run`. `images` maps section (loss, controller, bytes) -> PNG file name."""
    s = run.summary
    start, end = s["start_val_loss"], s["end_val_loss"]
    best = min(run.outer, key=lambda r: r["val_loss"])
    out = [f"# Run report: {s['name']}", ""]
    out += [
        f"Strategy **{s['strategy']}**"
        + (", admissible under the information-flow contract" if s.get("admissible") else "")
        + f"; stopped by `{s.get('stop_reason')}`.",
        "",
    ]
    rows = [
        (
            "validation loss",
            f"{start:.4f} -> {end:.4f} ({end - start:+.4f}, {100 * (end - start) / start:+.2f} %)",
        ),
        ("best validation loss", f"{best['val_loss']:.4f} at outer step {best.get('outer_step')}"),
        ("tokens", f"{s['tokens']:,}"),
        ("outer steps (syncs)", str(s["outer_steps"])),
    ]
    if s.get("middle_steps"):
        rows.append(("middle steps", ", ".join(f"{b}: {n}" for b, n in s["middle_steps"].items())))
    rows.append(("virtual time", f"{s['virtual_time_s']:.2f} s ({s['virtual_time_s'] / 60:.2f} min)"))
    if "wall_time_s" in s:
        rows.append(("wall time", f"{s['wall_time_s']:.1f} s"))
    if "b_eff" in s:
        rows.append(("B_eff (effective divergence budget)", f"{s['b_eff']:.6g}"))
    if "partition_skew" in s:
        rows.append(("partition skew", f"{s['partition_skew']:.4f}"))
    if target is not None:
        t, n = time_to_target(run.outer, target), tokens_to_target(run.outer, target)
        reached = "not reached" if t is None else f"{t:.2f} s virtual, {n:,} tokens"
        rows.append((f"time to target loss {target:g}", reached))
    rows += _settings(run.config)
    out += [*_table(("", ""), rows), ""]

    out += ["## Validation loss", "", f"![validation loss]({images['loss']})", ""]

    out += ["## Drift-aware controller", ""]
    if run.controller:
        intervals = [r["interval"] for r in run.controller]
        drivers = Counter(r.get("driver") for r in run.controller if r.get("driver"))
        share = ", ".join(f"{b}: {100 * n / len(run.controller):.0f} %" for b, n in drivers.most_common())
        out += [
            f"{len(run.controller)} controller ticks; cadence H from {min(intervals)} to {max(intervals)} "
            f"middle steps, {intervals[-1]} at the last tick. Driving boundary (share of ticks): {share}.",
            "",
        ]
        last = run.controller[-1]
        out += _table(
            ("boundary", "last D_b", "last H_b"),
            [
                (b, f"{d:.4g}", str(last.get("scheduled", {}).get(b, "")))
                for b, d in sorted(last["drift"].items())
            ],
        )
        out += ["", f"![controller trace]({images['controller']})", ""]
    else:
        out += ["No controller ticks were recorded for this run.", ""]

    out += ["## Cross-boundary bytes", ""]
    per_type = s["cross_boundary_bytes"]
    total = run.cross_boundary_total
    rows = [
        (name, f"{n:,}", f"{100 * n / total:.1f} %" if total else "")
        for name, n in sorted(per_type.items(), key=lambda kv: -kv[1])
    ]
    rows.append(("**total**", f"**{total:,}**", ""))
    out += _table(("message type", "bytes", "share"), rows)
    intra = sum(s.get("intra_boundary_bytes", {}).values())
    out += ["", f"Inside boundaries (never crossing): {intra:,} bytes."]
    if trace:
        audited = sum(n for events in trace.values() for _, n in events)
        check = "match" if audited == total else f"differ by {audited - total:+,} bytes"
        out += [f"The audit logs' sent records total {audited:,} bytes: they {check} the run summary."]
    out += ["", f"![cross-boundary bytes]({images['bytes']})", ""]
    return "\n".join(out)
