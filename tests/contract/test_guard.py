"""The egress guard refuses every forbidden crossing, records it, and sends nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echelon.config import RunConfig
from echelon.contract.guard import ContractViolation, EgressGuard, IngressGuard
from echelon.contract.provenance import BoundaryModel, QuorumNotMet
from echelon.planes.aggregation import AggregateResult, encode_f32
from echelon.planes.tensors import to_payload
from echelon.runner import prepare
from echelon.v1 import boundary_pb2, device_pb2, tensor_pb2
from tests.conftest import small_run


class Recorder:
    """An audit sink that keeps the records in memory."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def append(self, **fields):
        self.records.append(fields)
        return fields


@pytest.fixture(scope="module")
def device_state():
    """Real device-level tensors: a local delta, hidden states and AdamW moments."""
    prep = prepare(RunConfig.model_validate(small_run()))
    theta = prep.bundle.get_vector()
    result = prep.trainer.local_round("d0", theta)
    batch = torch.from_numpy(prep.corpus.train[:2]).long()
    with torch.no_grad():
        hidden = prep.bundle.model(input_ids=batch, output_hidden_states=True).hidden_states[-1]
    moments = torch.cat([s["exp_avg"].reshape(-1) for s in prep.trainer._optimizers["d0"].state.values()])
    return {"delta": result.theta - theta, "activations": hidden.reshape(-1), "optimizer_state": moments}


def _guard(party: str = "boundary.b0", quorum: int = 2) -> tuple[EgressGuard, Recorder]:
    rec = Recorder()
    return EgressGuard(party, quorum, rec), rec


def _refused(guard: EgressGuard, rec: Recorder, body, match: str) -> None:
    with pytest.raises(ContractViolation, match=match):
        guard.send(1.0, body, "global")
    assert rec.records[-1]["outcome"] == "refused"
    assert match in rec.records[-1]["reason"]
    assert guard.bytes_total == 0  # nothing was counted as sent


@pytest.mark.parametrize("kind", ["delta", "activations", "optimizer_state"])
def test_device_tensor_with_device_provenance_is_refused(device_state, kind):
    guard, rec = _guard()
    body = boundary_pb2.BoundaryDelta(
        outer_step=1, tokens=10, delta=to_payload(device_state[kind], tensor_pb2.DEVICE)
    )
    _refused(guard, rec, body, "provenance DEVICE may not cross")
    assert rec.records[-1]["provenance"] == "DEVICE"


@pytest.mark.parametrize("kind", ["delta", "activations", "optimizer_state"])
def test_one_device_tensor_posing_as_an_aggregate_is_refused_by_the_quorum(device_state, kind):
    guard, rec = _guard(quorum=2)
    payload = encode_f32(device_state[kind].numpy(), tensor_pb2.BOUNDARY_AGGREGATE, contributors=1)
    _refused(guard, rec, boundary_pb2.BoundaryDelta(outer_step=1, delta=payload), "below the quorum")


@pytest.mark.parametrize(
    "body",
    [
        device_pb2.PlainInput(round_id=1),  # a device's (weighted) update
        device_pb2.BoundaryReference(version=1),  # the boundary's per-device channel
        device_pb2.UpdateReady(base_version=1, tokens=5),  # per-device metadata
        device_pb2.Hello(device_id="d0"),  # a member's identity
        device_pb2.AggregationRequest(round_id=1, weight=0.5, participants=3),
    ],
    ids=lambda b: b.DESCRIPTOR.name,
)
def test_device_local_message_types_have_no_way_across(body):
    guard, rec = _guard()
    _refused(guard, rec, body, "has no way across a boundary")
    assert rec.records[-1]["flow_class"] == "DEVICE_LOCAL"


def test_member_list_in_the_routing_field_is_refused():
    # Egress: the guard, not the plane, writes the routing field, from the channel's own boundary.
    guard, _ = _guard()
    (data,) = guard.send(1.0, boundary_pb2.SyncRequest(outer_step=3), "global")
    assert boundary_pb2.CrossBoundaryEnvelope.FromString(data).boundary_id == "b0"
    # Ingress: crafted bytes that list members in it are refused and recorded.
    rec = Recorder()
    ingress = IngressGuard("global", 2, rec)
    envelope = boundary_pb2.CrossBoundaryEnvelope(
        boundary_id="d0,d1,d2", sync_request=boundary_pb2.SyncRequest()
    )
    with pytest.raises(ContractViolation, match="the channel's is 'b0'"):
        ingress.receive(1.0, envelope.SerializeToString(), "boundary.b0")
    assert rec.records[-1]["outcome"] == "refused"


def test_tensor_smuggled_into_a_string_field_is_refused(device_state):
    rec = Recorder()
    ingress = IngressGuard("global", 2, rec)
    smuggled = device_state["delta"][:64].numpy().tobytes().hex()
    envelope = boundary_pb2.CrossBoundaryEnvelope(
        boundary_id=smuggled, status=boundary_pb2.BoundaryStatus(middle_step=1)
    )
    with pytest.raises(ContractViolation, match="exceeds its declared limit of 128 B"):
        ingress.receive(1.0, envelope.SerializeToString(), "boundary.b0")
    assert ingress.refused == 1 and rec.records[-1]["outcome"] == "refused"


def test_ingress_mirror_refuses_bytes_that_bypassed_an_egress_guard(device_state):
    rec = Recorder()
    ingress = IngressGuard("global", 2, rec)
    rogue = boundary_pb2.CrossBoundaryEnvelope(
        boundary_id="b0",
        boundary_delta=boundary_pb2.BoundaryDelta(delta=to_payload(device_state["delta"], tensor_pb2.DEVICE)),
    )
    with pytest.raises(ContractViolation, match="provenance DEVICE"):
        ingress.receive(2.0, rogue.SerializeToString(), "boundary.b0")
    assert rec.records[-1]["outcome"] == "refused" and rec.records[-1]["direction"] == "in"
    with pytest.raises(ContractViolation, match="undecodable"):
        ingress.receive(2.0, b"\xff\xff\xff", "boundary.b0")


def test_allowed_messages_cross_and_their_exact_wire_bytes_are_counted():
    guard, rec = _guard()
    model = BoundaryModel(torch.zeros(10), min_quorum=2)
    model.apply_aggregate(AggregateResult(np.ones(10), 2.0, 2), lr=1.0)
    body = boundary_pb2.BoundaryDelta(outer_step=1, tokens=64, middle_step=1, delta=model.delta_payload())
    (data,) = guard.send(1.0, body, "global")
    envelope = boundary_pb2.CrossBoundaryEnvelope.FromString(data)
    assert envelope.boundary_id == "b0" and envelope.WhichOneof("body") == "boundary_delta"
    assert guard.bytes_total == len(data) == envelope.ByteSize()
    assert (
        rec.records[-1]["outcome"] == "sent" and rec.records[-1]["message_type"] == "echelon.v1.BoundaryDelta"
    )
    assert rec.records[-1]["wire_bytes"] == len(data) and rec.records[-1]["quorum"] == 2
    back = IngressGuard("global", 2, Recorder()).receive(1.0, data, "boundary.b0")
    assert back == body


def test_boundary_aggregates_are_minted_only_above_quorum():
    model = BoundaryModel(torch.zeros(4), min_quorum=3)
    with pytest.raises(QuorumNotMet):
        model.apply_aggregate(AggregateResult(np.ones(4), 2.0, 2), lr=1.0)
    assert model.delta_payload() is None  # nothing to send: no aggregate below quorum exists
    with pytest.raises(ValueError, match="boundary aggregates come from BoundaryModel"):
        to_payload(torch.zeros(4), tensor_pb2.BOUNDARY_AGGREGATE)


def test_a_rogue_boundary_in_a_running_simulation_is_refused_and_the_run_goes_on():
    from echelon.planes.boundary import BoundaryPlane
    from echelon.runner import build_simulation
    from echelon.sansio import Send

    class LeakyBoundary(BoundaryPlane):
        """Tries to ship each device's secure-aggregation traffic straight to the global plane."""

        def receive(self, now, sender, message):
            actions = super().receive(now, sender, message)
            if message.DESCRIPTOR.name == "SecAggMessage":
                actions.append(Send(self.global_address, message))
            return actions

    cfg = RunConfig.model_validate(small_run(budget={"outer_steps": 2}))
    prep = prepare(cfg)
    violations = []
    sim = build_simulation(
        cfg, prep, lambda k, f: violations.append(f) if k == "contract_violation" else None
    )
    b0 = sim.boundary_planes["b0"]
    b0.__class__ = LeakyBoundary
    sim.run(cfg.budget)
    assert sim.global_plane.outer_step == 2
    assert violations and all("echelon.v1.SecAggMessage (DEVICE_LOCAL)" in v["reason"] for v in violations)
    assert len(sim.traffic.refused) == len(violations)
    assert "echelon.v1.SecAggMessage" not in sim.cross_boundary_by_type()


def test_large_tensors_cross_as_typed_slices_and_reassemble_exactly():
    from echelon.contract.slicing import MAX_SLICE_BYTES

    rng = np.random.default_rng(0)
    n = 3 * MAX_SLICE_BYTES // 4 + 1234  # just over three slices of float32
    model = BoundaryModel(torch.zeros(n), min_quorum=2)
    model.apply_aggregate(AggregateResult(rng.standard_normal(n), 2.0, 2), lr=1.0)
    body = boundary_pb2.BoundaryDelta(outer_step=4, tokens=9, middle_step=3, delta=model.delta_payload())
    out_rec, in_rec = Recorder(), Recorder()
    frames = EgressGuard("boundary.b0", 2, out_rec).send(1.0, body, "global")
    assert len(frames) == 4
    for f in frames:  # every frame is a typed, bounded message on its own
        part = boundary_pb2.CrossBoundaryEnvelope.FromString(f)
        assert part.WhichOneof("body") == "boundary_delta"
        assert len(part.boundary_delta.delta.data) <= MAX_SLICE_BYTES
    ingress = IngressGuard("global", 2, in_rec)
    results = [ingress.receive(2.0, f, "boundary.b0") for f in frames]
    assert results[:-1] == [None, None, None] and results[-1] == body
    assert out_rec.records[-1]["wire_bytes"] == in_rec.records[-1]["wire_bytes"] == sum(map(len, frames))
    assert out_rec.records[-1]["payload_sha256"] == in_rec.records[-1]["payload_sha256"]
    # A slice out of order is refused, and the partial message discarded.
    with pytest.raises(ContractViolation, match="slice at element"):
        ingress.receive(3.0, frames[1], "boundary.b0")
    assert ingress.receive(3.0, frames[0], "boundary.b0") is None
