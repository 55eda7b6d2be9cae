"""The egress guard refuses every forbidden crossing, records it, and sends nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echelon.assembly import prepare
from echelon.config import RunConfig
from echelon.contract.guard import ContractViolation, EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.contract.provenance import BoundaryModel, QuorumNotMet
from echelon.tensors import encode, payload
from echelon.v1 import boundary_pb2, device_pb2, tensor_pb2
from tests.contract.kit import TERMS, Recorder, envelope, model_with_aggregate
from tests.helpers import small_run


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


def _guard(party: str = "boundary.b0", terms: Terms = TERMS) -> tuple[EgressGuard, Recorder]:
    rec = Recorder()
    return EgressGuard(party, terms, rec), rec


def _refused(guard: EgressGuard, rec: Recorder, body, match: str) -> None:
    with pytest.raises(ContractViolation, match=match):
        guard.send(1.0, body, "global")
    assert rec.records[-1]["outcome"] == "refused"
    assert match in rec.records[-1]["reason"]
    assert guard.bytes_total == 0  # nothing was counted as sent


@pytest.mark.parametrize("kind", ["delta", "activations", "optimizer_state"])
def test_device_tensor_with_device_provenance_is_refused(device_state, kind):
    guard, rec = _guard(terms=Terms(2, device_state[kind].numel()))
    body = boundary_pb2.BoundaryDelta(
        outer_step=1, tokens=10, delta=encode(device_state[kind], tensor_pb2.DEVICE)
    )
    _refused(guard, rec, body, "provenance DEVICE may not cross")
    assert rec.records[-1]["provenance"] == "DEVICE"


@pytest.mark.parametrize("kind", ["delta", "activations", "optimizer_state"])
def test_one_device_tensor_posing_as_an_aggregate_is_refused_by_the_quorum(device_state, kind):
    guard, rec = _guard(terms=Terms(2, device_state[kind].numel()))
    posing = payload(device_state[kind].numpy(), tensor_pb2.BOUNDARY_AGGREGATE, contributors=1)
    body = boundary_pb2.BoundaryDelta(outer_step=1, contributors=1, delta=posing)
    _refused(guard, rec, body, "below the quorum")


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
    # AggregationRequest is CONTROL (the outer round nests it), but never an envelope body itself.
    expected = "CONTROL" if isinstance(body, device_pb2.AggregationRequest) else "DEVICE_LOCAL"
    assert rec.records[-1]["flow_class"] == expected


def test_member_list_in_the_routing_field_is_refused():
    # Egress: the guard, not the plane, writes the routing field, from the channel's own boundary.
    guard, _ = _guard()
    (data,) = guard.send(1.0, boundary_pb2.BoundaryStatus(middle_step=3), "global")
    assert boundary_pb2.CrossBoundaryEnvelope.FromString(data).boundary_id == "b0"
    # Ingress: crafted bytes that list members in it are refused and recorded.
    rec = Recorder()
    ingress = IngressGuard("global", TERMS, rec)
    crafted = envelope("d0,d1,d2", status=boundary_pb2.BoundaryStatus(middle_step=1))
    with pytest.raises(ContractViolation, match="the channel's is 'b0'"):
        ingress.receive(1.0, crafted.SerializeToString(), "boundary.b0")
    assert rec.records[-1]["outcome"] == "refused"


def test_tensor_smuggled_into_a_string_field_is_refused(device_state):
    rec = Recorder()
    ingress = IngressGuard("global", TERMS, rec)
    smuggled = device_state["delta"][:64].numpy().tobytes().hex()
    crafted = envelope(smuggled, status=boundary_pb2.BoundaryStatus(middle_step=1))
    with pytest.raises(ContractViolation, match="exceeds its declared limit of 128 B"):
        ingress.receive(1.0, crafted.SerializeToString(), "boundary.b0")
    assert ingress.refused == 1 and rec.records[-1]["outcome"] == "refused"


def test_ingress_mirror_refuses_bytes_that_bypassed_an_egress_guard(device_state):
    rec = Recorder()
    ingress = IngressGuard("global", Terms(2, device_state["delta"].numel()), rec)
    delta = encode(device_state["delta"], tensor_pb2.DEVICE)
    rogue = envelope(boundary_delta=boundary_pb2.BoundaryDelta(outer_step=1, delta=delta))
    with pytest.raises(ContractViolation, match="provenance DEVICE"):
        ingress.receive(2.0, rogue.SerializeToString(), "boundary.b0")
    assert rec.records[-1]["outcome"] == "refused" and rec.records[-1]["direction"] == "in"
    with pytest.raises(ContractViolation, match="undecodable"):
        ingress.receive(2.0, b"\xff\xff\xff", "boundary.b0")


def test_allowed_messages_cross_and_their_exact_wire_bytes_are_counted():
    model = model_with_aggregate()
    rec = Recorder()
    guard = EgressGuard("boundary.b0", TERMS, rec, model.ledger)
    body = boundary_pb2.BoundaryDelta(
        outer_step=1, tokens=64, middle_step=1, contributors=2, delta=model.delta_payload()
    )
    (data,) = guard.send(1.0, body, "global")
    env = boundary_pb2.CrossBoundaryEnvelope.FromString(data)
    assert env.boundary_id == "b0" and env.WhichOneof("body") == "boundary_delta"
    assert guard.bytes_total == len(data) == env.ByteSize()
    assert (
        rec.records[-1]["outcome"] == "sent" and rec.records[-1]["message_type"] == "echelon.v1.BoundaryDelta"
    )
    assert rec.records[-1]["wire_bytes"] == len(data) and rec.records[-1]["quorum"] == 2
    back = IngressGuard("global", TERMS, Recorder()).receive(1.0, data, "boundary.b0")
    assert back == body
    # The envelope carried the sender's chain head; the receiver keeps it to countersign.
    assert env.audit_head.seq == 0


def test_boundary_aggregates_are_minted_only_above_quorum():
    model = BoundaryModel(torch.zeros(4), min_quorum=3)
    seal = model.open_round(1, 2)
    with pytest.raises(QuorumNotMet):
        model.apply_aggregate(seal.seal(np.ones(4), 2.0, 2), lr=1.0)
    assert model.delta_payload() is None  # nothing to send: no aggregate below quorum exists
    with pytest.raises(ValueError, match="minted only by"):
        encode(torch.zeros(4), tensor_pb2.BOUNDARY_AGGREGATE)


def test_a_rogue_boundary_in_a_running_simulation_is_refused_and_the_run_goes_on():
    from echelon.planes.boundary import BoundaryPlane
    from echelon.runner import build_simulation
    from echelon.sansio import Send

    class LeakyBoundary(BoundaryPlane):
        """Tries to ship each device's secure-aggregation traffic straight to the global plane."""

        def receive(self, now, sender, message, data=None):
            actions = super().receive(now, sender, message, data)
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
    assert violations and all(
        "echelon.v1.SecAggMessage (SECURE_AGGREGATION) has no way across" in v["reason"] for v in violations
    )
    assert len(sim.traffic.refused) == len(violations)
    assert "echelon.v1.SecAggMessage" not in sim.cross_boundary_by_type()


def test_large_tensors_cross_as_typed_slices_and_reassemble_exactly():
    from echelon.contract.slicing import MAX_SLICE_BYTES

    n = 3 * MAX_SLICE_BYTES // 4 + 1234  # just over three slices of float32
    terms = Terms(2, n)
    model = model_with_aggregate(n)
    body = boundary_pb2.BoundaryDelta(
        outer_step=4, tokens=9, middle_step=3, contributors=2, delta=model.delta_payload()
    )
    out_rec, in_rec = Recorder(), Recorder()
    frames = EgressGuard("boundary.b0", terms, out_rec, model.ledger).send(1.0, body, "global")
    assert len(frames) == 4
    for f in frames:  # every frame is a typed, bounded message on its own
        part = boundary_pb2.CrossBoundaryEnvelope.FromString(f)
        assert part.WhichOneof("body") == "boundary_delta"
        assert len(part.boundary_delta.delta.data) <= MAX_SLICE_BYTES
    ingress = IngressGuard("global", terms, in_rec)
    results = [ingress.receive(2.0, f, "boundary.b0") for f in frames]
    assert results[:-1] == [None, None, None] and results[-1] == body
    assert out_rec.records[-1]["wire_bytes"] == in_rec.records[-1]["wire_bytes"] == sum(map(len, frames))
    assert out_rec.records[-1]["payload_sha256"] == in_rec.records[-1]["payload_sha256"]
    # Received again, the message is a replay: refused at its first frame.
    with pytest.raises(ContractViolation, match="replayed"):
        ingress.receive(3.0, frames[0], "boundary.b0")
    # A slice out of order is refused, and the partial message discarded.
    frames = EgressGuard("boundary.b0", terms, out_rec, model.ledger).send(1.0, body, "global")
    with pytest.raises(ContractViolation, match="slice at element"):
        ingress.receive(3.0, frames[1], "boundary.b0")
    assert ingress.receive(3.0, frames[0], "boundary.b0") is None


def test_a_replayed_message_is_refused_uncountersigned_even_after_the_receiver_restarts(tmp_path):
    """A frame carrying a chain head its receiver countersigned already from that peer is a replay:
    refused at the door and recorded without a countersignature (so the audit does not blame the
    sender's log); the receiver's log remembers the heads across a reopen."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from echelon.audit.crosscheck import cross_check
    from echelon.audit.log import AuditLog
    from echelon.audit.verify import verify_log
    from tests.audit.runs import BINDING

    keys = {party: Ed25519PrivateKey.generate() for party in ("global", "boundary.b0")}

    def log(party: str, reopen: bool = False) -> AuditLog:
        path = tmp_path / f"{party}.jsonl"
        if reopen:
            return AuditLog.open(path, keys[party])
        return AuditLog.create(path, party, keys[party], "virtual", BINDING, min_quorum=2)

    sender, receiver = log("boundary.b0"), log("global")
    egress = EgressGuard("boundary.b0", TERMS, sender)
    first = egress.send(1.0, boundary_pb2.BoundaryStatus(drift=0.1), "global")[0]
    second = egress.send(2.0, boundary_pb2.BoundaryStatus(drift=0.2), "global")[0]
    ingress = IngressGuard("global", TERMS, receiver)
    assert ingress.receive(1.5, first, "boundary.b0") is not None
    with pytest.raises(ContractViolation, match=r"a replayed message: boundary\.b0's chain head at seq 1"):
        ingress.receive(1.6, first, "boundary.b0")
    assert ingress.receive(2.5, second, "boundary.b0") is not None
    with pytest.raises(ContractViolation, match="replayed"):  # an older one, replayed later
        ingress.receive(2.6, first, "boundary.b0")
    receiver.close()

    receiver = log("global", reopen=True)  # a restarted receiver remembers what it countersigned
    ingress = IngressGuard("global", TERMS, receiver)
    with pytest.raises(ContractViolation, match="chain head at seq 2 was countersigned already"):
        ingress.receive(3.0, second, "boundary.b0")
    third = egress.send(4.0, boundary_pb2.BoundaryStatus(drift=0.3), "global")[0]
    assert ingress.receive(4.5, third, "boundary.b0") is not None
    for party_log in (sender, receiver):
        party_log.close()

    reports = {p: verify_log(tmp_path / f"{p}.jsonl", keys[p].public_key(), p) for p in keys}
    refused = reports["global"].refused
    assert len(refused) == 3 and all(f.record["peer_seq"] is None for f in refused)
    assert not reports["global"].violations and not cross_check(reports).violations


def test_a_forged_head_ahead_of_the_senders_log_does_not_lock_the_sender_out():
    """Heads are refused when seen before, not when lower than the highest: a head forged far
    ahead (which the audit flags, the sender's log holding no such record) cannot make the
    sender's genuine later messages look like replays at the door."""
    out_rec, in_rec = Recorder(), Recorder()
    egress = EgressGuard("boundary.b0", TERMS, out_rec)
    ingress = IngressGuard("global", TERMS, in_rec)
    forged = boundary_pb2.CrossBoundaryEnvelope.FromString(
        egress.send(1.0, boundary_pb2.BoundaryStatus(drift=0.1), "global")[0]
    )
    forged.audit_head.seq = 1 << 40
    assert ingress.receive(1.5, forged.SerializeToString(), "boundary.b0") is not None
    genuine = egress.send(2.0, boundary_pb2.BoundaryStatus(drift=0.2), "global")[0]
    assert ingress.receive(2.5, genuine, "boundary.b0") is not None
