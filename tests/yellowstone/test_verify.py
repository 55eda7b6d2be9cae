"""verify.py checks a plan as written: edited plans fail the check that names what is wrong."""

from __future__ import annotations

import pytest

from echelon.yellowstone.cost import CostSettings
from echelon.yellowstone.fleet import Fleet
from echelon.yellowstone.model_profile import build_profile
from echelon.yellowstone.plan import Plan
from echelon.yellowstone.planner import plan_fleet
from echelon.yellowstone.synthetic import SMALL_SHAPE, random_fleet
from echelon.yellowstone.verify import check_plan

SMALL = build_profile("small", SMALL_SHAPE, trainable="full", seq_len=1024, micro_batch=4)


@pytest.fixture(scope="module")
def planned() -> tuple[Fleet, Plan]:
    fleet = random_fleet(10, 17, sites=2, memory_scale=0.5)  # linear and U replicas, every kind of entry
    return fleet, plan_fleet(fleet, SMALL, CostSettings(micro_batches=4), budget=300)


def _failed(plan: Plan, fleet: Fleet) -> set[str]:
    return {c.name for c in check_plan(plan, fleet, SMALL) if not c.ok}


def _edited(plan: Plan) -> Plan:
    return plan.model_copy(deep=True)


def test_the_planned_plan_passes_every_check(planned):
    fleet, plan = planned
    assert _failed(plan, fleet) == set()
    assert {c.name for c in plan.checks} >= {"coverage", "standby", "backups", "memory"}


def test_stages_out_of_order_fail(planned):
    fleet, plan = planned
    bad = _edited(plan)
    r = next(r for r in bad.boundaries[0].replicas if len(r.stages) >= 3)
    r.stages[1], r.stages[2] = r.stages[2], r.stages[1]  # the same stages, written out of order
    assert _failed(bad, fleet) == {"coverage"}
    renumbered = _edited(bad)
    r = next(r for r in renumbered.boundaries[0].replicas if len(r.stages) >= 3)
    r.stages[1].index, r.stages[2].index = 1, 2  # indices in order, units still swapped
    assert _failed(renumbered, fleet) == {"coverage"}


def test_understated_micro_batches_in_flight_fail(planned):
    fleet, plan = planned
    bad = _edited(plan)
    r = next(r for r in bad.boundaries[0].replicas if r.stages[0].in_flight > 1)
    r.stages[0].in_flight = 1  # would hide activation memory
    assert "coverage" in _failed(bad, fleet)


def test_standby_entries_are_checked(planned):
    fleet, plan = planned
    stranger = _edited(plan)
    stranger.boundaries[0].standby.append("not-a-device")
    assert "standby" in _failed(stranger, fleet)
    twice = _edited(plan)
    used = twice.boundaries[0].replicas[0].clusters[0].devices[0]
    twice.boundaries[0].standby.append(used)
    assert {"standby", "single use"} <= _failed(twice, fleet)


def test_backup_replacements_are_checked_like_the_primary_plan(planned):
    fleet, plan = planned
    carried = [(k, x) for k, x in enumerate(plan.boundaries[0].backups) if x.replacement is not None]
    assert carried
    k, entry = carried[0]
    heavy = _edited(plan)
    for s in heavy.boundaries[0].backups[k].replacement.stages:
        s.in_flight *= 50  # activations of 50x the micro-batches: no device holds them
    assert _failed(heavy, fleet) == {"memory"}
    revived = _edited(plan)
    rep = revived.boundaries[0].backups[k].replacement
    rep.clusters[0].devices[0] = entry.device  # the failed device is back in its replacement
    assert "backups" in _failed(revived, fleet)
    missing = _edited(plan)
    missing.boundaries[0].backups[k].replacement = None
    assert _failed(missing, fleet) == {"backups"}
    dropped = _edited(plan)
    dropped.boundaries[0].backups.pop(k)
    assert _failed(dropped, fleet) == {"backups"}  # a device in a replica without a backup


def test_second_failure_and_fallback_entries_are_checked(planned):
    fleet, plan = planned
    chained = [(k, x) for k, x in enumerate(plan.boundaries[0].backups) if x.then and x.then[0].replacement]
    assert chained
    k, entry = chained[0]
    bad = _edited(plan)
    second = bad.boundaries[0].backups[k].then[0].replacement
    second.clusters[0].devices[0] = entry.device  # the first failure reappears after the second
    assert "backups" in _failed(bad, fleet)
    fallbacks = [(k, x) for k, x in enumerate(plan.boundaries[0].backups) if x.fallback is not None]
    assert fallbacks
    k, _ = fallbacks[0]
    greedy = _edited(plan)
    greedy.boundaries[0].backups[k].fallback.kind = "standby"  # a fallback must not need a standby
    assert "backups" in _failed(greedy, fleet)
