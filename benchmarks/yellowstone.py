"""Yellowstone figures: planning time, optimality gap, and gains over naive placements.

1. Planning time for random fleets of 18, 100, 1,000 and 5,000 devices (Llama 8B, full training;
   target <= 10 s at 1,000 devices).
2. Plan cost over the exhaustive optimum on small random fleets (4 to 8 devices, the small
   6-unit model of `synthetic`): predicted step time of the planner / of the exhaustive search
   (equivalently optimum tokens/s over planned tokens/s); target <= 1.05.
3. Predicted tokens/s of the plan against two naive placements on the example fleets:
   the plan's own clusters with a uniform layer split, and a largest-memory-first greedy
   pipeline (one replica, devices by memory until the model fits, layers in proportion to memory).

    .venv/bin/python benchmarks/yellowstone.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from echelon.yellowstone.cost import CostSettings, Layout, Network, Tables, devices_of, evaluate, make_cluster
from echelon.yellowstone.exhaustive import exhaustive
from echelon.yellowstone.fleet import Fleet, load_fleet
from echelon.yellowstone.model_profile import PRESETS, ModelProfile, build_profile
from echelon.yellowstone.planner import InfeasibleError, plan_boundary, plan_fleet
from echelon.yellowstone.search import Context
from echelon.yellowstone.synthetic import SMALL_SHAPE, random_fleet

EXAMPLES = Path(__file__).parents[1] / "examples" / "fleets"
EXAMPLE_RUNS = [
    ("seed", "llama-8b", "full", 4),
    ("hospital_pair", "llama-8b", "lora", 4),
    ("consumer_lab", "llama-3b", "full", 2),
]


def planning_time(sizes: list[int]) -> list[tuple[str, str, str]]:
    profile = build_profile("llama-8b", PRESETS["llama-8b"], trainable="full")
    rows = []
    for n in sizes:
        fleet = random_fleet(n, 0)
        start = time.perf_counter()
        plan = plan_fleet(fleet, profile)
        took = time.perf_counter() - start
        replicas = sum(len(b.replicas) for b in plan.boundaries)
        rows.append(
            (
                f"planning time, {n:,} devices",
                f"{took:.2f} s",
                f"{replicas} replicas, {plan.tokens_per_s:,.0f} tokens/s",
            )
        )
    return rows


def optimality(sizes: list[int], seeds: int) -> list[tuple[str, str, str]]:
    profile = build_profile("small", SMALL_SHAPE, trainable="full", seq_len=1024, micro_batch=4)
    settings = CostSettings(micro_batches=4)
    rows = []
    for n in sizes:
        ratios = []
        for seed in range(seeds):
            fleet = random_fleet(n, seed, sites=2, memory_scale=0.5)
            ctx = Context(
                "b0",
                devices_of(fleet, "b0", settings, {}),
                Tables(profile),
                Network(fleet),
                settings,
                profile,
            )
            best, _ = exhaustive(ctx)
            try:
                result = plan_boundary(ctx, "restricted")
            except InfeasibleError:
                continue
            ratios.append(best / sum(result.evaluator.score(r) for r in result.replicas))
        rows.append(
            (
                f"plan / exhaustive step time, {n} devices",
                f"max {max(ratios):.3f}",
                f"mean {statistics.mean(ratios):.4f} over {len(ratios)} feasible fleets; "
                f"{sum(r <= 1.05 for r in ratios)}/{len(ratios)} within 1.05",
            )
        )
    return rows


def _uniform(layout: Layout, n_units: int) -> tuple[tuple[int, int], ...]:
    end = n_units - 1 if layout.structure == "U" else n_units
    bounds = np.linspace(0, end, len(layout.clusters) + 1).round().astype(int)
    bounds[1:-1] = np.maximum(bounds[1:-1], np.arange(1, len(layout.clusters)))
    return tuple((int(a), int(b)) for a, b in itertools.pairwise(bounds))


def _greedy(fleet: Fleet, profile: ModelProfile, settings: CostSettings, boundary: str, tables, net) -> float:
    """Largest memory first: one replica, one device per stage, layers in proportion to memory."""
    devs = devices_of(fleet, boundary, settings, {})
    cleared = sorted((d for d in devs if d.cleared), key=lambda d: -d.capacity)
    others = sorted((d for d in devs if d is not cleared[0]), key=lambda d: -d.capacity)
    chosen = [cleared[0]]
    for d in others:
        if sum(x.capacity for x in chosen) >= profile.state_bytes * 1.2:
            break
        chosen.append(d)
    lans = {d.site: net.link(d.site, d.site) for d in chosen}
    clusters = tuple(make_cluster((d,), lans[d.site], profile) for d in chosen)
    n = tables.n_units
    structure = "single" if len(clusters) == 1 else "U"
    end = n if structure == "single" else n - 1
    share = np.cumsum([d.capacity for d in chosen]) / sum(d.capacity for d in chosen)
    bounds = [0, *np.clip((share[:-1] * end).round().astype(int), 1, end - 1).tolist(), end]
    bounds = [*np.maximum.accumulate(bounds)]
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        return 0.0
    cuts = tuple(itertools.pairwise(bounds))
    cost = evaluate(Layout(clusters, structure, cuts), tables, net, settings)
    return 0.0 if cost is None else cost.tokens_per_s


def _versus(ours: float, baseline: float) -> str:
    if baseline == 0:
        return "does not fit (OOM)"
    return f"{baseline:,.0f} tokens/s (plan is {ours / baseline:.2f}x)"


def baselines() -> list[tuple[str, str, str]]:
    rows = []
    settings = CostSettings()
    for name, model, trainable, mb in EXAMPLE_RUNS:
        fleet = load_fleet(EXAMPLES / f"{name}.yaml")
        profile = build_profile(model, PRESETS[model], trainable=trainable, micro_batch=mb)
        tables, net = Tables(profile), Network(fleet)
        plan = plan_fleet(fleet, profile, settings)
        uniform = greedy = 0.0
        for b in plan.boundaries:
            devs = {d.id: d for d in devices_of(fleet, b.id, settings, {})}
            for r in b.replicas:
                clusters = tuple(
                    make_cluster(tuple(devs[i] for i in c.devices), net.link(c.site, c.site), profile)
                    for c in r.clusters
                )
                layout = Layout(clusters, r.structure, ())
                cost = evaluate(
                    Layout(clusters, r.structure, _uniform(layout, tables.n_units)), tables, net, settings
                )
                uniform += 0.0 if cost is None else cost.tokens_per_s
            greedy += _greedy(fleet, profile, settings, b.id, tables, net)

        ours = f"{plan.tokens_per_s:,.0f} tokens/s"
        rows.append((f"{name}: plan vs uniform layer split", ours, _versus(plan.tokens_per_s, uniform)))
        rows.append(
            (f"{name}: plan vs largest-memory-first greedy", ours, _versus(plan.tokens_per_s, greedy))
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller fleets and fewer seeds")
    args = parser.parse_args()
    sizes = [18, 100, 1000] if args.quick else [18, 100, 1000, 5000]
    small = [4, 5, 6] if args.quick else [4, 5, 6, 7, 8]
    rows = planning_time(sizes) + optimality(small, 5 if args.quick else 16) + baselines()
    table = Table(title="Yellowstone")
    for col in ("figure", "value", "detail"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
