"""5,000 mutated envelopes from an authenticated peer: every one is delivered whole and valid, or
refused and recorded; neither the guard nor the plane behind it ever raises anything else."""

from __future__ import annotations

import numpy as np
import torch

from echelon.assembly import make_boundary_plane
from echelon.config import OuterConfig, RunConfig, SyncConfig
from echelon.contract.guard import ContractViolation, EgressGuard, IngressGuard
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane
from echelon.secagg import SecAggPlusAggregator
from echelon.tensors import encode
from echelon.v1 import boundary_pb2, device_pb2, secagg_pb2, tensor_pb2
from tests.contract.kit import TERMS, Recorder, model_with_aggregate, ring
from tests.helpers import small_run

MUTATIONS = 5000


def _boundary_frames() -> list[bytes]:
    """Every kind of frame a boundary sends, as its egress guard produced them."""
    model = model_with_aggregate()
    guard = EgressGuard("boundary.b0", TERMS, Recorder(), model.ledger)
    secagg = [
        secagg_pb2.SecAggMessage(
            round_id=1,
            advertise_keys=secagg_pb2.SecAggAdvertiseKeys(
                cipher_public_key=bytes(range(32)), mask_public_key=bytes(32), seed_commitment=bytes(32)
            ),
        ),
        secagg_pb2.SecAggMessage(
            round_id=1,
            share_keys=secagg_pb2.SecAggShareKeys(
                shares=[secagg_pb2.SecAggEncryptedShare(index=2, ciphertext=bytes(160))]
            ),
        ),
        secagg_pb2.SecAggMessage(round_id=1, masked_input=secagg_pb2.SecAggMaskedInput(masked=ring(64))),
        secagg_pb2.SecAggMessage(
            round_id=1,
            unmask_response=secagg_pb2.SecAggUnmaskResponse(
                seed_shares=[secagg_pb2.SecAggShare(owner=1, value=bytes(66))]
            ),
        ),
    ]
    bodies = [
        boundary_pb2.BoundaryStatus(middle_step=1, drift=0.3, update_norm=0.1, tokens=64, contributors=2),
        boundary_pb2.BoundaryDelta(
            outer_step=1, tokens=64, middle_step=1, contributors=2, delta=model.delta_payload()
        ),
        boundary_pb2.BoundaryDelta(outer_step=1, tokens=64, middle_step=1),
        *(boundary_pb2.OuterAggregation(outer_step=1, secagg=m) for m in secagg),
    ]
    return [f for body in bodies for f in guard.send(1.0, body, "global")]


def _global_frames() -> list[bytes]:
    guard = EgressGuard("global", TERMS, Recorder())
    reference = encode(np.linspace(-1, 1, 64), tensor_pb2.GLOBAL)
    bodies = [
        boundary_pb2.GlobalReference(outer_step=1, parameters=reference),
        boundary_pb2.SyncRequest(outer_step=1),
        boundary_pb2.CadenceUpdate(interval=4),
        boundary_pb2.OuterAggregation(
            outer_step=1, request=device_pb2.AggregationRequest(round_id=1, weight=0.5, participants=2)
        ),
        boundary_pb2.OuterAggregation(
            outer_step=1,
            secagg=secagg_pb2.SecAggMessage(
                round_id=1, unmask_request=secagg_pb2.SecAggUnmaskRequest(dropped=[2], survivors=[1])
            ),
        ),
    ]
    return [f for body in bodies for f in guard.send(1.0, body, "boundary.b0")]


def _mutate(frame: bytes, others: list[bytes], rng: np.random.Generator) -> bytes:
    data = bytearray(frame)
    kind = rng.integers(6)
    if kind == 0:  # flip bytes
        for i in rng.integers(0, len(data), rng.integers(1, 4)):
            data[i] ^= int(rng.integers(1, 256))
    elif kind == 1:  # truncate
        del data[int(rng.integers(0, len(data))) :]
    elif kind == 2:  # insert random bytes
        at = int(rng.integers(0, len(data) + 1))
        data[at:at] = rng.bytes(int(rng.integers(1, 12)))
    elif kind == 3:  # splice two frames
        other = others[int(rng.integers(len(others)))]
        data = data[: int(rng.integers(0, len(data)))] + other[int(rng.integers(0, len(other))) :]
    elif kind == 4:  # a varint field appended (field numbers 1..2000, possibly unknown)
        number = int(rng.integers(1, 2000))
        data += bytes([(number << 3) & 0x7F | 0x80, number >> 4, int(rng.integers(0, 128))])
    else:  # overwrite a run of bytes with a large varint
        at = int(rng.integers(0, len(data)))
        data[at : at + 5] = b"\xff\xff\xff\xff\x0f"
    return bytes(data)


def _fuzz(frames: list[bytes], party: str, peer: str, deliver) -> tuple[int, int]:
    rng = np.random.default_rng(12)
    rec = Recorder()
    guard = IngressGuard(party, TERMS, rec)
    refused = delivered = 0
    for i in range(MUTATIONS):
        frame = _mutate(frames[i % len(frames)], frames, rng)
        try:
            body = guard.receive(float(i), frame, peer)
        except ContractViolation:
            refused += 1
            continue
        if body is not None:
            delivered += 1
            deliver(float(i), body)
    assert guard.refused == refused == sum(r["outcome"] == "refused" for r in rec.records)
    assert all(r["reason"] for r in rec.records if r["outcome"] == "refused")
    return refused, delivered


def test_mutated_boundary_envelopes_never_crash_the_global_guard_or_plane():
    plane = GlobalPlane(
        ["boundary/b0", "boundary/b1"],
        torch.zeros(64),
        OuterConfig(),
        Cadence(SyncConfig(interval=1), False),
        60,
        outer_aggregator=SecAggPlusAggregator(threshold=2, min_quorum=1),
    )
    plane.start(0.0)
    refused, delivered = _fuzz(
        _boundary_frames(), "global", "boundary.b0", lambda now, body: plane.receive(now, "boundary/b0", body)
    )
    assert refused > MUTATIONS // 2 and delivered > 0


def test_mutated_global_envelopes_never_crash_a_boundary_guard_or_plane():
    cfg = RunConfig.model_validate(small_run(strategy="echelon+sa"))
    plane = make_boundary_plane(cfg, cfg.boundaries[0], 64)
    refused, delivered = _fuzz(
        _global_frames(), "boundary.b0", "global", lambda now, body: plane.receive(now, "global", body)
    )
    assert refused > MUTATIONS // 2 and delivered > 0
