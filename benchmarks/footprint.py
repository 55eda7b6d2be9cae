"""Trainable footprint (paper Table 7): LoRA rank and target modules against validation loss and
measured tokens/s.

Runs the sweep examples/sweeps/footprint.yaml (the tiny model under Echelon, 20,000 tokens each),
prints Table 7 and plots it (`--plot`, default footprint.png in the current directory;
examples/sweeps/footprint.png is the committed result). Tokens/s is the real local-round compute
measured in each run, per CPU second (more trainable parameters: more adapter and optimizer work
per token; CPU time, so that other load on a shared machine does not count), not a configured
speed; the modelled fleet's virtual throughput is shown beside it.

    .venv/bin/python benchmarks/footprint.py [--quick] [--workers N] [--out DIR] [--plot PNG]

--quick runs the smallest and the largest footprint on half the tokens. The last line is the
table as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from echelon.analysis.plots import plot_footprint
from echelon.analysis.sweep import execute, load_sweep, run_id

SWEEP = Path(__file__).resolve().parent.parent / "examples" / "sweeps" / "footprint.yaml"
MODULES = {2: "q/v", 4: "all-attn", 7: "attn+MLP"}


def _label(values: dict) -> str:
    return f"{MODULES[len(values['model.lora.target_modules'])]} r{values['model.lora.r']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the smallest and largest footprints, half the tokens"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (reused when run again)")
    parser.add_argument("--plot", type=Path, default=Path("footprint.png"), help="the figure (PNG)")
    args = parser.parse_args()
    _, points = load_sweep(SWEEP)
    runs = {p.run_id: (p.values, p.config) for p in points}
    if args.quick:
        half = {"tokens": points[0].config.budget.tokens // 2}
        ends = [points[0], points[-1]]  # the smallest and the largest footprint
        runs = {}
        for p in ends:
            cfg = p.config.model_copy(update={"budget": p.config.budget.model_copy(update=half)})
            runs[run_id(cfg)] = (p.values, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.out or Path(tmp)
        outcome = execute({rid: cfg for rid, (_, cfg) in runs.items()}, runs_dir, workers=args.workers)
        if outcome.failures:
            raise SystemExit(f"runs failed: {outcome.failures}")
        rows = []
        for rid, (values, _) in runs.items():
            s = outcome.summaries[rid]
            rows.append(
                {
                    "label": _label(values),
                    "trainable": s["trainable_parameters"],
                    "loss": s["end_val_loss"],
                    "tokens_per_s": s["compute_tokens_per_s"],
                    "virtual_tokens_per_s": s["tokens_per_virtual_s"],
                }
            )
    rows.sort(key=lambda r: r["trainable"])
    table = Table(title="Table 7: trainable footprint (tiny model, Echelon)")
    for col in (
        "LoRA config",
        "trainable params",
        "val loss",
        "PPL",
        "compute tokens/CPU s",
        "tokens/virtual s",
    ):
        table.add_column(col, justify="left" if col == "LoRA config" else "right")
    for r in rows:
        table.add_row(
            r["label"],
            f"{r['trainable']:,}",
            f"{r['loss']:.4f}",
            f"{math.exp(r['loss']):.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['virtual_tokens_per_s']:,.0f}",
        )
    Console().print(table)
    plot_footprint(rows, args.plot)
    print(f"plot: {args.plot}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
