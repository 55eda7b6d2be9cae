"""Simulation memory: peak RSS of a 2 x 3 and a 2 x 32 device run with LoRA on the tiny model.

In simulation all devices share one copy of the frozen weights, so a device costs only its
trainable vector, AdamW state and activations. Each size runs in a fresh process (so peak RSS is
its own); the larger must stay within 1.5x the smaller.

    .venv/bin/python benchmarks/sim_memory.py [--quick]   (--quick: 2 x 3 against 2 x 12, small)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from rich.console import Console
from rich.table import Table


def _child(devices_per_boundary: int, quick: bool) -> None:
    from echelon.assembly import prepare
    from echelon.config import RunConfig
    from echelon.runner import build_simulation

    boundaries = [
        {
            "id": f"b{b}",
            "devices": [
                {"id": f"b{b}d{i}", "tokens_per_s": 1000 + 37 * i} for i in range(devices_per_boundary)
            ],
        }
        for b in range(2)
    ]
    # Quick: short sequences, one step a round, about one round per device (a smoke run for CI).
    seq_len, steps, batch, rounds = (32, 1, 4, 1) if quick else (128, 2, 8, 4)
    cfg = RunConfig.model_validate(
        {
            "name": "memory",
            "model": {"preset": "tiny", "trainable": "lora"},
            "data": {"seq_len": seq_len, "max_documents": 300 if quick else None},
            "train": {"inner_steps": steps, "micro_batch": batch},
            "echelon": {"buffer_size": 4, "sync": {"interval": 4}},
            "boundaries": boundaries,
            # Every device completes `rounds` local rounds on average (at least two, full size).
            "budget": {"tokens": rounds * 2 * devices_per_boundary * steps * batch * seq_len},
        }
    )
    prep = prepare(cfg)
    sim = build_simulation(cfg, prep, lambda kind, fields: None)
    sim.run(cfg.budget)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "devices": 2 * devices_per_boundary,
                "peak_rss_mib": peak_kib / 1024,
                "tokens": sim.tokens,
                "trainable": prep.bundle.dim,
            }
        )
    )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(int(sys.argv[2]), sys.argv[3] == "quick")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 x 3 against 2 x 12 devices, 32-token sequences"
    )
    args = parser.parse_args()
    rows = []
    for per_boundary in (3, 12 if args.quick else 32):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(per_boundary), "quick" if args.quick else "full"],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = Table(title="simulation peak RSS, LoRA on the tiny model (fresh process per size)")
    for col in ("devices", "trainable params / device", "tokens trained", "peak RSS (MiB)", "ratio to 2 x 3"):
        table.add_column(col, justify="right")
    for r in rows:
        ratio = r["peak_rss_mib"] / rows[0]["peak_rss_mib"]
        table.add_row(
            f"2 x {r['devices'] // 2}",
            f"{r['trainable']:,}",
            f"{r['tokens']:,}",
            f"{r['peak_rss_mib']:.0f}",
            f"{ratio:.2f} (target <= 1.5)",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
