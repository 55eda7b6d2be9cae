"""Backups can be carried out: each carries its whole replacement, which fits, avoids the failed
devices, and covers a second failure of a head or raw-data device."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echelon.yellowstone.cost import CostSettings
from echelon.yellowstone.fleet import Fleet
from echelon.yellowstone.model_profile import PRESETS, build_profile
from echelon.yellowstone.plan import Backup, Plan
from echelon.yellowstone.planner import InfeasibleError, plan_fleet
from echelon.yellowstone.synthetic import SMALL_SHAPE, random_fleet

SMALL = build_profile("small", SMALL_SHAPE, trainable="full", seq_len=1024, micro_batch=4)
SETTINGS = CostSettings(micro_batches=4)


def _walk(entries: list[Backup], lost: frozenset[str] = frozenset()):
    """(entry, devices failed by then) for every entry, fallback and second-failure entry."""
    for x in entries:
        yield x, lost | {x.device}
        if x.fallback is not None:
            yield x.fallback, lost | {x.device}
        yield from _walk(x.then, lost | {x.device})


def assert_backups_carried(plan: Plan) -> None:
    assert all(c.ok for c in plan.checks), [c for c in plan.checks if not c.ok]
    for b in plan.boundaries:
        members = {r.id: {d for c in r.clusters for d in c.devices} for r in b.replicas}
        assert {x.device for x in b.backups} == set().union(*members.values())
        for x, lost in _walk(b.backups):
            if x.kind == "drop_replica":
                assert x.replacement is None
                continue
            rep = x.replacement
            assert rep is not None and rep.id == x.replica
            devices = {d for c in rep.clusters for d in c.devices}
            assert not devices & lost
            assert devices <= members[x.replica] | set(b.standby) | {
                y.standby for y, _ in _walk(b.backups) if y.standby
            }
            assert all(
                c.memory_bytes[d] <= c.capacity_bytes[d] * (1 + 1e-9) for c in rep.clusters for d in c.devices
            )
            if x.kind == "standby":
                assert x.standby in b.standby and x.standby in devices


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(n=st.integers(2, 14), seed=st.integers(0, 10_000), memory_scale=st.sampled_from([0.5, 1.0]))
def test_every_backup_carries_a_replacement_that_fits(n, seed, memory_scale):
    try:
        plan = plan_fleet(
            random_fleet(n, seed, sites=1 + seed % 3, memory_scale=memory_scale), SMALL, SETTINGS, budget=200
        )
    except InfeasibleError:
        return
    assert_backups_carried(plan)


def _fleet(devices: list[dict], links: list[dict]) -> Fleet:
    return Fleet.model_validate(
        {
            "name": "spares",
            "access_tiers": ["public", "restricted"],
            "boundaries": [{"id": "b0", "data_tier": "restricted"}],
            "sites": [{"id": "a", "bandwidth_gbps": 100}, {"id": "b", "bandwidth_gbps": 100}],
            "links": links,
            "devices": [{"boundary": "b0", "tflops": 100, **d} for d in devices],
        }
    )


def test_a_standby_at_another_site_backs_up_where_the_link_allows():
    devices = [
        {"id": "raw", "site": "a", "memory_gib": 12, "access_tier": "restricted"},  # cannot train alone
        {"id": "mid", "site": "a", "memory_gib": 24, "access_tier": "public"},
        {"id": "spare", "site": "b", "memory_gib": 24, "access_tier": "public", "tflops": 10},
    ]
    linked = plan_fleet(_fleet(devices, [{"sites": ["a", "b"], "bandwidth_gbps": 50}]), SMALL, SETTINGS)
    assert linked.boundaries[0].standby == ["spare"]  # too slow to help while everyone is up
    entry = next(x for x in linked.boundaries[0].backups if x.device == "mid")
    assert entry.kind == "standby" and entry.standby == "spare"
    assert [c.site for c in entry.replacement.clusters] == ["a", "b"]
    assert_backups_carried(linked)
    unlinked = plan_fleet(_fleet(devices, []), SMALL, SETTINGS)
    assert next(x for x in unlinked.boundaries[0].backups if x.device == "mid").kind != "standby"


def test_heads_and_raw_data_devices_survive_two_failures():
    small = [
        {"id": f"raw{i}", "memory_gib": 5, "access_tier": "restricted", "tflops": 100 if i < 2 else 1}
        for i in range(3)
    ]
    big = [
        {"id": f"mid{i}", "memory_gib": 24, "access_tier": "public", "tflops": 100 if i < 2 else 20}
        for i in range(3)
    ]
    plan = plan_fleet(_fleet([{"site": "a", **d} for d in small + big], []), SMALL, SETTINGS)
    b = plan.boundaries[0]
    raw = {d for r in b.replicas for c in r.clusters if c.raw_data for d in c.devices}
    headed = {c.head: set(c.devices) - {c.head} for r in b.replicas for c in r.clusters if not c.raw_data}
    seen = set()
    for x in b.backups:
        if x.kind == "drop_replica":
            continue
        if x.device in raw:  # then: every raw-data device of the replacement
            assert {y.device for y in x.then} == {
                d for c in x.replacement.clusters if c.raw_data for d in c.devices
            }
            seen.add("raw")
        elif headed.get(x.device):  # then: the head of the cluster that carries on
            carried = next(c for c in x.replacement.clusters if set(c.devices) & headed[x.device])
            assert [y.device for y in x.then] == [carried.head]
            seen.add("head")
    assert seen == {"raw", "head"}
    assert_backups_carried(plan)


@pytest.mark.slow
def test_backups_fit_on_a_300_device_fleet():
    """The reported failure: standby swaps kept a split that overflowed memory (72 of 165)."""
    plan = plan_fleet(random_fleet(300, 0), build_profile("llama-8b", PRESETS["llama-8b"], trainable="full"))
    assert_backups_carried(plan)
    assert sum(x.kind == "standby" for b in plan.boundaries for x in b.backups) > 20
