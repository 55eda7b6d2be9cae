"""The deployment's transport against a peer that misbehaves: malformed addresses and busy ports,
never-ending envelopes, a second stream with a real party's certificate, a stream ended without
the run being over, garbage frames. Real gRPC with mutual TLS on loopback, in this process."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest

from echelon.config import LinkConfig
from echelon.errors import UserError
from echelon.runtime.grpc.framing import DeviceReassembly, FrameRefused, chunk, device_frames
from echelon.runtime.grpc.node import Outbox
from echelon.runtime.grpc.tls import init_certs, load_credentials
from echelon.runtime.grpc.transport import (
    MAX_REFUSALS,
    RUN_OVER,
    Dialer,
    LiveStreams,
    make_channel,
    make_server,
    parse_address,
    read_frames,
    serve_stream,
    start_server,
    stream_handler,
)
from echelon.runtime.network import Network
from echelon.v1 import device_pb2, services_pb2

SERVICE = "test.Echo"
METHOD = f"/{SERVICE}/Exchange"


@pytest.mark.parametrize(
    "address", ["nonsense", "127.0.0.1:99999", ":5000", "localhost:abc", "127.0.0.1:", "host :80", "[::1]"]
)
def test_a_malformed_address_is_a_user_error_naming_the_flag(address):
    with pytest.raises(UserError, match=r"--listen .* is not host:port"):
        parse_address(address, "--listen")


def test_valid_addresses_parse():
    assert parse_address("127.0.0.1:50051", "--listen") == ("127.0.0.1", 50051)
    assert parse_address("[::1]:0", "--listen") == ("::1", 0)
    assert parse_address("boundary-a.example:443", "--global") == ("boundary-a.example", 443)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("certs") / "certs"
    init_certs(directory, {"b0": ["d0", "d1"]})
    return directory


def test_a_busy_port_is_a_user_error_not_a_shared_port(certs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(UserError, match="in use by another process"):
            make_server(load_credentials(certs, "boundary.b0"), busy, [])


def test_reassembly_caps_bytes_expires_halves_and_goes_on():
    clock = [0.0]
    reassembly = DeviceReassembly(max_bytes=3 << 20, clock=lambda: clock[0], expiry_s=10.0)
    endless = services_pb2.DeviceChunk(data=b"x" * (1 << 20), last=False).SerializeToString()
    for _ in range(3):
        assert reassembly.add(endless) is None
    with pytest.raises(FrameRefused, match="exceeds the cap"):
        reassembly.add(endless)
    assert reassembly.add(endless) is None  # what was held is dropped: the count starts afresh
    clock[0] = 11.0
    with pytest.raises(FrameRefused, match="took over 10 s"):
        reassembly.add(endless)
    with pytest.raises(FrameRefused, match="undecodable"):
        reassembly.add(b"\xff\xff\xff")
    hello = device_frames("d0", device_pb2.Hello(device_id="d0"))
    assert reassembly.add(hello[0]).hello.device_id == "d0"  # and the stream goes on


def test_empty_chunks_that_never_end_are_refused_not_held():
    """The cap counts data bytes: empty chunks would be held without end at no cost to it."""
    reassembly = DeviceReassembly(max_bytes=3 << 20, clock=lambda: 0.0)
    hello = device_frames("d0", device_pb2.Hello(device_id="d0"))
    empty = services_pb2.DeviceChunk(data=b"", last=False).SerializeToString()
    for _ in range(3):
        with pytest.raises(FrameRefused, match="empty chunk"):
            reassembly.add(empty)
    assert reassembly._parts == []
    assert reassembly.add(hello[0]).hello.device_id == "d0"  # the stream goes on


def test_chunks_cover_the_data_in_order():
    data = bytes(range(256)) * 10_000
    pieces = chunk(data)
    assert b"".join(p for p, _ in pieces) == data and [last for _, last in pieces][-1]


def test_one_live_stream_per_party():
    streams = LiveStreams()
    first = streams.claim("device/d0")
    assert first is not None and streams.claim("device/d0") is None  # the second is refused
    streams.release("device/d0", first + 1)  # not the holder's token: nothing changes
    assert streams.claim("device/d0") is None
    streams.release("device/d0", first)
    assert streams.claim("device/d0") is not None


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def _serve_one_party(certs: Path, outbox: Outbox, seen: list[bytes]):
    """A server for boundary.b0 that admits each device once (LiveStreams) and records frames;
    frames starting with b"!" are refused."""
    streams = LiveStreams()

    def handle(frame: bytes) -> None:
        if frame.startswith(b"!"):
            raise ValueError("refused")
        seen.append(frame)

    async def exchange(requests, context):
        token = streams.claim("d0")
        if token is None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "already holds a live stream")
        try:
            async for frame in serve_stream(context, read_frames(requests, handle), outbox):
                yield frame
        finally:
            streams.release("d0", token)

    at = _port()
    server = make_server(load_credentials(certs, "boundary.b0"), at, [stream_handler(SERVICE, exchange)])
    await start_server(server)
    return server, at


def _outbox() -> Outbox:
    return Outbox(Network(0).link("a", "b", LinkConfig()))


def test_a_second_stream_with_the_same_certificate_is_refused_and_the_first_goes_on(certs):
    async def scenario():
        server_out, seen = _outbox(), []
        server, at = await _serve_one_party(certs, server_out, seen)
        creds = load_credentials(certs, "device.d0")
        first = make_channel(creds, at, "boundary.b0")
        clone = make_channel(creds, at, "boundary.b0")
        try:
            real = first.stream_stream(METHOD)()
            await real.write(b"hello")
            server_out.put([b"to the real one"])
            assert await real.read() == b"to the real one"
            impostor = clone.stream_stream(METHOD)()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await impostor.write(b"i am d0")  # refused as it opens: the write may already fail
                await impostor.read()
            assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
            server_out.put([b"still served"])
            assert await real.read() == b"still served"  # the real stream was not retired
            assert seen == [b"hello"]
            server_out.close()
            assert await real.read() is grpc.aio.EOF
            assert RUN_OVER in tuple(await real.trailing_metadata())
        finally:
            await first.close()
            await clone.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_refused_frames_leave_the_stream_open_until_too_many_in_a_row(certs):
    async def scenario():
        server_out, seen = _outbox(), []
        server, at = await _serve_one_party(certs, server_out, seen)
        channel = make_channel(load_credentials(certs, "device.d0"), at, "boundary.b0")
        try:
            call = channel.stream_stream(METHOD)()
            for i in range(MAX_REFUSALS - 1):
                await call.write(b"!bad %d" % i)
            await call.write(b"good")  # resets the count
            for i in range(MAX_REFUSALS):
                await call.write(b"!bad %d" % i)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
            assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{MAX_REFUSALS} refused messages in a row" in ended.value.details()
            assert seen == [b"good"]
        finally:
            await channel.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_client_whose_stream_ends_without_the_run_being_over_dials_again(certs):
    """A server that ends a stream without RUN_OVER (a retired stream, a restarting boundary) does
    not end the client's run: it reconnects; only RUN_OVER ends it."""

    async def scenario():
        ends = ["cut", "cut", "over"]
        connections = []

        async def exchange(requests, context):
            connections.append(1)
            if ends.pop(0) == "over":
                context.set_trailing_metadata((RUN_OVER,))
            yield b"frame"

        at = _port()
        server = make_server(load_credentials(certs, "boundary.b0"), at, [stream_handler(SERVICE, exchange)])
        await start_server(server)
        lost, frames = [], []
        dialer = Dialer(
            load_credentials(certs, "device.d0"),
            at,
            "boundary.b0",
            METHOD,
            _outbox(),
            patience_s=30,
            on_connect=lambda: None,
            on_frame=frames.append,
            on_lost=lost.append,
        )
        try:
            await asyncio.wait_for(dialer.run(), 30)
        finally:
            await server.stop(None)
        assert len(connections) == 3 and len(lost) == 2 and frames == [b"frame"] * 3

    asyncio.run(scenario())


def test_a_client_gives_up_after_its_patience_with_a_clear_error(certs):
    dialer = Dialer(
        load_credentials(certs, "device.d0"),
        _port(),  # nobody listens there
        "boundary.b0",
        METHOD,
        _outbox(),
        patience_s=0.5,
        on_connect=lambda: None,
        on_frame=lambda frame: None,
        on_lost=lambda why: None,
    )
    with pytest.raises(UserError, match=r"gave up on boundary\.b0 .*\(deployment\.patience_s is 0\.5\)"):
        asyncio.run(asyncio.wait_for(dialer.run(), 30))


def test_a_masked_boundary_delta_crosses_in_slices_like_every_other_tensor():
    """+SA: the masked Delta_b sits nested in OuterAggregation; it is sliced below gRPC's limits."""
    import numpy as np

    from echelon.contract.guard import EgressGuard, IngressGuard
    from echelon.contract.policy import Terms
    from echelon.contract.slicing import MAX_SLICE_BYTES
    from echelon.v1 import boundary_pb2, secagg_pb2, tensor_pb2

    ring = np.random.default_rng(0).integers(0, 2**63, size=600_000, dtype=np.uint64)
    masked = tensor_pb2.TensorPayload(
        provenance=tensor_pb2.BOUNDARY_AGGREGATE,
        contributors=2,
        dtype=tensor_pb2.UINT64,
        numel=ring.size,
        data=ring.astype("<u8").tobytes(),
    )
    body = boundary_pb2.OuterAggregation(
        outer_step=3,
        secagg=secagg_pb2.SecAggMessage(round_id=3, masked_input=secagg_pb2.SecAggMaskedInput(masked=masked)),
    )
    terms = Terms(min_quorum=2, dim=ring.size, boundaries=2)
    frames = EgressGuard("boundary.b0", terms, None).send(0.0, body, "global")
    assert len(frames) == 5 and max(len(f) for f in frames) < MAX_SLICE_BYTES + 1024
    ingress = IngressGuard("global", terms, None)
    received = [ingress.receive(0.0, f, "boundary.b0") for f in frames]
    assert received[:-1] == [None] * 4 and received[-1] == body


def test_an_outbox_builds_a_guards_frames_one_by_one_as_it_releases_them():
    from echelon.contract.guard import EgressGuard
    from echelon.contract.policy import Terms
    from echelon.contract.slicing import MAX_SLICE_BYTES, Frames
    from echelon.v1 import boundary_pb2
    from tests.contract.kit import model_with_aggregate

    n = 2 * MAX_SLICE_BYTES // 4 + 10  # three slices of float32
    model = model_with_aggregate(n)
    guard = EgressGuard("boundary.b0", Terms(2, n), None, model.ledger)
    body = boundary_pb2.BoundaryDelta(outer_step=1, contributors=2, delta=model.delta_payload())
    expected, built = guard.send(0.0, body, "global"), []

    class Watched(Frames):
        def __getitem__(self, k: int) -> bytes:
            built.append(k)
            return super().__getitem__(k)

    async def scenario():
        out, taken = _outbox(), []
        frames = guard.stream(0.0, body, "global")
        out.put(Watched(frames.data, frames.layout, frames.data_digest))
        assert built == []
        async for frame in out.frames():
            taken.append(frame)
            assert built == list(range(len(taken)))  # frame k is built when it is released
            if len(taken) == len(expected):
                out.close()
        return taken

    assert asyncio.run(scenario()) == expected
