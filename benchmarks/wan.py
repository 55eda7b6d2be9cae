"""WAN figures: time-to-target of Echelon-DA against fixed-H Echelon, and quality under stress.

Tiny model (LoRA), the built-in corpus, two boundaries of two devices, the same token budget for
every run (paper §8.2: Figure 3 and the stress table):

1. Time-to-target: virtual time (m:ss) until the global model's validation loss, evaluated at
   every outer step, first reaches the target, for Echelon-DA (drift-aware cadence, H_b in
   [2, 16]) and Echelon (fixed H = 4) at 5, 20 and 100 ms median WAN latency; the mean over
   seeds ("-" when a seed never reaches it), and the final validation loss beside it.
   The devices are fast (a local round lasts 0.1-0.3 virtual s) so that WAN latency is
   commensurate with compute, as on the paper's 1B model; hence seconds, not minutes.
2. Degradation: Echelon-DA's final validation loss under 200 ms WAN, severe non-IID data
   (Dirichlet alpha 0.1) and both together, relative to 0 ms with IID data (paper: at most 2.2%).

Runs go through `echelon.analysis.sweep.execute` (parallel spawned processes); with --out they
are kept there and a second invocation reuses them (e.g. to try another --target at once).

    .venv/bin/python benchmarks/wan.py [--quick] [--target 4.6] [--seeds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from echelon.analysis.rundata import RunData, load_run_dir, time_to_target
from echelon.analysis.sweep import apply_point, execute, run_id
from echelon.config import RunConfig

TARGET_LOSS = 4.6  # every setting and seed reaches it within the budget (the seeds differ in level)
TOKENS = {"full": 60_000, "quick": 2_000}  # quick: a smoke run of every setting (CI), not the figure
LATENCIES_MS = (5, 20, 100)
METHODS = (("echelon-da", "Echelon-DA"), ("echelon", "Echelon (fixed H)"))
IID = {"kind": "iid"}
SEVERE = {"kind": "dirichlet", "alpha": 0.1}
# label -> (WAN latency ms, partition); the first is the reference
TREATMENTS = {
    "0 ms, IID": (0, IID),
    "200 ms, IID": (200, IID),
    "0 ms, severe non-IID": (0, SEVERE),
    "200 ms, severe non-IID": (200, SEVERE),
}


def base_run(tokens: int) -> dict:
    """Two boundaries of two devices; LAN 0.2 ms; a 100 Mbit/s WAN whose latency the figures vary."""
    return {
        "name": "wan",
        "model": {"preset": "tiny", "trainable": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"source": "stdlib", "seq_len": 32, "max_documents": 80, "partition": IID},
        "train": {"inner_steps": 2, "micro_batch": 4, "lr": 0.003},
        "echelon": {
            "buffer_size": 2,
            "buffer_timeout_s": 5,
            "sync": {"interval": 4, "h_min": 2, "h_max": 16},
        },
        "network": {"wan": {"latency_ms": 20, "jitter_pct": 20, "bandwidth_mbps": 100}},
        "boundaries": [
            {"id": "b0", "devices": [{"id": "d0", "tokens_per_s": 2000}, {"id": "d1", "tokens_per_s": 1000}]},
            {"id": "b1", "devices": [{"id": "d2", "tokens_per_s": 1500}, {"id": "d3", "tokens_per_s": 800}]},
        ],
        "budget": {"tokens": tokens},
        "eval": {"sequences": 32, "batch": 16},
    }


def configs(tokens: int, seeds: int) -> dict[tuple, RunConfig]:
    """("ttt", strategy, latency, seed) and ("stress", treatment, seed) -> run config."""
    base = base_run(tokens)
    out: dict[tuple, RunConfig] = {}
    for seed in range(seeds):
        for strategy, _ in METHODS:
            for ms in LATENCIES_MS:
                point = {"strategy": strategy, "network.wan.latency_ms": ms, "seed": seed}
                out[("ttt", strategy, ms, seed)] = RunConfig.model_validate(apply_point(base, point))
        for label, (ms, partition) in TREATMENTS.items():
            point = {
                "strategy": "echelon-da",
                "network.wan.latency_ms": ms,
                "network.wan.jitter_pct": 20 if ms else 0,
                "data.partition": partition,
                "seed": seed,
            }
            out[("stress", label, seed)] = RunConfig.model_validate(apply_point(base, point))
    return out


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def _time_cell(times: list[float | None]) -> str:
    if any(t is None for t in times):
        return f"- ({sum(t is not None for t in times)}/{len(times)} reached)"
    spread = f" +/- {statistics.stdev(times):.1f} s" if len(times) > 1 else ""
    return _clock(statistics.fmean(times)) + spread


def time_table(data: dict[tuple, RunData], target: float, seeds: int, tokens: int) -> Table:
    table = Table(
        title=f"Time to validation loss {target:g}, virtual m:ss ({tokens:,} tokens, {seeds} seed(s))"
    )
    table.add_column("method")
    table.add_column("metric")
    for ms in LATENCIES_MS:
        table.add_column(f"{ms} ms", justify="right")
    for strategy, label in METHODS:
        runs = {ms: [data[("ttt", strategy, ms, s)] for s in range(seeds)] for ms in LATENCIES_MS}
        table.add_row(
            label,
            "time to target",
            *(_time_cell([time_to_target(r.outer, target) for r in runs[ms]]) for ms in LATENCIES_MS),
        )
        table.add_row(
            "",
            "final val loss",
            *(f"{statistics.fmean(r.summary['end_val_loss'] for r in runs[ms]):.4f}" for ms in LATENCIES_MS),
        )
        table.add_row(
            "",
            "outer steps",
            *(f"{statistics.fmean(r.summary['outer_steps'] for r in runs[ms]):.1f}" for ms in LATENCIES_MS),
            end_section=True,
        )
    return table


def stress_table(data: dict[tuple, RunData], seeds: int) -> Table:
    table = Table(
        title="Echelon-DA final validation loss under stress, relative to 0 ms IID (paper: <= 2.2%)"
    )
    for col in ("treatment", "val loss", "degradation", "outer steps", "virtual time"):
        table.add_column(col, justify="left" if col == "treatment" else "right")
    reference = None
    for label in TREATMENTS:
        runs = [data[("stress", label, s)] for s in range(seeds)]
        loss = statistics.fmean(r.summary["end_val_loss"] for r in runs)
        reference = loss if reference is None else reference
        table.add_row(
            label,
            f"{loss:.4f}",
            f"{100 * (loss - reference) / reference:+.2f}%",
            f"{statistics.fmean(r.summary['outer_steps'] for r in runs):.1f}",
            _clock(statistics.fmean(r.summary["virtual_time_s"] for r in runs)),
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, 2,000 tokens: every setting runs (CI)"
    )
    parser.add_argument("--target", type=float, default=TARGET_LOSS, help="validation loss to reach")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per setting (default 3; 1 with --quick)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (reused when run again)")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    tokens = TOKENS["quick" if args.quick else "full"]
    runs = configs(tokens, seeds)
    ids = {key: run_id(cfg) for key, cfg in runs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.out or Path(tmp)
        outcome = execute({ids[k]: cfg for k, cfg in runs.items()}, runs_dir, workers=args.workers)
        if outcome.failures:
            raise SystemExit(f"runs failed: {outcome.failures}")
        data = {key: load_run_dir(runs_dir / ids[key]) for key in runs}
    console = Console(width=max(Console().width, 110))
    console.print(time_table(data, args.target, seeds, tokens))
    console.print(stress_table(data, seeds))


if __name__ == "__main__":
    main()
