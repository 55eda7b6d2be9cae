"""Every route an adversarial review found around the guard, sent as the attack: each is refused
and recorded, and nothing reaches the receiving plane (issue 12, "Routes that got through").

Against the code before this change each of these got through (or crashed the receiver instead
of being refused); the tests assert the refusal, its record, and that the run goes on.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from google.protobuf.internal import encoder

from echelon.assembly import make_boundary_plane
from echelon.config import OuterConfig, RunConfig, SyncConfig
from echelon.contract.guard import ContractViolation, EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.contract.provenance import AggregateResult, BoundaryModel, UnsealedResult
from echelon.contract.rules import walk_problems
from echelon.contract.slicing import MAX_SLICE_BYTES
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane
from echelon.sansio import Emit
from echelon.tensors import encode, payload
from echelon.v1 import boundary_pb2, device_pb2, secagg_pb2, tensor_pb2
from tests.contract.kit import DIM, TERMS, Recorder, boundary_guards, envelope, model_with_aggregate, ring
from tests.helpers import small_run

DELTA = np.random.default_rng(0).standard_normal(20_000).astype("<f4")  # an 80 KB device delta


def _field(number: int, payload_bytes: bytes) -> bytes:
    """A length-delimited protobuf field, as a hand-written encoder would emit it."""
    return encoder._VarintBytes(number << 3 | 2) + encoder._VarintBytes(len(payload_bytes)) + payload_bytes


def _refused_in(frame: bytes, match: str, party: str = "global", peer: str = "boundary.b0") -> Recorder:
    rec = Recorder()
    guard = IngressGuard(party, TERMS, rec)
    with pytest.raises(ContractViolation, match=re.escape(match)):
        guard.receive(1.0, frame, peer)
    assert rec.records[-1]["outcome"] == "refused" and match in rec.records[-1]["reason"]
    assert guard.bytes_total == 0 and guard.refused == 1
    return rec


def _refused_out(body, match: str, party: str = "boundary.b0", peer: str = "global", ledger=None) -> Recorder:
    rec = Recorder()
    guard = EgressGuard(party, TERMS, rec, ledger)
    with pytest.raises(ContractViolation, match=re.escape(match)):
        guard.send(1.0, body, peer)
    assert rec.records[-1]["outcome"] == "refused" and match in rec.records[-1]["reason"]
    assert guard.bytes_total == 0
    return rec


def _outer(body_field: str | None = None, step: int = 1, **secagg) -> boundary_pb2.CrossBoundaryEnvelope:
    if body_field == "request":
        return envelope(outer_aggregation=boundary_pb2.OuterAggregation(outer_step=step, **secagg))
    message = secagg_pb2.SecAggMessage(round_id=step, **secagg)
    return envelope(outer_aggregation=boundary_pb2.OuterAggregation(outer_step=step, secagg=message))


# -- route 1: unknown protobuf fields -------------------------------------------------------------


def test_a_device_delta_riding_as_unknown_fields_in_boundary_status_is_refused():
    status = boundary_pb2.BoundaryStatus(middle_step=1).SerializeToString() + _field(99, DELTA.tobytes())
    head = envelope(status=boundary_pb2.BoundaryStatus()).audit_head.SerializeToString()
    frame = _field(1, b"b0") + _field(2, head) + _field(10, status)
    assert len(frame) > 80_000
    _refused_in(frame, "unknown fields [99]")


def test_a_device_tensor_as_unknown_fields_in_cadence_update_is_refused_at_a_boundary():
    tensor = encode(DELTA, tensor_pb2.DEVICE).SerializeToString()
    cadence = boundary_pb2.CadenceUpdate(interval=3).SerializeToString() + _field(7, tensor)
    head = envelope(cadence=boundary_pb2.CadenceUpdate()).audit_head.SerializeToString()
    frame = _field(1, b"b0") + _field(2, head) + _field(14, cadence)
    _refused_in(frame, "unknown fields [7]", party="boundary.b0", peer="global")


def test_a_body_carrying_unknown_fields_is_refused_at_egress():
    # A plane (or a strategy) that parsed attacker bytes into its status would forward them.
    status = boundary_pb2.BoundaryStatus(middle_step=1)
    status.MergeFromString(_field(99, DELTA.tobytes()))
    _refused_out(status, "unknown fields [99]")


def test_a_second_encoding_of_a_valid_message_is_refused():
    # Fields out of order (or repeated, last one winning) decode to a valid message, and the
    # choice of encoding is a covert channel: only the canonical encoding crosses.
    valid = envelope(status=boundary_pb2.BoundaryStatus(middle_step=1))
    head, body = valid.audit_head.SerializeToString(), valid.status.SerializeToString()
    reordered = _field(10, body) + _field(2, head) + _field(1, b"b0")
    assert boundary_pb2.CrossBoundaryEnvelope.FromString(reordered) == valid
    _refused_in(reordered, "not the canonical encoding")


# -- route 2: nested messages -------------------------------------------------------------------------


def test_the_flow_class_of_every_nested_message_is_checked():
    # Nothing DEVICE_LOCAL is reachable from the envelope's schema (test_schema checks that); the
    # walk refuses one wherever it would sit.
    inner = device_pb2.DeviceEnvelope(plain_input=device_pb2.PlainInput(weighted_delta=encode(DELTA, 1)))
    problems = walk_problems(inner)
    assert any(
        "message.plain_input: echelon.v1.PlainInput has flow class DEVICE_LOCAL" in p for p in problems
    )


def test_a_delta_cut_into_many_ciphertexts_in_the_outer_round_is_refused():
    chunks = [DELTA.tobytes()[i : i + 160] for i in range(0, 80_000, 160)]
    shares = secagg_pb2.SecAggShareKeys(
        shares=[secagg_pb2.SecAggEncryptedShare(index=2, ciphertext=c) for c in chunks]
    )
    _refused_in(_outer(share_keys=shares).SerializeToString(), "500 entries in a round of 2 boundaries")
    # Even one ciphertext must be exactly a sealed share pair.
    short = secagg_pb2.SecAggShareKeys(
        shares=[secagg_pb2.SecAggEncryptedShare(index=2, ciphertext=b"x" * 100)]
    )
    _refused_in(_outer(share_keys=short).SerializeToString(), "must be exactly 160 B")


def test_a_member_index_list_is_refused_in_the_outer_round():
    members = secagg_pb2.SecAggUnmaskRequest(survivors=list(range(1, 500)))
    # From a boundary: a server's message it may never send.
    _refused_in(_outer(unmask_request=members).SerializeToString(), "may not send unmask_request")
    # From the global plane: more entries than boundaries, and indices naming no boundary.
    _refused_in(
        _outer(unmask_request=members).SerializeToString(),
        "499 entries in a round of 2 boundaries",
        party="boundary.b0",
        peer="global",
    )


@pytest.mark.parametrize(
    ("masked", "match"),
    [
        (payload(DELTA[:DIM], tensor_pb2.BOUNDARY_AGGREGATE, 2), "dtype FLOAT32 may not cross here"),
        (ring(16 * DIM), f"a tensor of {16 * DIM} elements where the model has {DIM}"),
        (ring(DIM, contributors=1), "below the quorum"),
        (dataclasses.replace, "provenance"),  # replaced below by a DEVICE-labelled ring
    ],
    ids=["float32", "16x-dim", "below-quorum", "device"],
)
def test_the_outer_round_accepts_only_ring_data_of_the_model_dimension(masked, match):
    if masked is dataclasses.replace:
        masked = ring(DIM)
        masked.provenance = tensor_pb2.DEVICE
    body = secagg_pb2.SecAggMaskedInput(masked=masked)
    _refused_in(_outer(masked_input=body).SerializeToString(), match)
    accepted = IngressGuard("global", TERMS, Recorder()).receive(
        1.0,
        _outer(masked_input=secagg_pb2.SecAggMaskedInput(masked=ring(DIM))).SerializeToString(),
        "boundary.b0",
    )
    assert accepted.secagg.masked_input.masked.numel == DIM


# -- route 3: provenance is bound to the rounds that produced it ----------------------------------


def test_a_hand_minted_boundary_aggregate_is_refused_at_egress():
    minted = payload(DELTA[:DIM], tensor_pb2.BOUNDARY_AGGREGATE, 5)  # a label anyone can write
    body = boundary_pb2.BoundaryDelta(outer_step=1, contributors=5, delta=minted)
    model = model_with_aggregate()  # this boundary did mint an aggregate, but not that one
    _refused_out(body, "did not mint this aggregate", ledger=model.ledger)
    with pytest.raises(ValueError, match="minted only by"):
        encode(DELTA, tensor_pb2.BOUNDARY_AGGREGATE)
    # The model's own payload crosses.
    egress, _, ingress, _ = boundary_guards(model)
    body = boundary_pb2.BoundaryDelta(outer_step=1, contributors=2, delta=model.delta_payload())
    assert ingress.receive(2.0, egress.send(1.0, body, "global")[0], "boundary.b0") == body


def test_one_device_delta_laundered_through_apply_aggregate_is_refused():
    model = BoundaryModel(torch.zeros(DIM), min_quorum=2)
    device_delta = DELTA[:DIM].astype("f8")
    with pytest.raises(UnsealedResult):
        model.apply_aggregate(AggregateResult(1, device_delta, 1.0, 5, b""), lr=1.0)
    seal = model.open_round(1, invited=2)
    honest = seal.seal(np.ones(DIM), 2.0, 2)
    with pytest.raises(UnsealedResult):  # a genuine result, its contributor count raised
        model.apply_aggregate(dataclasses.replace(honest, contributors=5), lr=1.0)
    honest.weighted_sum[:] = device_delta  # a genuine result, its content swapped
    with pytest.raises(UnsealedResult):
        model.apply_aggregate(honest, lr=1.0)
    with pytest.raises(ValueError, match="from a round of 2"):
        seal.seal(device_delta, 1.0, 5)
    assert model.delta_payload() is None  # nothing was folded in


def test_a_sealed_result_applies_once():
    model = BoundaryModel(torch.zeros(DIM), min_quorum=2)
    result = model.open_round(1, 2).seal(np.ones(DIM), 2.0, 2)
    model.apply_aggregate(result, lr=1.0)
    with pytest.raises(UnsealedResult, match="replayed"):
        model.apply_aggregate(result, lr=1.0)


@pytest.mark.parametrize(
    ("party", "peer", "body", "match"),
    [
        (
            "boundary.b0",
            "global",
            boundary_pb2.GlobalReference(outer_step=1, parameters=encode(DELTA[:DIM], tensor_pb2.GLOBAL)),
            "a boundary party may not send echelon.v1.GlobalReference",
        ),
        ("boundary.b0", "global", boundary_pb2.SyncRequest(outer_step=1), "may not send"),
        ("global", "boundary.b0", boundary_pb2.BoundaryStatus(middle_step=1), "a global party may not send"),
        ("global", "boundary.b0", boundary_pb2.BoundaryDelta(outer_step=1), "a global party may not send"),
        ("boundary.b0", "boundary.b1", boundary_pb2.BoundaryStatus(), "no channel joins them"),
    ],
    ids=["boundary-sends-global", "boundary-sends-sync", "global-sends-status", "global-sends-delta", "b2b"],
)
def test_each_party_sends_only_what_its_role_may_send(party, peer, body, match):
    _refused_out(body, match, party=party, peer=peer)


def test_an_aggregate_of_sixteen_times_the_model_dimension_is_refused():
    model = model_with_aggregate(16 * DIM)  # honestly minted, for another model
    body = boundary_pb2.BoundaryDelta(outer_step=1, contributors=2, delta=model.delta_payload())
    _refused_out(body, f"a tensor of {16 * DIM} elements where the model has {DIM}", ledger=model.ledger)


def test_fragments_must_match_the_outer_step():
    terms = Terms(2, 12, fragments=3, boundaries=2)
    rec = Recorder()
    guard = IngressGuard("boundary.b0", terms, rec)
    bad = envelope(sync_request=boundary_pb2.SyncRequest(outer_step=2, fragment=7, fragments=9))
    with pytest.raises(ContractViolation, match="outer step 2 synchronises fragment 1 of 3"):
        guard.receive(1.0, bad.SerializeToString(), "global")
    reference = boundary_pb2.GlobalReference(
        outer_step=1, fragment=1, fragments=3, parameters=encode(np.zeros(5), tensor_pb2.GLOBAL)
    )
    with pytest.raises(ContractViolation, match="fragment 1 of 3 has 4"):
        guard.receive(1.0, envelope(global_reference=reference).SerializeToString(), "global")


# -- route 4: bad input is a recorded refusal, never a crash -----------------------------------------


def _undeclared_provenance() -> tensor_pb2.TensorPayload:
    t = ring(DIM)
    t.dtype, t.data, t.provenance = tensor_pb2.FLOAT32, bytes(4 * DIM), 7
    return t


def test_an_undeclared_provenance_is_a_recorded_refusal_in_and_out():
    body = boundary_pb2.BoundaryDelta(outer_step=1, contributors=2, delta=_undeclared_provenance())
    rec = _refused_in(envelope(boundary_delta=body).SerializeToString(), "provenance 7 is not declared")
    assert rec.records[-1]["provenance"] == "UNDECLARED_7"
    _refused_out(body, "provenance 7 is not declared")


def test_slices_of_two_message_types_in_a_row_are_refused():
    n = MAX_SLICE_BYTES // 2  # two slices of 4-byte elements
    terms = Terms(2, n)
    model = model_with_aggregate(n)
    delta = boundary_pb2.BoundaryDelta(outer_step=1, contributors=2, delta=model.delta_payload())
    delta_first, _ = EgressGuard("boundary.b0", terms, Recorder(), model.ledger).send(1.0, delta, "global")
    masked = secagg_pb2.SecAggMessage(round_id=1, masked_input=secagg_pb2.SecAggMaskedInput(masked=ring(n)))
    outer = boundary_pb2.OuterAggregation(outer_step=1, secagg=masked)
    _, outer_second = EgressGuard("boundary.b0", terms, Recorder()).send(1.0, outer, "global")
    rec = Recorder()
    ingress = IngressGuard("global", terms, rec)
    assert ingress.receive(1.0, delta_first, "boundary.b0") is None
    with pytest.raises(ContractViolation, match="a slice of another message"):
        ingress.receive(1.0, outer_second, "boundary.b0")
    assert ingress.receive(1.0, delta_first, "boundary.b0") is None
    with pytest.raises(ContractViolation, match="unsliced message arrived in the middle"):
        ingress.receive(
            1.0, envelope(status=boundary_pb2.BoundaryStatus()).SerializeToString(), "boundary.b0"
        )
    assert [r["outcome"] for r in rec.records] == ["refused", "refused"]


def test_a_slice_announcing_a_huge_whole_is_refused_before_anything_is_buffered():
    data = bytes(MAX_SLICE_BYTES)
    slice_ = tensor_pb2.TensorPayload(
        provenance=tensor_pb2.BOUNDARY_AGGREGATE,
        contributors=2,
        dtype=tensor_pb2.FLOAT32,
        numel=len(data) // 4,
        data=data,
        offset=0,
        total_numel=1 << 40,
    )
    body = boundary_pb2.BoundaryDelta(outer_step=1, contributors=2, delta=slice_)
    _refused_in(envelope(boundary_delta=body).SerializeToString(), f"where the model has {DIM}")


def test_out_of_range_fragments_and_long_deltas_are_refused_by_the_planes():
    cfg = RunConfig.model_validate(small_run())
    plane = make_boundary_plane(cfg, cfg.boundaries[0], 4)
    plane.receive(
        0.0, "global", boundary_pb2.GlobalReference(outer_step=0, parameters=encode(np.zeros(4), 3))
    )
    for message in (
        boundary_pb2.SyncRequest(outer_step=1, fragment=7, fragments=9),
        boundary_pb2.GlobalReference(outer_step=1, parameters=encode(np.zeros(5), tensor_pb2.GLOBAL)),
        boundary_pb2.CadenceUpdate(interval=0),
    ):
        (refusal,) = plane.receive(1.0, "global", message)
        assert isinstance(refusal, Emit) and refusal.kind == "refused"
    (refusal,) = plane.receive(1.0, "device/d0", boundary_pb2.SyncRequest(outer_step=1))
    assert "may not come from device/d0" in refusal.fields["reason"]
    glob = GlobalPlane(
        ["b/x", "b/y"], torch.zeros(4), OuterConfig(), Cadence(SyncConfig(interval=1), False), 60
    )
    glob.start(0.0)
    glob.receive(0.0, "b/x", boundary_pb2.BoundaryStatus(middle_step=1))
    longer = boundary_pb2.BoundaryDelta(
        outer_step=1, tokens=1, middle_step=1, contributors=2, delta=payload(np.zeros(5), 2, 2)
    )
    (refusal,) = glob.receive(0.0, "b/x", longer)
    assert refusal.kind == "refused" and "5 elements where 4" in refusal.fields["reason"]
    assert glob.outer_step == 0 and "b/x" not in glob._reported
