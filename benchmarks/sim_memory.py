"""Simulation memory: peak RSS of a 2 x 3 and a 2 x 32 device run with LoRA on the tiny model.

In simulation all devices share one copy of the frozen weights, so a device costs only its
trainable vector, AdamW state and activations. Each size runs in a fresh process (so peak RSS is
its own); the larger must stay within 1.5x the smaller.

    .venv/bin/python benchmarks/sim_memory.py [--quick]      (--quick: 2 x 3 against 2 x 12)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from rich.console import Console
from rich.table import Table


def _child(devices_per_boundary: int) -> None:
    from echelon.config import RunConfig
    from echelon.runner import build_simulation, prepare

    boundaries = [
        {
            "id": f"b{b}",
            "devices": [
                {"id": f"b{b}d{i}", "tokens_per_s": 1000 + 37 * i} for i in range(devices_per_boundary)
            ],
        }
        for b in range(2)
    ]
    cfg = RunConfig.model_validate(
        {
            "name": "memory",
            "model": {"preset": "tiny", "trainable": "lora"},
            "data": {"seq_len": 128},
            "train": {"inner_steps": 2, "micro_batch": 8},
            "echelon": {"buffer_size": 4, "sync": {"interval": 4}},
            "boundaries": boundaries,
            # Every device completes at least two local rounds.
            "budget": {"tokens": 2 * 2 * 2 * devices_per_boundary * 2 * 8 * 128},
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
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 x 3 against 2 x 12 devices")
    args = parser.parse_args()
    rows = []
    for per_boundary in (3, 12 if args.quick else 32):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(per_boundary)],
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
