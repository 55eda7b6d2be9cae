"""The boundary plane's staleness as the paper defines it, its drop records, the join protocol,
fixed-membership windows and what crosses about the contributors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echelon.config import EchelonConfig, PrivacyConfig
from echelon.planes.aggregation import PlainAggregator
from echelon.planes.boundary import BoundaryPlane
from echelon.sansio import Emit, Send
from echelon.tensors import encode
from echelon.v1 import boundary_pb2, device_pb2, tensor_pb2

G = "global"
OPEN = PrivacyConfig(membership_window=None, shuffle=False, status_counts="exact")


def _plane(devices=("d1", "d2"), **knobs) -> BoundaryPlane:
    knobs.setdefault("privacy", OPEN)
    cfg = EchelonConfig(aggregation="plain", buffer_timeout_s=30, **knobs)
    agg = PlainAggregator(min_quorum=cfg.min_quorum, timeout_s=60)
    return BoundaryPlane("b", list(devices), G, cfg, agg, dim=2)


def _reference(outer_step: int) -> boundary_pb2.GlobalReference:
    return boundary_pb2.GlobalReference(
        outer_step=outer_step, parameters=encode(torch.zeros(2), tensor_pb2.GLOBAL)
    )


def _start(plane: BoundaryPlane, devices) -> list:
    for d in devices:
        plane.receive(0.0, d, device_pb2.Hello(device_id=d))
    return plane.receive(0.0, G, _reference(0))


def _ready(plane: BoundaryPlane, now: float, device: str, base: int, tokens: int = 100) -> list:
    return plane.receive(
        now, device, device_pb2.UpdateReady(base_version=base, tokens=tokens, train_loss=1.0)
    )


def _requests(actions) -> dict[str, device_pb2.AggregationRequest]:
    return {
        a.to: a.message
        for a in actions
        if isinstance(a, Send) and a.message.DESCRIPTOR.name == "AggregationRequest"
    }


def _answer(plane: BoundaryPlane, now: float, requests: dict[str, device_pb2.AggregationRequest]) -> list:
    actions = []
    for d, req in requests.items():
        inp = device_pb2.PlainInput(
            round_id=req.round_id, weighted_delta=encode(np.full(2, req.weight), tensor_pb2.DEVICE)
        )
        actions += plane.receive(now, d, inp)
    return actions


def _emits(actions, kind: str) -> list[dict]:
    return [a.fields for a in actions if isinstance(a, Emit) and a.kind == kind]


def _sent(actions, name: str) -> list:
    return [a.message for a in actions if isinstance(a, Send) and a.message.DESCRIPTOR.name == name]


def _after_a_sync(plane: BoundaryPlane) -> None:
    """Both devices contribute to middle step 1; then an outer step's reference bumps the version."""
    _ready(plane, 1.0, "d1", 0)
    _answer(plane, 1.0, _requests(_ready(plane, 1.0, "d2", 0)))
    plane.receive(2.0, G, boundary_pb2.SyncRequest(outer_step=1))
    plane.receive(3.0, G, _reference(1))
    assert (plane.middle_step, plane.version) == (1, 2)


@pytest.mark.parametrize(("measure", "weight"), [("age", 1.0), ("version_lag", 2**-1)])
def test_staleness_is_the_age_since_last_participation_by_default(measure, weight):
    # Both devices took part in the latest middle step, then a global reference bumped the
    # version: their next updates are one version behind but zero middle steps old.
    plane = _plane(staleness=measure, staleness_exponent=1.0)
    _start(plane, ["d1", "d2"])
    _after_a_sync(plane)
    _ready(plane, 4.0, "d1", 1)
    requests = _requests(_ready(plane, 4.0, "d2", 1))
    assert {d: r.weight for d, r in requests.items()} == {"d1": weight, "d2": weight}


def test_no_drop_rule_by_default_and_every_drop_is_recorded():
    assert EchelonConfig().max_staleness is None
    plane = _plane(staleness="version_lag", max_staleness=0)
    _start(plane, ["d1", "d2"])
    _after_a_sync(plane)
    _ready(plane, 4.0, "d1", 1)
    actions = _ready(plane, 4.0, "d2", 1)
    # Both are too stale, so the step falls below quorum: nothing is aggregated, both drops recorded.
    assert not _requests(actions)
    drops = _emits(actions, "update_dropped")
    assert [(d["reason"], d["staleness"]) for d in drops] == [("stale", 1), ("stale", 1)]
    assert len(_sent(actions, "UpdateDiscarded")) == 2


def test_a_lost_device_takes_its_buffered_update_with_it_on_record():
    plane = _plane(buffer_size=2)
    _start(plane, ["d1", "d2"])
    _ready(plane, 1.0, "d1", 0)
    actions = plane.peer_lost(2.0, "d1")
    assert [d["reason"] for d in _emits(actions, "update_dropped")] == ["device lost"]
    assert plane.buffered == 0


def test_an_admitted_device_joins_and_a_removed_one_never_comes_back():
    plane = _plane(devices=("d1", "d2"))
    _start(plane, ["d1", "d2"])
    assert plane.receive(1.0, "d3", device_pb2.Hello(device_id="d3")) == []  # not a member: ignored
    plane.admit(1.0, "d3")
    actions = plane.receive(1.0, "d3", device_pb2.Hello(device_id="d3"))
    assert [a.to for a in actions if isinstance(a, Send)] == ["d3"]  # its reference
    plane.remove(2.0, "d2")
    assert plane.receive(3.0, "d2", device_pb2.Hello(device_id="d2")) == []
    _ready(plane, 4.0, "d1", 0)
    requests = _requests(_ready(plane, 4.0, "d3", 0))
    assert set(requests) == {"d1", "d3"}


def test_with_a_membership_window_newcomers_wait_for_the_next_edge():
    plane = _plane(devices=("d1", "d2", "d3"), privacy=PrivacyConfig(membership_window=2, shuffle=False))
    edges = _emits(_start(plane, ["d1", "d2"]), "membership_window")
    assert [(e["reason"], e["cohort"]) for e in edges] == [("start", 2)]
    # d3 says hello mid-window: it gets no reference (it may not be aggregated) until the edge.
    assert not [a for a in plane.receive(0.5, "d3", device_pb2.Hello(device_id="d3")) if isinstance(a, Send)]
    seen = []
    for step in range(2):
        _ready(plane, 1.0 + step, "d1", step)
        actions = _answer(plane, 1.0 + step, _requests(_ready(plane, 1.0 + step, "d2", step)))
        seen.append(actions)
    edge = _emits(seen[1], "membership_window")
    assert [(e["reason"], e["cohort"], e["joined"]) for e in edge] == [("window", 3, 1)]
    assert "d3" in {a.to for a in seen[1] if isinstance(a, Send)}  # its reference, at the edge
    assert not _emits(seen[0], "membership_window")


def test_a_window_ends_early_only_when_the_cohort_cannot_reach_the_quorum():
    plane = _plane(devices=("d1", "d2", "d3"), privacy=PrivacyConfig(membership_window=100, shuffle=False))
    _start(plane, ["d1", "d2"])
    plane.receive(0.5, "d3", device_pb2.Hello(device_id="d3"))  # waits outside the cohort
    actions = plane.peer_lost(1.0, "d2")  # the cohort's live members (d1) fall below the quorum of 2
    assert [(e["reason"], e["cohort"]) for e in _emits(actions, "membership_window")] == [
        ("quorum unreachable", 2)
    ]
    assert "d3" in {a.to for a in actions if isinstance(a, Send)}


def _status_after_one_step(counts: str, devices=("d1", "d2", "d3", "d4"), contributing=("d1", "d2", "d3")):
    plane = _plane(
        devices=devices,
        min_quorum=2,
        buffer_size=3,
        privacy=PrivacyConfig(membership_window=None, shuffle=False, status_counts=counts, count_bucket=2),
    )
    _start(plane, list(devices))
    actions = []
    for d in contributing:
        actions = _ready(plane, 1.0, d, 0, tokens=100)
    actions = _answer(plane, 1.0, _requests(actions))
    (status,) = _sent(actions, "BoundaryStatus")
    return plane, status


@pytest.mark.parametrize(
    ("counts", "contributors", "tokens"),
    [("exact", 3, 300), ("coarse", 2, 200), ("suppressed", 2, 0)],
)
def test_what_crosses_about_the_contributors(counts, contributors, tokens):
    plane, status = _status_after_one_step(counts)
    # coarse: rounded down to the bucket of 2 (never below the quorum); tokens in quanta of 2
    # rounds. suppressed: the quorum floor, and tokens in quanta of the whole cohort's round (4 x 100).
    assert (status.contributors, status.tokens_total) == (contributors, tokens)
    (delta,) = _sent(plane.receive(2.0, G, boundary_pb2.SyncRequest(outer_step=1)), "BoundaryDelta")
    assert delta.contributors == delta.delta.contributors == contributors
    # The outer step's token weight: to the nearest quantum, at least one.
    assert delta.tokens == {"exact": 300, "coarse": 400, "suppressed": 400}[counts]


@pytest.mark.parametrize("final", [False, True])
def test_a_final_sync_request_starts_no_local_round_and_the_delta_holds_what_was_aggregated(final):
    """A budget is spent: the global plane's last SyncRequest says so, and the boundary starts no
    local round from then on (a deployment's devices would otherwise train on while the last
    outer step is under way, and the run would count their tokens), while updates already under
    way are still aggregated. Without `final`, devices go on training as before."""
    plane = _plane()
    _start(plane, ("d1", "d2"))
    _ready(plane, 1.0, "d1", 0)
    step1 = _answer(plane, 1.0, _requests(_ready(plane, 1.0, "d2", 0)))
    assert len(_sent(step1, "BoundaryReference")) == 2  # both train on after middle step 1
    (delta,) = _sent(
        plane.receive(2.0, G, boundary_pb2.SyncRequest(outer_step=1, final=final)), "BoundaryDelta"
    )
    assert delta.tokens == 200 and delta.middle_step == 1  # what middle step 1 aggregated
    assert plane.closing is final
    _ready(plane, 3.0, "d1", 1)
    step2 = _answer(plane, 3.0, _requests(_ready(plane, 3.0, "d2", 1)))
    assert plane.middle_step == 2  # the rounds under way are aggregated still
    assert len(_sent(step2, "BoundaryReference")) == (0 if final else 2)
    # A restart from a checkpoint taken now keeps to it.
    restored = _plane()
    restored.load_state_dict(plane.state_dict())
    assert restored.closing is final
    hellos = [a for d in ("d1", "d2") for a in restored.receive(4.0, d, device_pb2.Hello(device_id=d))]
    assert len(_sent(hellos, "BoundaryReference")) == (0 if final else 2)


def test_a_device_overstating_its_tokens_or_reporting_a_non_finite_loss_is_refused():
    """Tokens weigh a boundary in the outer step (omega_b): a device may not claim more than a
    local round trains, nor a loss that is not a number; refused, and its round not buffered."""
    plane = BoundaryPlane(
        "b",
        ["d1", "d2"],
        G,
        EchelonConfig(aggregation="plain", privacy=OPEN),
        PlainAggregator(2, 60),
        dim=2,
        round_tokens=100,
    )
    _start(plane, ("d1", "d2"))
    for bad, reason in (
        (
            device_pb2.UpdateReady(base_version=0, tokens=1 << 63, train_loss=1.0),
            "9,223,372,036,854,775,808 tokens",
        ),
        (device_pb2.UpdateReady(base_version=0, tokens=100, train_loss=float("nan")), "train loss is nan"),
        (device_pb2.UpdateReady(base_version=0, tokens=100, train_loss=float("-inf")), "train loss is -inf"),
    ):
        assert reason in _emits(plane.receive(1.0, "d1", bad), "refused")[0]["reason"]
    _ready(plane, 1.0, "d1", 0)  # the honest report after them is taken
    assert _requests(_ready(plane, 1.0, "d2", 0)).keys() == {"d1", "d2"}  # both in the middle step
