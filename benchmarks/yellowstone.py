"""Yellowstone figures: planning time, quality at scale, optimality, backups, weak devices, refusals.

1. Planning time for random fleets up to 1,000 and 5,000 devices (Llama 8B, full training),
   wall and CPU seconds; targets <= 10 s at 1,000 and <= 60 s at 5,000 on a 2-core machine,
   judged on CPU seconds (the machine is shared; the wall clock is printed beside).
2. Replicated fleets: plan(k copies) / (k x plan(one copy)) for k = 3 and 10 on the seed fleet
   and a mixed fleet (copies share the sites); target >= 0.98.
3. Optimality on small random fleets (the 6-unit model of `synthetic`): exhaustive optimum /
   plan on 4 to 8 devices (target <= 1.05 on every fleet), and plan / MILP upper bound on 9 to 12
   devices, with the bound's own slack (optimum / bound) on 6 to 8 devices for scale.
4. Backups on a 300-device fleet: entries, replacements carried, checked, two-failure entries,
   cross-site standbys; every replacement must pass the plan's checks.
5. Weak devices on the seed fleet: standby devices, and how many `--explain` analyses with numbers.
6. A boundary that cannot be planned: the other boundaries are planned, the refused one named.
7. Predicted tokens/s of the plan against a uniform layer split and a largest-memory-first
   greedy pipeline on the example fleets.

    .venv/bin/python benchmarks/yellowstone.py [--quick]

The last line is the figures as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from echelon.yellowstone.cost import CostSettings, Layout, Tables, devices_of, evaluate, make_cluster
from echelon.yellowstone.exhaustive import exhaustive, upper_bound
from echelon.yellowstone.fleet import Fleet, load_fleet
from echelon.yellowstone.model_profile import PRESETS, ModelProfile, build_profile
from echelon.yellowstone.network import Network
from echelon.yellowstone.plan import Backup, Plan
from echelon.yellowstone.planner import InfeasibleError, plan_boundary, plan_fleet
from echelon.yellowstone.search import Context
from echelon.yellowstone.synthetic import SMALL_SHAPE, random_fleet

EXAMPLES = Path(__file__).parents[1] / "examples" / "fleets"
EXAMPLE_RUNS = [
    ("seed", "llama-8b", "full", 4),
    ("hospital_pair", "llama-8b", "lora", 4),
    ("consumer_lab", "llama-3b", "full", 2),
]
LLAMA_8B = build_profile("llama-8b", PRESETS["llama-8b"], trainable="full")
SMALL = build_profile("small", SMALL_SHAPE, trainable="full", seq_len=1024, micro_batch=4)
SMALL_SETTINGS = CostSettings(micro_batches=4)
Row = tuple[str, str, str]


def replicate(fleet: Fleet, k: int) -> Fleet:
    """k copies of a fleet's devices on the same sites and links (ids suffixed by the copy)."""
    data = fleet.model_dump()
    data["devices"] = [{**d, "id": f"{d['id']}-{j}"} for j in range(k) for d in data["devices"]]
    data["name"] = f"{fleet.name}-x{k}"
    return Fleet.model_validate(data)


def mixed_fleet() -> Fleet:
    """Sixteen mixed cards over two sites (the `synthetic` catalogue), one boundary."""
    return random_fleet(16, 11, sites=2)


def planning_time(sizes: list[int], figures: dict) -> list[Row]:
    rows = []
    for n in sizes:
        fleet = random_fleet(n, 0)
        wall, cpu = time.perf_counter(), time.process_time()
        plan = plan_fleet(fleet, LLAMA_8B)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        target = {1000: 10.0, 5000: 60.0}.get(n)
        verdict = ""
        if target is not None:  # judged on CPU time: several engineers share these two cores
            clock = "" if wall <= target else ", not on the wall clock"
            verdict = f" (target <= {target:.0f} s: {'met' if cpu <= target else 'MISSED'}{clock})"
        replicas = sum(len(b.replicas) for b in plan.boundaries)
        rows.append(
            (
                f"planning time, {n:,} devices",
                f"{wall:.2f} s wall, {cpu:.2f} s CPU{verdict}",
                f"{replicas} replicas, {plan.tokens_per_s:,.0f} tokens/s, checks {'ok' if _ok(plan) else 'FAILED'}",
            )
        )
        figures[f"plan_seconds_{n}"] = round(wall, 2)
        figures[f"plan_cpu_seconds_{n}"] = round(cpu, 2)
    return rows


def replicated(ks: list[int], fleets: list[tuple[str, Fleet]], figures: dict) -> list[Row]:
    rows = []
    for name, fleet in fleets:
        one = plan_fleet(fleet, LLAMA_8B).tokens_per_s
        for k in ks:
            start = time.perf_counter()
            plan = plan_fleet(replicate(fleet, k), LLAMA_8B)
            took = time.perf_counter() - start
            ratio = plan.tokens_per_s / (k * one)
            rows.append(
                (
                    f"{name} x {k} ({k * len(fleet.devices)} devices): plan / ({k} x plan of one)",
                    f"{ratio:.3f} ({'met' if ratio >= 0.98 else 'MISSED'} >= 0.98)",
                    f"{plan.tokens_per_s:,.0f} vs {k} x {one:,.0f} tokens/s; planned in {took:.1f} s",
                )
            )
            figures[f"replicated_{name}_x{k}"] = round(ratio, 4)
    return rows


def _context(fleet: Fleet) -> Context:
    return Context(
        "b0",
        devices_of(fleet, "b0", SMALL_SETTINGS, {}),
        Tables(SMALL),
        Network(fleet),
        SMALL_SETTINGS,
        SMALL,
    )


def _planned(ctx: Context) -> float:
    try:
        result = plan_boundary(ctx, "restricted")
    except InfeasibleError:
        return 0.0
    return sum(result.evaluator.score(r) for r in result.replicas)


def optimality(small: list[int], medium: list[int], seeds: int, figures: dict) -> list[Row]:
    rows = []
    worst = 0.0
    slack = []
    for n in small:
        ratios = []
        for seed in range(seeds):
            ctx = _context(random_fleet(n, seed, sites=2, memory_scale=0.5))
            best, _ = exhaustive(ctx)
            found = _planned(ctx)
            if best == 0:
                continue
            ratios.append(best / found if found else float("inf"))
            if n >= 6:
                slack.append(best / upper_bound(ctx))
        worst = max(worst, *ratios)
        rows.append(
            (
                f"optimum / plan, {n} devices",
                f"max {max(ratios):.4f}",
                f"mean {statistics.mean(ratios):.4f} over {len(ratios)} feasible fleets; "
                f"{sum(r <= 1.05 for r in ratios)}/{len(ratios)} within 1.05",
            )
        )
    figures["optimum_over_plan_max"] = round(worst, 4)
    for n in medium:
        ratios = []
        for seed in range(seeds):
            ctx = _context(random_fleet(n, seed, sites=2, memory_scale=0.5))
            bound = upper_bound(ctx)
            if bound > 0:
                ratios.append(_planned(ctx) / bound)
        rows.append(
            (
                f"plan / MILP upper bound, {n} devices",
                f"min {min(ratios):.3f}",
                f"mean {statistics.mean(ratios):.3f} over {len(ratios)} fleets",
            )
        )
        figures[f"plan_over_bound_{n}"] = round(min(ratios), 4)
    if slack:
        rows.append(
            (
                "the bound's own slack: optimum / bound, 6-8 devices",
                f"min {min(slack):.3f}",
                f"mean {statistics.mean(slack):.3f}: a plan at the optimum reads this low against the bound",
            )
        )
    return rows


def _entries(backups: list[Backup]):
    for x in backups:
        yield x, 1
        if x.fallback is not None:
            yield x.fallback, 1
        for y in x.then:
            yield y, 2


def backups(n: int, figures: dict) -> list[Row]:
    fleet = random_fleet(n, 1)
    plan = plan_fleet(fleet, LLAMA_8B)
    site = {d.id: d.site for d in fleet.devices}
    entries = [e for b in plan.boundaries for e in _entries(b.backups)]
    carried = sum(x.replacement is not None for x, _ in entries)
    drops = sum(x.kind == "drop_replica" for x, _ in entries)
    standby = [x for x, _ in entries if x.kind == "standby"]
    away = sum(site[x.standby] != site[x.device] for x in standby if x.standby)
    second = sum(depth == 2 for _, depth in entries)
    check = next(c for c in plan.checks if c.name == "backups")
    memory = next(c for c in plan.checks if c.name == "memory")
    figures["backups_checked_ok"] = check.ok and memory.ok
    return [
        (
            f"backups on {n} devices",
            f"{len(entries):,} entries, {carried:,} with their replacement",
            f"{drops} drop a replica (nothing to carry); {len(standby)} standby ({away} at another site); "
            f"{second} second-failure entries",
        ),
        (
            f"backups on {n} devices: checked like the primary plan",
            "ok" if check.ok and memory.ok else "FAILED",
            f"memory: {memory.detail}; backups: {check.detail}",
        ),
    ]


def weak_devices(figures: dict) -> list[Row]:
    fleet = load_fleet(EXAMPLES / "seed.yaml")
    plan = plan_fleet(fleet, LLAMA_8B)
    standby = plan.boundaries[0].standby
    explained = [d for d in standby if any(d in line and "tokens/s" in line for line in plan.explain)]
    weak = [d.id for d in fleet.devices if d.memory_gib is not None and d.memory_gib <= 16]
    used = [d for d in weak if d not in standby]
    figures["weak_standby_explained"] = f"{len(explained)}/{len(standby)}"
    return [
        (
            "seed: weak (<= 16 GB) devices used",
            f"{len(used)} of {len(weak)}",
            f"{len(explained)} of {len(standby)} standby devices explained with numbers by --explain",
        )
    ]


def refusal(figures: dict) -> list[Row]:
    data = load_fleet(EXAMPLES / "hospital_pair.yaml").model_dump()
    for d in data["devices"]:
        if d["boundary"] == "hospital-b":
            d["access_tier"] = "staff"  # no device of hospital B may touch its patient data
    plan = plan_fleet(
        Fleet.model_validate(data), build_profile("llama-8b", PRESETS["llama-8b"], trainable="lora")
    )
    figures["refusal_isolated"] = [b.id for b in plan.boundaries] == ["hospital-a"] and [
        r.boundary for r in plan.refused
    ] == ["hospital-b"]
    return [
        (
            "hospital B uncleared: planned / refused",
            f"{', '.join(b.id for b in plan.boundaries)} / {', '.join(r.boundary for r in plan.refused)}",
            plan.refused[0].reason if plan.refused else "",
        )
    ]


def _ok(plan: Plan) -> bool:
    return all(c.ok for c in plan.checks)


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


def baselines() -> list[Row]:
    rows = []
    settings = CostSettings()
    for name, model, trainable, mb in EXAMPLE_RUNS:
        fleet = load_fleet(EXAMPLES / f"{name}.yaml")
        profile = build_profile(model, PRESETS[model], trainable=trainable, micro_batch=mb)
        tables = Tables(profile)
        net = Network(fleet, profile.micro_batch * profile.seq_len * profile.activation_bytes)
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
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases: under a minute")
    args = parser.parse_args()
    figures: dict = {}
    seed = load_fleet(EXAMPLES / "seed.yaml")
    if args.quick:
        rows = (
            planning_time([1000], figures)
            + replicated([3], [("seed", seed)], figures)
            + optimality([4, 5, 6], [9], 3, figures)
            + backups(60, figures)
            + weak_devices(figures)
            + refusal(figures)
        )
    else:
        rows = (
            planning_time([18, 100, 1000, 5000], figures)
            + replicated([3, 10], [("seed", seed), ("mixed", mixed_fleet())], figures)
            + optimality([4, 5, 6, 7, 8], [9, 10, 11, 12], 16, figures)
            + backups(300, figures)
            + weak_devices(figures)
            + refusal(figures)
            + baselines()
        )
    table = Table(title="Yellowstone")
    for col in ("figure", "value", "detail"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=180).print(table)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
