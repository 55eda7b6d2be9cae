"""The guards hold a tensor's data apart from its message (`echelon.contract.slicing`): the frames
they build and the frames they accept must be exactly those of protobuf's own serialisation, and
the guards must refuse exactly what a check on the whole parsed message refuses."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from echelon.contract.guard import ContractViolation, EgressGuard
from echelon.contract.policy import Terms
from echelon.contract.rules import schema_problems, tensors
from echelon.contract.slicing import (
    DATA,
    MAX_SLICE_BYTES,
    at,
    data_path,
    encode_around,
    hold_apart,
    slice_envelope,
    take_data,
    wire_digest,
)
from echelon.tensors import ITEMSIZE, encode
from echelon.v1 import boundary_pb2, secagg_pb2, tensor_pb2
from tests.contract.kit import Recorder, boundary_guards, model_with_aggregate, ring

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
# Data lengths around the varint boundaries of every enclosing length.
LENGTHS = st.one_of(st.sampled_from([0, 1, 127, 128, 129, 16_383, 16_384, 70_000]), st.integers(0, 600))


@st.composite
def tensor_payloads(draw) -> tensor_pb2.TensorPayload:
    n = draw(LENGTHS)
    return tensor_pb2.TensorPayload(
        provenance=draw(st.integers(0, 7)),
        contributors=draw(U32),
        dtype=draw(st.integers(0, 6)),
        numel=draw(U64),
        data=bytes(range(256)) * (n // 256) + bytes(n % 256),
        offset=draw(U64),
        total_numel=draw(U64),
    )


@st.composite
def envelopes(draw) -> boundary_pb2.CrossBoundaryEnvelope:
    """A cross-boundary envelope holding a tensor at each place a tensor may sit, any field values."""
    t = draw(tensor_payloads())
    kind = draw(st.sampled_from(["boundary_delta", "global_reference", "outer_aggregation"]))
    if kind == "boundary_delta":
        body = {
            kind: boundary_pb2.BoundaryDelta(
                outer_step=draw(U64), tokens=draw(U64), delta=t, middle_step=draw(U64), contributors=draw(U32)
            )
        }
    elif kind == "global_reference":
        body = {
            kind: boundary_pb2.GlobalReference(
                outer_step=draw(U64),
                parameters=t,
                final=draw(st.booleans()),
                fragment=draw(U32),
                fragments=draw(U32),
            )
        }
    else:
        masked = secagg_pb2.SecAggMaskedInput(masked=t)
        secagg = secagg_pb2.SecAggMessage(round_id=draw(U64), masked_input=masked)
        body = {kind: boundary_pb2.OuterAggregation(outer_step=draw(U64), secagg=secagg)}
    env = boundary_pb2.CrossBoundaryEnvelope(boundary_id=draw(st.text(max_size=40)), **body)
    if draw(st.booleans()):
        env.audit_head.seq, env.audit_head.hash = draw(U64), draw(st.binary(max_size=40))
    return env


def _split(env: boundary_pb2.CrossBoundaryEnvelope):
    """The envelope's data-less copy, its data path and its data."""
    (path, tensor), *_ = tensors(env)
    dataless = boundary_pb2.CrossBoundaryEnvelope()
    dataless.CopyFrom(env)
    at(dataless, data_path(path)[:-1]).ClearField(DATA)
    return dataless, data_path(path), tensor.data


@settings(max_examples=300, deadline=None)
@given(envelopes())
def test_the_encoding_around_the_data_is_the_runtimes_own(env):
    dataless, path, data = _split(env)
    prefix, suffix = encode_around(dataless, path, len(data))
    assert prefix + data + suffix == env.SerializeToString()


@settings(max_examples=300, deadline=None)
@given(envelopes())
def test_a_body_is_copied_whole_but_for_its_data_which_is_read_once(env):
    body = getattr(env, env.WhichOneof("body"))
    before = body.SerializeToString()
    dst = type(body)()
    path, data = hold_apart(body, dst)
    expected = type(body)()
    expected.CopyFrom(body)
    at(expected, path[:-1]).ClearField(DATA)
    assert dst == expected and data == at(body, path[:-1]).data
    assert body.SerializeToString() == before  # the caller's body is left as it was


def _consistent(env: boundary_pb2.CrossBoundaryEnvelope, numel: int, dtype: int) -> None:
    t = tensors(env)[0][1]
    t.dtype, t.numel, t.offset, t.total_numel = dtype, numel, 0, 0
    t.data = bytes(range(256)) * (numel * ITEMSIZE[dtype] // 256) + bytes(numel * ITEMSIZE[dtype] % 256)


def _old_verdict(frame: bytes):
    """What the guard checked before data was held apart: the schema's problems on the parsed
    message, whether the frame is its canonical encoding, and the tensor's data."""
    env = boundary_pb2.CrossBoundaryEnvelope.FromString(frame)
    found = tensors(env)
    return schema_problems(env, found), env.SerializeToString() == frame, found[0][1].data if found else b""


def _new_verdict(frame: bytes):
    env = boundary_pb2.CrossBoundaryEnvelope.FromString(frame)
    found = tensors(env)
    path, data, split = take_data(frame, env, found)
    canonical = split is not None
    held = (".".join(path[:-1]), len(data)) if path else None
    return schema_problems(env, found, held), canonical, bytes(data)


def _reordered(env: boundary_pb2.CrossBoundaryEnvelope) -> list[bytes]:
    """The envelope encoded with its body's fields after the tensor in reverse order: the same
    message, the same length, not its canonical encoding (none when fewer than two such fields)."""
    field = env.DESCRIPTOR.fields_by_name[env.WhichOneof("body")]
    body = getattr(env, field.name)
    tensor_number = body.DESCRIPTOR.fields_by_name[tensors(body)[0][0].split(".")[0]].number
    before, after = [], []
    for f, value in body.ListFields():
        one = type(body)()
        if f.message_type is not None:
            getattr(one, f.name).CopyFrom(value)
        else:
            setattr(one, f.name, value)
        (before if f.number <= tensor_number else after).append(one.SerializeToString())
    if len(after) < 2:
        return []
    encoded = b"".join(before + after[::-1])
    head = boundary_pb2.CrossBoundaryEnvelope(boundary_id=env.boundary_id)
    if env.HasField("audit_head"):
        head.audit_head.CopyFrom(env.audit_head)
    return [head.SerializeToString() + bytes([field.number << 3 | 2]) + _VarintBytes(len(encoded)) + encoded]


def _mutations(frame: bytes, rng: np.random.Generator) -> list[bytes]:
    """The frame itself, and frames that parse to the same or a nearby message but are encoded
    otherwise: a field repeated or appended (known or unknown), fields reordered, bytes flipped."""
    env = boundary_pb2.CrossBoundaryEnvelope.FromString(frame)
    out = [frame, *_reordered(env)]
    out.append(frame + boundary_pb2.CrossBoundaryEnvelope(boundary_id=env.boundary_id).SerializeToString())
    out.append(boundary_pb2.CrossBoundaryEnvelope(boundary_id="x").SerializeToString() + frame)
    number = int(rng.integers(1, 2000))
    out.append(frame + bytes([(number << 3) & 0x7F | 0x80, number >> 4, 1]))
    for i in (rng.integers(len(frame)), rng.integers(min(24, len(frame))), len(frame) - 1 - rng.integers(12)):
        b = bytearray(frame)  # a byte flipped anywhere, near the start, near the end
        b[int(i)] ^= int(rng.integers(1, 256))
        out.append(bytes(b))
    return out


@settings(max_examples=200, deadline=None)
@given(envelopes(), st.integers(0, 2**32 - 1), st.integers(0, 300), st.sampled_from(sorted(ITEMSIZE)))
def test_held_apart_checks_refuse_exactly_what_the_whole_message_checks_refused(env, seed, numel, dtype):
    if seed % 2:  # a message that keeps the schema, so that frames are asked whether they are canonical
        _consistent(env, numel, dtype)
        tensors(env)[0][1].provenance = tensor_pb2.BOUNDARY_AGGREGATE
        env.boundary_id = env.boundary_id[:32]
    for frame in _mutations(env.SerializeToString(), np.random.default_rng(seed)):
        try:
            old = _old_verdict(frame)
        except DecodeError:
            continue
        problems, canonical, data = _new_verdict(frame)
        assert problems == old[0] and data == old[2]
        if not problems:  # the guard asks whether a frame is canonical only once the schema holds
            assert canonical == old[1]


def _reference_slices(env: boundary_pb2.CrossBoundaryEnvelope) -> list[bytes]:
    """Slices as protobuf builds them: a copy of the envelope per slice, its data set."""
    (path, tensor), *_ = tensors(env)
    data, numel, itemsize = tensor.data, tensor.numel, ITEMSIZE[tensor.dtype]
    if len(data) <= MAX_SLICE_BYTES:
        return [env.SerializeToString()]
    per_slice, out = MAX_SLICE_BYTES // itemsize, []
    for start in range(0, numel, per_slice):
        count = min(per_slice, numel - start)
        part = boundary_pb2.CrossBoundaryEnvelope()
        part.CopyFrom(env)
        t = at(part, data_path(path)[:-1])
        t.data = data[start * itemsize : (start + count) * itemsize]
        t.numel, t.offset, t.total_numel = count, start, numel
        out.append(part.SerializeToString())
    return out


@pytest.mark.parametrize("dtype", [tensor_pb2.FLOAT32, tensor_pb2.BFLOAT16, tensor_pb2.UINT64])
@pytest.mark.parametrize("slices", [1, 2, 3])
@settings(max_examples=3, deadline=None)
@given(env=envelopes())
def test_frames_are_the_slices_protobuf_would_build_and_hash_as_their_bytes(env, dtype, slices):
    numel = (slices - 1) * (MAX_SLICE_BYTES // ITEMSIZE[dtype]) + 777
    _consistent(env, numel, dtype)
    dataless, path, data = _split(env)
    frames = slice_envelope(dataless, path, data, hashlib.sha256(data).digest())
    built = list(frames)
    assert built == _reference_slices(env) and len(frames) == len(built) == slices
    assert [frames[k] for k in range(len(frames))] == built and frames.sizes() == [len(f) for f in built]
    assert frames.nbytes == sum(map(len, built))
    assert frames.digest() == wire_digest(built)


@pytest.mark.parametrize(
    "body",
    [
        lambda model: boundary_pb2.BoundaryDelta(
            outer_step=2, tokens=5, middle_step=1, contributors=2, delta=model.delta_payload()
        ),
        lambda model: boundary_pb2.OuterAggregation(
            outer_step=1,
            secagg=secagg_pb2.SecAggMessage(
                round_id=1, masked_input=secagg_pb2.SecAggMaskedInput(masked=ring(model.since_sync.numel()))
            ),
        ),
    ],
)
def test_a_streamed_message_is_recorded_before_its_first_frame_is_built_and_arrives_whole(body):
    n = 2 * MAX_SLICE_BYTES // 4 + 99  # three slices of 4-byte elements
    model = model_with_aggregate(n)
    egress, out, ingress, into = boundary_guards(model, Terms(2, n, boundaries=2))
    message = body(model)
    sent = message.SerializeToString()
    frames = egress.stream(1.0, message, "global")
    assert [r["outcome"] for r in out.records] == ["sent"]  # on record before a frame exists
    built = list(frames)
    assert message.SerializeToString() == sent  # the caller's body is left as it was
    results = [ingress.receive(2.0, f, "boundary.b0") for f in built]
    assert results[:-1] == [None] * (len(built) - 1) and results[-1] == message
    digest = wire_digest(built)
    for rec in (out.records[-1], into.records[-1]):
        assert rec["payload_sha256"] == digest and rec["wire_bytes"] == sum(map(len, built))


def test_an_aggregate_minted_with_other_data_is_refused_though_every_other_field_matches():
    n = MAX_SLICE_BYTES // 4 + 5  # two slices
    model = model_with_aggregate(n)
    egress, out, *_ = boundary_guards(model, Terms(2, n))
    minted = model.delta_payload()
    forged = tensor_pb2.TensorPayload()
    forged.CopyFrom(minted)
    forged.data = minted.data[:-1] + bytes([minted.data[-1] ^ 1])
    with pytest.raises(ContractViolation, match="did not mint"):
        egress.send(1.0, boundary_pb2.BoundaryDelta(outer_step=1, contributors=2, delta=forged), "global")
    assert out.records[-1]["outcome"] == "refused"
    egress.send(1.0, boundary_pb2.BoundaryDelta(outer_step=1, contributors=2, delta=minted), "global")


def test_a_refused_send_records_the_hash_of_the_envelope_it_would_have_been():
    rec = Recorder()
    guard = EgressGuard("global", Terms(2, 8), rec)
    reference = boundary_pb2.GlobalReference(outer_step=1, parameters=encode(np.zeros(9), tensor_pb2.GLOBAL))
    with pytest.raises(ContractViolation, match="9 elements"):
        guard.send(1.0, reference, "boundary.b0")
    env = boundary_pb2.CrossBoundaryEnvelope(boundary_id="b0", global_reference=reference)
    env.audit_head.seq, env.audit_head.hash = 0, bytes.fromhex(Recorder().head()[1])
    assert rec.records[-1]["payload_sha256"] == wire_digest([env.SerializeToString()])
