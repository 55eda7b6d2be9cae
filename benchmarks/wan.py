"""WAN figures: the paper's Table 9 / Figure 3 (Echelon-DA against DiLoCo+SA, time to target) and
Table 8 (quality and measured throughput under stress).

Tiny model (LoRA), the built-in corpus, two boundaries of two devices, the same token budget for
every run (paper §8.2):

1. Table 9: virtual time (m:ss) until the global model's validation loss, evaluated at every outer
   step, first reaches the target, at 5, 20 and 100 ms median WAN latency, mean +/- std over the
   seeds ("-" when a seed never reaches it), for Echelon-DA (drift-aware cadence, H_b in [2, 16]),
   DiLoCo+SA in its admissible form (`diloco+sa-boundary`: each boundary one DiLoCo worker whose
   devices aggregate inside it, the outer round SecAgg+ across boundaries, lockstep, fixed H = 4),
   the flat DiLoCo+SA (every device a worker: not admissible, simulation only) and fixed-H
   Echelon; then the ratio Echelon-DA / DiLoCo+SA of the mean times (paper: 95 / 145 = 0.66 at
   100 ms). The devices are fast (a local round lasts 0.1-0.3 virtual s) so that WAN latency is
   commensurate with compute, as on the paper's 1B model; hence seconds, not minutes.
2. Table 8: Echelon-DA's final validation loss under WAN latency (0, 50 bursty, 100, 200 ms),
   Dirichlet non-IID severities (alpha 0.5 moderate, 0.1 severe) and churn (half the devices
   cycling offline and back), relative to 0 ms IID (paper: at most 2.2%), with tokens/s measured
   from the runs: over the virtual clock (the modelled fleet, with every stall) and of the real
   local-round compute on this machine.

Runs go through `echelon.analysis.sweep.execute` (parallel spawned processes); with --out they
are kept there and a second invocation reuses them (e.g. to try another --target at once).
--quick: one seed, a smaller budget, no flat DiLoCo+SA and three stress rows. The last line is
the ratios as JSON.

    .venv/bin/python benchmarks/wan.py [--quick] [--target 4.65] [--seeds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from echelon.analysis.rundata import RunData, load_run_dir, time_to_target
from echelon.analysis.sweep import apply_point, execute, run_id
from echelon.config import RunConfig

# The lowest round target every Table 9 run reaches within the budget (the seeds differ in level):
# at 4.6, Echelon-DA's seed 2 at 100 ms ended at 4.601 and the ratio there was undefined.
TARGET_LOSS = 4.65
TOKENS = {"full": 60_000, "quick": 2_000}  # quick: a smoke run of every setting (CI), not the figure
LATENCIES_MS = (5, 20, 100)
DA, SA = "echelon-da", "diloco+sa-boundary"
METHODS = {
    DA: "Echelon-DA",
    SA: "DiLoCo+SA (admissible)",
    "diloco+sa": "DiLoCo+SA (flat)",
    "echelon": "Echelon (fixed H)",
}
QUICK_METHODS = (DA, SA, "echelon")
IID = {"kind": "iid"}
MODERATE = {"kind": "dirichlet", "alpha": 0.5}
SEVERE = {"kind": "dirichlet", "alpha": 0.1}
BURSTY = {"p_enter": 0.05, "p_exit": 0.3, "latency_factor": 5.0}
HALF_CYCLING = {"mean_uptime_s": 20.0, "mean_downtime_s": 5.0, "cycling_fraction": 0.5}
# label -> (WAN latency ms, bursty, partition, churn); the first is the reference
STRESS = {
    "0 ms, IID": (0, False, IID, None),
    "0 ms, moderate non-IID": (0, False, MODERATE, None),
    "0 ms, severe non-IID": (0, False, SEVERE, None),
    "50 ms bursty, severe non-IID": (50, True, SEVERE, None),
    "100 ms, IID": (100, False, IID, None),
    "200 ms, IID": (200, False, IID, None),
    "20 ms, IID, churn (half cycling)": (20, False, IID, HALF_CYCLING),
}
QUICK_STRESS = ("0 ms, IID", "200 ms, IID", "20 ms, IID, churn (half cycling)")


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


def configs(
    tokens: int, seeds: int, methods: tuple[str, ...], stress: tuple[str, ...]
) -> dict[tuple, RunConfig]:
    """("ttt", strategy, latency, seed) and ("stress", treatment, seed) -> run config."""
    base = base_run(tokens)
    out: dict[tuple, RunConfig] = {}
    for seed in range(seeds):
        for strategy in methods:
            for ms in LATENCIES_MS:
                point = {"strategy": strategy, "network.wan.latency_ms": ms, "seed": seed}
                out[("ttt", strategy, ms, seed)] = RunConfig.model_validate(apply_point(base, point))
        for label in stress:
            ms, bursty, partition, churn = STRESS[label]
            point = {
                "strategy": DA,
                "network.wan.latency_ms": ms,
                "network.wan.jitter_pct": 20 if ms else 0,
                "network.wan.bursty": BURSTY if bursty else None,
                "data.partition": partition,
                "churn": churn or {},
                "seed": seed,
            }
            out[("stress", label, seed)] = RunConfig.model_validate(apply_point(base, point))
    return out


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def _times(
    data: dict[tuple, RunData], strategy: str, ms: int, seeds: int, target: float
) -> list[float | None]:
    return [time_to_target(data[("ttt", strategy, ms, s)].outer, target) for s in range(seeds)]


def _time_cell(times: list[float | None]) -> str:
    if any(t is None for t in times):
        return f"- ({sum(t is not None for t in times)}/{len(times)} reached)"
    spread = f" +/- {statistics.stdev(times):.1f} s" if len(times) > 1 else ""
    return _clock(statistics.fmean(times)) + spread


def ratios(data: dict[tuple, RunData], seeds: int, target: float) -> dict[int, float | None]:
    """Echelon-DA's mean time to target over DiLoCo+SA's (admissible), per latency."""
    out: dict[int, float | None] = {}
    for ms in LATENCIES_MS:
        da, sa = _times(data, DA, ms, seeds, target), _times(data, SA, ms, seeds, target)
        reached = None not in da and None not in sa
        out[ms] = statistics.fmean(da) / statistics.fmean(sa) if reached else None
    return out


def time_table(
    data: dict[tuple, RunData], target: float, seeds: int, tokens: int, methods: tuple[str, ...]
) -> Table:
    table = Table(
        title=f"Table 9: time to validation loss {target:g}, virtual m:ss ({tokens:,} tokens, {seeds} seed(s))"
    )
    table.add_column("method")
    table.add_column("metric")
    for ms in LATENCIES_MS:
        table.add_column(f"{ms} ms", justify="right")
    for strategy in methods:
        runs = {ms: [data[("ttt", strategy, ms, s)] for s in range(seeds)] for ms in LATENCIES_MS}
        table.add_row(
            METHODS[strategy],
            "time to target",
            *(_time_cell(_times(data, strategy, ms, seeds, target)) for ms in LATENCIES_MS),
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
    r = ratios(data, seeds, target)
    table.add_row(
        "Echelon-DA / DiLoCo+SA",
        "ratio of mean times",
        *("-" if r[ms] is None else f"{r[ms]:.2f}" for ms in LATENCIES_MS),
    )
    return table


def stress_table(data: dict[tuple, RunData], seeds: int, stress: tuple[str, ...]) -> Table:
    table = Table(title="Table 8: Echelon-DA under stress, relative to 0 ms IID (paper: <= 2.2% worse)")
    cols = (
        "treatment",
        "val loss",
        "PPL",
        "degradation",
        "tokens/virtual s",
        "compute tokens/CPU s",
        "outer steps",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "treatment" else "right")
    reference = None
    for label in stress:
        runs = [data[("stress", label, s)] for s in range(seeds)]
        loss = statistics.fmean(r.summary["end_val_loss"] for r in runs)
        reference = loss if reference is None else reference
        table.add_row(
            label,
            f"{loss:.4f}",
            f"{math.exp(loss):.2f}",
            f"{100 * (loss - reference) / reference:+.2f}%",
            f"{statistics.fmean(r.summary['tokens_per_virtual_s'] for r in runs):.0f}",
            f"{statistics.fmean(r.summary['compute_tokens_per_s'] for r in runs):.0f}",
            f"{statistics.fmean(r.summary['outer_steps'] for r in runs):.1f}",
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
    methods = QUICK_METHODS if args.quick else tuple(METHODS)
    stress = QUICK_STRESS if args.quick else tuple(STRESS)
    runs = configs(tokens, seeds, methods, stress)
    ids = {key: run_id(cfg) for key, cfg in runs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.out or Path(tmp)
        outcome = execute({ids[k]: cfg for k, cfg in runs.items()}, runs_dir, workers=args.workers)
        if outcome.failures:
            raise SystemExit(f"runs failed: {outcome.failures}")
        data = {key: load_run_dir(runs_dir / ids[key]) for key in runs}
    console = Console(width=max(Console().width, 120))
    console.print(time_table(data, args.target, seeds, tokens, methods))
    console.print(stress_table(data, seeds, stress))
    print(
        json.dumps(
            {"ratio_da_over_diloco_sa": {f"{ms} ms": r for ms, r in ratios(data, seeds, args.target).items()}}
        )
    )


if __name__ == "__main__":
    main()
