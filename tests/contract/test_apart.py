"""A tensor's data beside its message: minted apart, sent apart, received apart, digested once.

The route a boundary's Delta_b takes without its data ever entering a protobuf message: the
ledger mints header and data (`BoundaryModel.mint`), the egress guard takes the data beside the
body, the ingress guard gives it back beside the body (`receive_apart`). Data that does not
match its header, or that the ledger did not mint, is refused like data inside the message.
"""

from __future__ import annotations

import functools
import hashlib
import os
import select
import signal

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from echelon.contract.guard import ContractViolation
from echelon.contract.policy import Terms
from echelon.contract.slicing import BACKGROUND_HASH_BYTES, MAX_SLICE_BYTES, WireDigest, wire_digest
from echelon.v1 import boundary_pb2
from tests.contract.kit import boundary_guards, model_with_aggregate

N = 2 * MAX_SLICE_BYTES // 4 + 99  # three slices of 4-byte elements


def _setup(n: int = N):
    model = model_with_aggregate(n)
    minted = model.mint(contributors=2)
    body = boundary_pb2.BoundaryDelta(outer_step=1, tokens=5, contributors=2, delta=minted.header)
    return model, minted, body, *boundary_guards(model, Terms(2, n, boundaries=2))


def test_data_sent_apart_arrives_apart_and_as_the_message_it_would_be_inside():
    _, minted, body, egress, out, ingress, into = _setup()
    frames = list(egress.stream(1.0, body, "global", minted.data))
    inside = boundary_pb2.BoundaryDelta()
    inside.CopyFrom(body)
    inside.delta.data = minted.data
    results = [ingress.receive_apart(2.0, f, "boundary.b0") for f in frames]
    assert results[:-1] == [None] * (len(frames) - 1)
    whole = results[-1]
    assert whole.envelope.boundary_delta == body and bytes(whole.data) == minted.data
    assert whole.message().boundary_delta == inside  # the same bytes, parsed
    assert out.records[-1]["payload_sha256"] == into.records[-1]["payload_sha256"] == wire_digest(frames)
    assert out.records[-1]["wire_bytes"] == into.records[-1]["wire_bytes"] == sum(map(len, frames))


def test_data_apart_and_data_inside_cross_as_the_same_frames():
    _, minted, body, egress, out, *_ = _setup()
    apart = list(egress.stream(1.0, body, "global", minted.data))
    inside = boundary_pb2.BoundaryDelta()
    inside.CopyFrom(body)
    inside.delta.data = minted.data
    out.records.pop()  # the same chain head again
    assert list(egress.stream(1.0, inside, "global")) == apart


@pytest.mark.parametrize("cut", [-4, -1, 1, 4])
def test_data_apart_that_does_not_match_its_header_is_refused_and_recorded(cut):
    _, minted, body, egress, out, *_ = _setup()
    data = minted.data[:cut] if cut < 0 else minted.data + bytes(cut)
    with pytest.raises(ContractViolation, match="not numel"):
        egress.stream(1.0, body, "global", data)
    assert out.records[-1]["outcome"] == "refused"


def test_data_apart_beside_a_tensor_holding_data_or_beside_no_tensor_is_refused():
    _, minted, body, egress, out, *_ = _setup()
    inside = boundary_pb2.BoundaryDelta()
    inside.CopyFrom(body)
    inside.delta.data = minted.data
    with pytest.raises(ContractViolation, match="holds data of its own"):
        egress.stream(1.0, inside, "global", minted.data)
    with pytest.raises(ContractViolation, match="holds no tensor"):
        egress.stream(1.0, boundary_pb2.BoundaryDelta(outer_step=1), "global", minted.data)
    assert [r["outcome"] for r in out.records] == ["refused", "refused"]


def test_data_apart_the_ledger_did_not_mint_is_refused_though_every_byte_but_one_matches():
    _, minted, body, egress, out, *_ = _setup()
    forged = bytearray(minted.data)
    forged[-1] ^= 1
    with pytest.raises(ContractViolation, match="did not mint"):
        egress.stream(1.0, body, "global", bytes(forged))
    egress.stream(1.0, body, "global", bytes(minted.data))  # equal bytes, another object: minted
    assert [r["outcome"] for r in out.records] == ["refused", "sent"]


def test_a_minted_header_with_another_claim_is_refused():
    _, minted, body, egress, *_ = _setup()
    body.delta.contributors = 3  # a claim the ledger did not mint
    with pytest.raises(ContractViolation, match="did not mint"):
        egress.stream(1.0, body, "global", minted.data)


@pytest.mark.parametrize("k", [1, 2])
def test_a_continuation_slice_with_one_byte_changed_outside_its_data_is_checked_and_refused(k):
    """A later slice that is not byte for byte the next slice takes the full path: parsed, checked."""
    _, minted, body, egress, _, ingress, into = _setup()
    frames = list(egress.stream(1.0, body, "global", minted.data))
    frame = bytearray(frames[k])
    frame[-3] ^= 0xFF  # in the suffix: the audit head or the boundary id
    assert ingress.receive_apart(2.0, frames[0], "boundary.b0") is None
    if k == 2:
        assert ingress.receive_apart(2.0, frames[1], "boundary.b0") is None
    with pytest.raises(ContractViolation):
        ingress.receive_apart(2.0, bytes(frame), "boundary.b0")
    assert into.records[-1]["outcome"] == "refused"


def test_a_replayed_slice_is_refused():
    _, minted, body, egress, _, ingress, into = _setup()
    frames = list(egress.stream(1.0, body, "global", minted.data))
    ingress.receive_apart(2.0, frames[0], "boundary.b0")
    ingress.receive_apart(2.0, frames[1], "boundary.b0")
    with pytest.raises(ContractViolation, match="expected"):
        ingress.receive_apart(2.0, frames[1], "boundary.b0")
    assert into.records[-1]["outcome"] == "refused"


@functools.cache
def _two_slices() -> list[bytes]:
    _, minted, body, egress, *_ = _setup(MAX_SLICE_BYTES // 4 + 7)
    return list(egress.stream(1.0, body, "global", minted.data))


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_the_wire_digest_changes_with_any_byte_of_any_frame(data):
    frames = _two_slices()
    k = data.draw(st.integers(0, len(frames) - 1))
    i = data.draw(st.integers(0, len(frames[k]) - 1))
    changed = bytearray(frames[k])
    changed[i] ^= data.draw(st.integers(1, 255))
    assert wire_digest(frames[:k] + [bytes(changed)] + frames[k + 1 :]) != wire_digest(frames)


def test_a_frame_split_elsewhere_digests_otherwise():
    """The lengths of prefix, data and suffix are in the digest: moving bytes between them shows."""
    a, b = WireDigest(), WireDigest()
    a.split(b"abcdef", (2, 4))
    b.split(b"abcdef", (2, 5))
    assert a.hexdigest() != b.hexdigest() and a.nbytes == b.nbytes == 6


def test_data_hashed_on_the_hasher_thread_keeps_its_order_with_data_hashed_inline():
    """Slices at or above BACKGROUND_HASH_BYTES go to the hasher thread, smaller ones are hashed
    inline: the data digest is still the SHA-256 of all of it, in order."""
    rng = np.random.default_rng(3)
    sizes = [10, BACKGROUND_HASH_BYTES, 5, 3 * BACKGROUND_HASH_BYTES + 1, 0, BACKGROUND_HASH_BYTES - 1, 7]
    parts = [rng.bytes(n) for n in sizes]
    digest = WireDigest()
    for part in parts:
        digest.frame(b"", len(part), b"")
        digest.data(part)
    inline = WireDigest()
    for part in parts:
        inline.frame(b"", len(part), b"")
    assert digest.hexdigest() == inline.hexdigest(hashlib.sha256(b"".join(parts)).digest())


def test_a_forked_child_hashes_with_a_hasher_of_its_own():
    """A child forked after the parent's hasher thread started has none: it must not wait for it."""
    big = b"x" * (2 * BACKGROUND_HASH_BYTES)
    parent = WireDigest()
    parent.data(big)
    expected = parent.hexdigest()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: digest again and report
        child = WireDigest()
        child.data(big)
        os.write(write, child.hexdigest().encode())
        os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 30)
    got = os.read(read, 100).decode() if ready else "the child hung"
    os.close(read)
    os.waitpid(pid, 0) if ready else os.kill(pid, signal.SIGKILL)
    assert got == expected
