"""Privacy red-team (paper §8.6, Table 14) and the privacy ablation (in the spirit of Table 12).

The honest-but-curious global coordinator attacks what crossed to it (echelon.analysis.redteam:
difference of sums, membership churn, small cohort). Every run syncs after every middle step
(H = 1), so the coordinator sees each boundary's every aggregate: the worst case for privacy.
Boundaries of three devices of unequal, jittery speed with a short buffer timeout (so buffers
sometimes fire part-full) and half the devices cycling offline and back (churn).

1. Table 14 over boundaries b in {2, 3}, quorum q in {1, 2}, buffer 1 .. all (`boundary`), each
   without mitigations (no membership window, first come first served, exact counts) and with
   the metadata mitigations (the defaults: fixed-membership windows of 8 middle steps, shuffled
   participants, suppressed counts); at buffer = all, these rows have every mitigation on.
   Then the verdict: per vector, its success without mitigations (the worst row) and with all of
   them, against the chance level.
2. The privacy ablation on 2 boundaries, q 1, buffer 2: validation loss and virtual time to the
   token budget with no mitigation, each mitigation alone (buffer = boundary among them), and all
   of them, relative to none.

    .venv/bin/python benchmarks/redteam.py [--quick] [--workers N] [--out DIR]

--quick runs two cells on a small budget: b 2, q 1, buffer 2 without mitigations, and buffer = all
with all of them. The last line is the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from echelon.analysis.redteam import (
    RedTeamResult,
    attack,
    describe_mitigations,
    fmt,
    load_recordings,
    table14,
)
from echelon.analysis.sweep import apply_point, execute, run_id
from echelon.config import RunConfig
from echelon.strategies import effective_config

TOKENS = {"full": 16_000, "quick": 6_000}
NONE = {"membership_window": None, "shuffle": False, "status_counts": "exact"}
ALL = {"membership_window": 8, "shuffle": True, "status_counts": "suppressed"}
# The ablation: each mitigation alone, on top of none.
ABLATION = {
    "none": ({}, None),
    "fixed-membership windows": ({"membership_window": 8}, None),
    "shuffled participants": ({"shuffle": True}, None),
    "suppressed counts": ({"status_counts": "suppressed"}, None),
    "buffer = boundary": ({}, "boundary"),
    "all": (ALL, "boundary"),
}


def base_run(tokens: int) -> dict:
    speeds = [(2000, 30), (700, 30), (400, 30)]
    return {
        "name": "redteam",
        "strategy": "echelon",
        "model": {"preset": "tiny", "trainable": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {
            "source": "stdlib",
            "seq_len": 32,
            "max_documents": 60,
            "partition": {"kind": "dirichlet", "alpha": 0.3},
        },
        "train": {"inner_steps": 2, "micro_batch": 4, "lr": 0.003},
        # SecAgg+ stage deadlines on the run's own scale: with the default 30 s a device lost in
        # the middle of a round stalls its boundary for 30 s, ten runs' worth of virtual time.
        "echelon": {
            "buffer_timeout_s": 0.15,
            "secagg": {"stage_timeout_s": 1.0},
            "sync": {"interval": 1},
            "privacy": NONE,
        },
        # A run lasts a few virtual seconds (a local round ~0.1-0.4 s): churn on that scale.
        "churn": {"mean_uptime_s": 1.5, "mean_downtime_s": 0.5, "cycling_fraction": 0.5},
        "boundaries": [
            {
                "id": f"b{b}",
                "devices": [
                    {"id": f"d{b}{i}", "tokens_per_s": s, "speed_jitter_pct": j}
                    for i, (s, j) in enumerate(speeds)
                ],
            }
            for b in range(3)
        ],
        "budget": {"tokens": tokens},
        "eval": {"sequences": 16, "batch": 16},
    }


def cell(base: dict, boundaries: int, quorum: int, buffer: int | str, privacy: dict) -> RunConfig:
    point = {
        "echelon.min_quorum": quorum,
        "echelon.buffer_size": buffer,
        "echelon.privacy": {**NONE, **privacy},
    }
    run = apply_point(base, point)
    run["boundaries"] = run["boundaries"][:boundaries]
    return RunConfig.model_validate(run)


def grid(tokens: int, quick: bool) -> dict[str, RunConfig]:
    base = base_run(tokens)
    runs: dict[str, RunConfig] = {}
    if quick:
        runs["2b_q1_b2"] = cell(base, 2, 1, 2, NONE)
        runs["2b_q1_ball+m"] = cell(base, 2, 1, "boundary", ALL)
        return runs
    for b in (2, 3):
        for q in (1, 2):
            for buffer in (1, 2, "boundary"):
                if buffer != "boundary" and buffer < q:
                    continue
                label = f"{b}b_q{q}_b{'all' if buffer == 'boundary' else buffer}"
                runs[label] = cell(base, b, q, buffer, NONE)
                runs[label + "+m"] = cell(base, b, q, buffer, ALL)
    for name, (privacy, buffer) in ABLATION.items():
        runs[f"ablation: {name}"] = cell(base, 2, 1, buffer or 2, privacy)
    return runs


def ablation_table(summaries: dict[str, dict]) -> Table:
    table = Table(title="Privacy ablation (2 boundaries, q 1, buffer 2): cost of each mitigation")
    for col in ("mitigation", "val loss", "vs none", "virtual s", "vs none", "tokens/virtual s"):
        table.add_column(col, justify="left" if col == "mitigation" else "right")
    ref = summaries["ablation: none"]
    for name in ABLATION:
        s = summaries[f"ablation: {name}"]
        table.add_row(
            name,
            f"{s['end_val_loss']:.4f}",
            f"{100 * (s['end_val_loss'] - ref['end_val_loss']) / ref['end_val_loss']:+.2f}%",
            f"{s['virtual_time_s']:.1f}",
            f"{100 * (s['virtual_time_s'] - ref['virtual_time_s']) / ref['virtual_time_s']:+.1f}%",
            f"{s['tokens_per_virtual_s']:.0f}",
        )
    return table


TOLERANCE = 0.05  # a success rate this close to its chance level counts as at chance


def verdict_table(rows: list[tuple[str, RunConfig, RedTeamResult]]) -> Table:
    """Per vector: its worst success rate without mitigations, and its success with all of them
    (buffer = boundary, windows, shuffle, suppressed counts; the worst such row) against chance."""
    table = Table(title="Table 14, verdict: each attack with and without the mitigations")
    for col in ("vector", "none: worst run", "success", "chance", "all: worst run", "success", "chance", ""):
        table.add_column(col, justify="left" if col in ("vector", "") or "run" in col else "right")
    for vector in ("dos", "mc", "sc"):
        cells = [vector.upper()]
        for mitigations in ("none", "all"):
            chosen = [r for r in rows if describe_mitigations(r[1]) == mitigations]
            worst = max(chosen, key=lambda r: _excess(r[2], vector), default=None)
            stats = getattr(worst[2], vector) if worst else None
            cells += [worst[0], fmt(stats.success_rate), fmt(stats.chance)] if worst else ["—"] * 3
        at_chance = worst is not None and _excess(worst[2], vector) <= TOLERANCE
        cells.append("at chance" if at_chance else "ABOVE CHANCE")
        table.add_row(*cells)
    return table


def _excess(result: RedTeamResult, vector: str) -> float:
    """How far a vector's success rate lies above its chance level (-1: no opportunity)."""
    stats = getattr(result, vector)
    return -1.0 if stats.success_rate is None else stats.success_rate - stats.chance


def _row(result: RedTeamResult) -> dict:
    return {v: vars(getattr(result, v)) for v in ("dos", "mc", "sc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two cells on a small budget (under a minute)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (reused when run again)")
    args = parser.parse_args()
    runs = grid(TOKENS["quick" if args.quick else "full"], args.quick)
    ids = {label: run_id(cfg) for label, cfg in runs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.out or Path(tmp)
        outcome = execute(
            {ids[k]: cfg for k, cfg in runs.items()}, runs_dir, workers=args.workers, redteam=True
        )
        if outcome.failures:
            raise SystemExit(f"runs failed: {outcome.failures}")
        rows, summaries = [], {}
        for label, cfg in runs.items():
            summaries[label] = outcome.summaries[ids[label]]
            if label.startswith("ablation"):
                continue
            view, truth = load_recordings(runs_dir / ids[label])
            rows.append((label, effective_config(cfg), attack(effective_config(cfg), view, truth)))
    console = Console(width=max(Console().width, 240))
    console.print(table14(rows))
    console.print(verdict_table(rows))
    if not args.quick:
        console.print(ablation_table(summaries))
    print(json.dumps({label: _row(r) for label, _, r in rows}))


if __name__ == "__main__":
    main()
