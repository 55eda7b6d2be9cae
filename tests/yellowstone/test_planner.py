"""The planner: constraints always hold, the optimum is close, infeasibility names its cause."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echelon.yellowstone.cost import CostSettings, Network, Tables, calibrate, devices_of, evaluate
from echelon.yellowstone.exhaustive import _best_cut, exhaustive
from echelon.yellowstone.fleet import Fleet, load_fleet
from echelon.yellowstone.model_profile import PRESETS, build_profile
from echelon.yellowstone.partition import best_split, cells
from echelon.yellowstone.planner import InfeasibleError, plan_boundary, plan_fleet
from echelon.yellowstone.search import Context, Evaluator
from echelon.yellowstone.synthetic import SMALL_SHAPE, random_fleet

EXAMPLES = Path(__file__).parents[2] / "examples" / "fleets"
SMALL = build_profile("small", SMALL_SHAPE, trainable="full", seq_len=1024, micro_batch=4)
SMALL_SETTINGS = CostSettings(micro_batches=4)
REASONS = {"no_cleared_device", "model_fits_nowhere", "raw_stages_fit_nowhere", "no_placement"}


def _context(fleet: Fleet, profile=SMALL, s: CostSettings = SMALL_SETTINGS, boundary: str = "b0") -> Context:
    return Context(boundary, devices_of(fleet, boundary, s, {}), Tables(profile), Network(fleet), s, profile)


def assert_constraints(plan, fleet: Fleet, profile) -> None:
    """Memory, tier and boundary constraints, checked here without the planner's help."""
    assert all(c.ok for c in plan.checks), plan.checks
    devices = {d.id: d for d in fleet.devices}
    n_units = len(profile.units)
    for b in plan.boundaries:
        tier = next(x.data_tier for x in fleet.boundaries if x.id == b.id)
        for r in b.replicas:
            clusters = {c.id: c for c in r.clusters}
            for c in r.clusters:
                assert len({devices[d].site for d in c.devices}) == 1
                for d in c.devices:
                    assert devices[d].boundary == b.id  # no pipeline edge leaves the boundary
                    assert c.memory_bytes[d] <= devices[d].memory * plan.settings.memory_headroom * (1 + 1e-9)
            for s in r.stages:
                if s.units[0] == 0 or s.units[1] == n_units:  # embedding input or loss labels
                    for d in clusters[s.cluster].devices:
                        assert fleet.tier_rank(devices[d].access_tier) >= fleet.tier_rank(tier)
            covered = sorted(s.units for s in r.stages)
            assert covered[0][0] == 0 and covered[-1][1] == n_units
            assert all(a[1] == b2[0] for a, b2 in itertools.pairwise(covered))


@pytest.mark.parametrize(
    ("name", "model", "trainable", "micro_batch"),
    [
        ("seed", "llama-8b", "full", 4),
        ("hospital_pair", "llama-8b", "lora", 4),
        ("consumer_lab", "llama-3b", "full", 2),
    ],
)
def test_examples_plan(name, model, trainable, micro_batch):
    fleet = load_fleet(EXAMPLES / f"{name}.yaml")
    profile = build_profile(model, PRESETS[model], trainable=trainable, micro_batch=micro_batch)
    plan = plan_fleet(fleet, profile)
    assert_constraints(plan, fleet, profile)
    assert plan.tokens_per_s > 0 and {b.id for b in plan.boundaries} == {b.id for b in fleet.boundaries}
    used = {d for b in plan.boundaries for r in b.replicas for c in r.clusters for d in c.devices}
    assert {x.device for b in plan.boundaries for x in b.backups} == used
    if name == "seed":
        assert profile.state_bytes > max(d.memory for d in fleet.devices)  # too large for any one device
        assert all(len(r.clusters) >= 2 for r in plan.boundaries[0].replicas)
    for standby in (s for b in plan.boundaries for s in b.standby):  # weak devices: used, or why not
        assert any(
            standby in line and "stay on standby" in line and "tokens/s" in line for line in plan.explain
        )


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 14),
    seed=st.integers(0, 10_000),
    boundaries=st.integers(1, 2),
    memory_scale=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_every_plan_satisfies_memory_tier_and_boundary(n, seed, boundaries, memory_scale):
    fleet = random_fleet(n, seed, sites=1 + seed % 3, boundaries=boundaries, memory_scale=memory_scale)
    try:
        plan = plan_fleet(fleet, SMALL, SMALL_SETTINGS, budget=300)
    except InfeasibleError as e:
        assert e.reason in REASONS
        return
    assert_constraints(plan, fleet, SMALL)


def _gap(n: int, seed: int) -> float:
    fleet = random_fleet(n, seed, sites=2, memory_scale=0.5)
    ctx = _context(fleet)
    best, _ = exhaustive(ctx)
    try:
        result = plan_boundary(ctx, "restricted")
    except InfeasibleError:
        assert best == 0
        return 1.0
    found = sum(result.evaluator.score(r) for r in result.replicas)
    assert found <= best * (1 + 1e-9)  # the exhaustive search is the optimum of the same space
    return best / found


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8])
def test_planner_within_5_percent_of_exhaustive(n):
    gaps = [_gap(n, seed) for seed in range(6)]
    assert max(gaps) <= 1.05, gaps


def test_dp_matches_brute_force_and_cost_model():
    rng = np.random.default_rng(0)
    fleet = random_fleet(10, 3, sites=2, memory_scale=0.5)
    ctx = _context(fleet)
    ev = Evaluator(ctx)
    cleared = [i for i, d in enumerate(ctx.devices) if d.cleared]
    checked = 0
    devs = ctx.devices
    for _ in range(60):
        order = rng.permutation(len(devs))[: rng.integers(1, 7)].tolist()
        first = int(rng.choice(cleared))
        groups = [[first]]  # clusters of up to 4 devices of one site: their all-reduce counts too
        for i in (i for i in order if i != first):
            last = groups[-1]
            if (
                rng.random() < 0.5
                and len(last) < 4
                and devs[last[0]].site == devs[i].site
                and (len(groups) > 1 or devs[i].cleared)
            ):
                last.append(i)
            else:
                groups.append([i])
        rep = tuple(tuple(g) for g in groups)
        clusters = ev.clusters(rep)
        for structure in ["single"] if len(rep) == 1 else ["U", "linear"]:
            found = best_split(clusters, structure, ctx.tables, ctx.net, ctx.settings)
            brute = _best_cut(
                cells(clusters, structure, ctx.tables, ctx.net, ctx.settings), structure, len(SMALL.units), 4
            )
            if found is None:
                assert brute == float("inf")
                continue
            assert found[1] == pytest.approx(brute, rel=1e-9)
            solved = ev.solve(rep)
            if solved is not None and solved.structure == structure:
                cost = evaluate(ev.layout(rep), ctx.tables, ctx.net, ctx.settings)
                assert cost is not None and cost.step_s == pytest.approx(solved.step_s, rel=1e-9)
            checked += 1
    assert checked > 30


def _tiny_fleet(devices: list[dict], data_tier: str = "restricted", latency_ms: float = 0.0) -> Fleet:
    return Fleet.model_validate(
        {
            "name": "t",
            "access_tiers": ["public", "internal", "restricted"],
            "boundaries": [{"id": "b0", "data_tier": data_tier}],
            "sites": [{"id": "s0", "bandwidth_gbps": 100, "latency_ms": latency_ms}],
            "devices": [{"boundary": "b0", "site": "s0", "tflops": 50, **d} for d in devices],
        }
    )


@pytest.mark.parametrize(
    ("devices", "reason", "words"),
    [
        (
            [{"id": "a", "memory_gib": 80, "access_tier": "internal"}],
            "no_cleared_device",
            "no device is cleared",
        ),
        (
            [
                {"id": "a", "memory_gib": 8, "access_tier": "restricted"},
                {"id": "b", "memory_gib": 8, "access_tier": "public"},
            ],
            "model_fits_nowhere",
            "fits nowhere",
        ),
        (
            [
                {"id": "a", "memory_gib": 2, "access_tier": "restricted"},
                {"id": "b", "memory_gib": 80, "access_tier": "public"},
            ],
            "raw_stages_fit_nowhere",
            "raw-data stages",
        ),
    ],
)
def test_infeasible_fleets_name_the_failing_constraint(devices, reason, words):
    with pytest.raises(InfeasibleError) as err:
        plan_fleet(_tiny_fleet(devices), SMALL, SMALL_SETTINGS)
    assert err.value.reason == reason and words in str(err.value) and "b0" in str(err.value)


def test_calibration_from_measured_steps():
    profile = build_profile("llama-1b", PRESETS["llama-1b"], trainable="lora", seq_len=512)
    tokens_flops = profile.flops_per_token * 512 * 2
    fleet = _tiny_fleet(
        [
            {
                "id": "a",
                "memory_gib": 80,
                "access_tier": "restricted",
                "measured_steps": [
                    {"model": "llama-1b", "seq_len": 512, "micro_batch": 2, "step_s": tokens_flops / 25e12}
                ],
            },
            {"id": "b", "memory_gib": 80, "access_tier": "restricted"},
        ]
    )
    eta = calibrate(fleet, profile)
    assert eta["a"] == pytest.approx(0.5) and eta["b"] == 1.0
    plan = plan_fleet(fleet, profile)
    assert plan.settings.calibration == {"a": pytest.approx(0.5)}


def test_a_timed_optimizer_update_is_priced_per_parameter_held_not_per_token():
    """A measured step whose update was timed calibrates the tokens on the rest of it; the update
    costs every parameter a device holds once per step: all of a DDP stage's, a 1/n shard under
    FSDP, however small the device's share of the batch (spread over tokens, a DDP device training
    half the batch was priced half the update)."""
    from echelon.yellowstone.cost import make_cluster, mode_costs, update_rates

    profile = build_profile("llama-1b", PRESETS["llama-1b"], trainable="full", seq_len=512, micro_batch=2)
    tokens_flops = profile.flops_per_token * 512 * 2
    params = sum(u.trainable for u in profile.units)
    step = {"model": "llama-1b", "trainable": "full", "seq_len": 512, "micro_batch": 2}
    timed = {**step, "step_s": tokens_flops / 25e12 + 0.4, "update_s": 0.4}
    fleet = _tiny_fleet(
        [{"id": d, "memory_gib": 80, "access_tier": "restricted", "measured_steps": [timed]} for d in "ab"]
    )
    assert calibrate(fleet, profile) == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    rates = update_rates(fleet, profile)
    assert rates == {"a": pytest.approx(0.4 / params), "b": pytest.approx(0.4 / params)}
    settings = CostSettings(micro_batches=4)
    tables, net = Tables(profile), Network(fleet)
    segment = tables.segment([(0, tables.n_units, 1)])

    def per_step(update: dict[str, float]) -> dict[str, float]:
        cluster = make_cluster(
            tuple(devices_of(fleet, "b0", settings, {}, update)), net.link("s0", "s0"), profile
        )
        return {c.mode: float(c.ar) for c in mode_costs(cluster, segment, 0.0, settings, 512)}

    without, priced = per_step({}), per_step(rates)
    assert priced["DDP"] - without["DDP"] == pytest.approx(0.4)  # the whole model, on each device
    assert priced["FSDP"] - without["FSDP"] == pytest.approx(0.2)  # its half of it
    with pytest.raises(ValueError, match="update_s"):
        too_long = {**step, "step_s": 0.3, "update_s": 0.3}
        _tiny_fleet(
            [{"id": "a", "memory_gib": 80, "access_tier": "restricted", "measured_steps": [too_long]}]
        )


def test_a_timed_fsdp_is_priced_per_micro_batch_by_weight_held_and_ring_size():
    """`fsdp_s` (what FSDP added to a micro-batch of one decoder layer, by ring size) prices an
    FSDP cluster's collectives: per micro-batch, in proportion to the weight bytes it holds, at
    the cluster's ring size (measured, or on the line through the sizes measured), the slowest
    device's; DDP is not touched."""
    from echelon.yellowstone.cost import fsdp_rates, make_cluster, mode_costs, ring_rate

    profile = build_profile("llama-1b", PRESETS["llama-1b"], trainable="full", seq_len=512, micro_batch=4)
    step = {"model": "llama-1b", "trainable": "full", "seq_len": 512, "micro_batch": 4, "step_s": 9.0}
    fleet = _tiny_fleet(
        [
            {"id": "a", "memory_gib": 80, "access_tier": "restricted",
             "measured_steps": [{**step, "fsdp_s": {2: 0.02, 4: 0.05}}]},
            {"id": "b", "memory_gib": 80, "access_tier": "restricted",
             "measured_steps": [{**step, "fsdp_s": {2: 0.01}}]},
            {"id": "c", "memory_gib": 80, "access_tier": "restricted"},
        ]
    )  # fmt: skip
    layer = next(u.weight_bytes for u in profile.units if u.kind == "layer")
    rates = fsdp_rates(fleet, profile)
    assert rates == {"a": ((2, pytest.approx(0.02 / layer)), (4, pytest.approx(0.05 / layer))),
                     "b": ((2, pytest.approx(0.01 / layer)),)}  # fmt: skip
    assert ring_rate(rates["a"], 3) == pytest.approx(0.035 / layer)  # between the sizes measured
    assert ring_rate(rates["a"], 6) == pytest.approx(0.08 / layer)  # on their line beyond
    assert ring_rate(rates["b"], 3) == pytest.approx(0.01 / layer * (2 / 3) / (1 / 2))  # one size: the ring
    assert ring_rate((), 3) == 0.0 and ring_rate(rates["a"], 1) == 0.0  # a ring of one exchanges nothing
    settings = CostSettings(micro_batches=4)
    tables, net = Tables(profile), Network(fleet)
    two_layers = tables.segment([(1, 3, 1)])

    def per_micro_batch(ids: str, fsdp: dict) -> dict[str, float]:
        devices = tuple(d for d in devices_of(fleet, "b0", settings, {}, None, fsdp) if d.id in ids)
        cluster = make_cluster(devices, net.link("s0", "s0"), profile)
        return {c.mode: float(c.g) for c in mode_costs(cluster, two_layers, 0.0, settings, 512)}

    formula, measured = per_micro_batch("ab", {}), per_micro_batch("ab", rates)
    compute = measured["DDP"]
    assert formula["DDP"] == compute and formula["FSDP"] > compute  # the link's formula without it
    assert measured["FSDP"] - compute == pytest.approx(0.02 * 2)  # a's (the slower) at 2, two layers
    assert measured["FSDP+ckpt"] - measured["DDP+ckpt"] == pytest.approx(measured["FSDP"] - compute)
    three = per_micro_batch("abc", rates)  # c measured nothing: a's line at 3, b's ring scaling
    assert three["FSDP"] - three["DDP"] == pytest.approx(0.035 * 2)
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        _tiny_fleet([{"id": "a", "memory_gib": 80, "access_tier": "restricted",
                      "measured_steps": [{**step, "fsdp_s": {1: 0.03}}]}])  # fmt: skip


def test_a_timed_ddp_reduction_is_priced_per_step_by_gradient_bytes_and_ring_size():
    """`ddp_s` (what reducing a step's gradients of one decoder layer added to its last backward,
    by ring size) prices a DDP cluster's all-reduce: once per step, in proportion to the gradient
    bytes it reduces, at the cluster's ring size, the slowest device's; FSDP's per-step term and a
    one-device cluster (nothing to reduce) are not touched."""
    from echelon.yellowstone.cost import ddp_rates, make_cluster, mode_costs

    profile = build_profile("llama-1b", PRESETS["llama-1b"], trainable="full", seq_len=512, micro_batch=4)
    step = {"model": "llama-1b", "trainable": "full", "seq_len": 512, "micro_batch": 4, "step_s": 9.0}
    fleet = _tiny_fleet(
        [
            {"id": "a", "memory_gib": 80, "access_tier": "restricted",
             "measured_steps": [{**step, "ddp_s": {2: 0.010, 3: 0.016}}]},
            {"id": "b", "memory_gib": 80, "access_tier": "restricted",
             "measured_steps": [{**step, "ddp_s": {2: 0.004}}]},
            {"id": "c", "memory_gib": 80, "access_tier": "restricted"},
        ]
    )  # fmt: skip
    layer = next(u.grad_bytes for u in profile.units if u.kind == "layer")
    rates = ddp_rates(fleet, profile)
    assert rates == {"a": ((2, pytest.approx(0.010 / layer)), (3, pytest.approx(0.016 / layer))),
                     "b": ((2, pytest.approx(0.004 / layer)),)}  # fmt: skip
    settings, tables, net = CostSettings(micro_batches=4), Tables(profile), Network(fleet)
    two_layers = tables.segment([(1, 3, 1)])

    def per_step(ids: str, ddp: dict) -> dict[str, float]:
        devices = tuple(d for d in devices_of(fleet, "b0", settings, {}, ddp=ddp) if d.id in ids)
        cluster = make_cluster(devices, net.link("s0", "s0"), profile)
        return {c.mode: float(c.ar) for c in mode_costs(cluster, two_layers, 0.0, settings, 512)}

    formula, measured = per_step("ab", {}), per_step("ab", rates)
    assert measured["DDP"] == pytest.approx(0.010 * 2)  # a's (the slower) at 2, two layers
    assert measured["DDP+ckpt"] == measured["DDP"] and formula["DDP"] > 0
    assert measured["FSDP"] == formula["FSDP"]  # FSDP reduce-scatters per micro-batch: its own figure
    assert per_step("abc", rates)["DDP"] == pytest.approx(0.016 * 2)  # a's at 3
    assert per_step("a", rates)["DDP"] == 0.0  # one device: nothing to reduce


def test_a_timed_pipelining_runtime_is_charged_per_stage_and_micro_batch():
    """`stage_s` (what torch.distributed.pipelining added to a stage's forward and backward of a
    micro-batch) is charged to every stage a cluster runs, per micro-batch: twice on the first
    cluster of a U-shaped replica (the input stage and the head), once on the other, at its
    slowest device's figure; a replica on one cluster runs no pipeline and pays nothing."""
    from echelon.yellowstone.cost import Layout, make_cluster, stage_rates

    profile = build_profile("llama-1b", PRESETS["llama-1b"], trainable="full", seq_len=512, micro_batch=4)
    step = {"model": "llama-1b", "trainable": "full", "seq_len": 512, "micro_batch": 4, "step_s": 9.0}
    fleet = _tiny_fleet(
        [
            {"id": "a", "memory_gib": 80, "access_tier": "restricted",
             "measured_steps": [{**step, "stage_s": 0.004}, {**step, "stage_s": 0.002}]},
            {"id": "b", "memory_gib": 80, "access_tier": "restricted",
             "measured_steps": [{**step, "stage_s": 0.001}]},
            {"id": "c", "memory_gib": 80, "access_tier": "restricted"},
        ]
    )  # fmt: skip
    timed = stage_rates(fleet)
    assert timed == {"a": pytest.approx(0.003), "b": pytest.approx(0.001)}  # the mean; c timed nothing
    settings, tables, net = CostSettings(micro_batches=4), Tables(profile), Network(fleet)
    n = tables.n_units

    def group_s(stage: dict, clusters, structure: str, cuts) -> list[float]:
        devices = {d.id: d for d in devices_of(fleet, "b0", settings, {}, stage=stage)}
        lan = net.link("s0", "s0")
        layout = Layout(
            tuple(make_cluster(tuple(devices[i] for i in c), lan, profile) for c in clusters), structure, cuts
        )
        cost = evaluate(layout, tables, net, settings, ["DDP"] * len(clusters))
        assert cost is not None
        return cost.group_s

    u_shaped = ((("a",), ("b", "c")), "U", ((0, 9), (9, n - 1)))
    with_runtime, without = group_s(timed, *u_shaped), group_s({}, *u_shaped)
    assert with_runtime[0] - without[0] == pytest.approx(2 * 0.003)
    assert with_runtime[1] - without[1] == pytest.approx(0.001)  # b's: the slowest device timed
    single = ((("a", "b"),), "single", ((0, n),))
    assert group_s(timed, *single) == group_s({}, *single)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        _tiny_fleet([{"id": "a", "memory_gib": 80, "access_tier": "restricted",
                      "measured_steps": [{**step, "stage_s": -0.001}]}])  # fmt: skip


def test_the_formula_charges_a_latency_per_fsdp_unit():
    """Without a measurement, FSDP gathers every decoder layer (and the stage's root) on its own:
    each of them pays the link's latency per collective."""
    from echelon.yellowstone.cost import make_cluster, mode_costs

    profile = build_profile("llama-1b", PRESETS["llama-1b"], trainable="full", seq_len=512, micro_batch=4)
    fleet = _tiny_fleet(
        [{"id": d, "memory_gib": 80, "access_tier": "restricted"} for d in "ab"], latency_ms=1.0
    )
    settings, tables, net = CostSettings(micro_batches=4), Tables(profile), Network(fleet)
    cluster = make_cluster(tuple(devices_of(fleet, "b0", settings, {})), net.link("s0", "s0"), profile)

    def latency_part(*ranges: tuple[int, int]) -> float:
        seg = tables.segment([(i, j, 1) for i, j in ranges])
        g = {c.mode: float(c.g) for c in mode_costs(cluster, seg, 0.0, settings, 512)}
        bandwidth = (1 / 2) * (2 * seg.weight + seg.grad) / net.link("s0", "s0").beta
        return g["FSDP"] - g["DDP"] - bandwidth

    # 2 gathers and 1 reduce-scatter per micro-batch, 1 step of a 2-device ring, 1 ms each
    assert latency_part((1, 2)) == pytest.approx(3 * (1 + 1) * 1e-3)  # one layer and the root
    assert latency_part((1, 5)) == pytest.approx(3 * (4 + 1) * 1e-3)  # four layers and the root
    n = tables.n_units  # a U-shaped cluster 0: the embedding and a layer, and the head: two roots
    assert latency_part((0, 2), (n - 1, n)) == pytest.approx(3 * (1 + 2) * 1e-3)


def test_a_hand_plan_predicts_the_modes_it_runs():
    """A layout written by hand with its parallelism given is priced in that parallelism: its
    predicted step and memory are the cost model's for the modes the executor will run."""
    from echelon.yellowstone.execute.handmade import HandLayout, hand_plan

    profile = build_profile("tiny", PRESETS["tiny"], trainable="full", seq_len=64, micro_batch=4)
    fleet = _tiny_fleet(
        [{"id": d, "memory_gib": 4, "access_tier": "restricted"} for d in "ab"], latency_ms=1.0
    )
    settings = CostSettings(micro_batches=4)

    def predicted(mode: str | None):
        layout = HandLayout((("a", "b"),), "single", ((0, 6),), None if mode is None else (mode,))
        replica = hand_plan(fleet, profile, [layout], settings).boundaries[0].replicas[0]
        return (
            replica.clusters[0].parallelism,
            replica.predicted.step_s,
            replica.clusters[0].memory_bytes["a"],
        )

    chosen, ddp, fsdp = predicted(None), predicted("DDP"), predicted("FSDP")
    assert chosen == ddp and ddp[0] == "DDP" and fsdp[0] == "FSDP"
    assert fsdp[1] > ddp[1] and fsdp[2] < ddp[2]  # FSDP's collectives cost time and save memory
    alone = HandLayout((("a",),), "single", ((0, 6),), ("FSDP",))  # nothing to shard over
    with pytest.raises(ValueError, match=r"in the modes given \(FSDP\)"):
        hand_plan(fleet, profile, [alone], settings)
