"""The deployed global plane against an authenticated boundary that sends garbage: mutated frames,
a delta of the wrong size, a NaN delta, a second stream. Every one is a logged, audited refusal;
the stream goes on and the run with it. The global plane runs in this process; the boundary's
side is a client with the boundary's own certificate speaking through its own egress guard."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest

from echelon.audit.verify import verify_log
from echelon.config import RunConfig
from echelon.contract.guard import EgressGuard, IngressGuard
from echelon.planes.aggregation import encode_f32
from echelon.runtime.grpc.global_role import GlobalRole
from echelon.runtime.grpc.tls import init_certs, load_credentials
from echelon.runtime.grpc.transport import CROSS_METHOD, make_channel
from echelon.v1 import boundary_pb2, tensor_pb2
from tests.conftest import small_run

MUTATED = 2000  # as many as broke the reader before


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _mutations(frames: list[bytes], n: int, seed: int) -> list[bytes]:
    """`n` frames, each a real frame with a few bytes flipped, cut short or extended (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        frame = bytearray(frames[rng.integers(len(frames))])
        kind = rng.integers(3)
        if kind == 0:
            for at in rng.integers(0, len(frame), size=rng.integers(1, 4)):
                frame[at] ^= int(rng.integers(1, 256))
        elif kind == 1:
            frame = frame[: rng.integers(0, len(frame))]
        else:
            frame += rng.bytes(int(rng.integers(1, 64)))
        out.append(bytes(frame))
    return out


class _Boundary:
    """A boundary's side of the stream: its certificate and its egress guard, no plane."""

    def __init__(self, certs: Path, boundary_id: str, target: str) -> None:
        self.party = f"boundary.{boundary_id}"
        self.creds = load_credentials(certs, self.party)
        self.egress = EgressGuard(self.party, 2, None)
        self.ingress = IngressGuard(self.party, 2, None)
        self.target = target

    async def __aenter__(self) -> _Boundary:
        self.channel = make_channel(self.creds, self.target, "global")
        self.call = self.channel.stream_stream(CROSS_METHOD)()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    def frames(self, body) -> list[bytes]:
        return self.egress.send(0.0, body, "global")

    async def send(self, body) -> None:
        for frame in self.frames(body):
            await self.call.write(frame)

    async def expect(self, kind: type, within: float = 30.0):
        """The next message of type `kind` from the global plane (others are skipped)."""

        async def wait():
            while True:
                body = self.ingress.receive(0.0, await self.call.read(), "global")
                if isinstance(body, kind):
                    return body

        return await asyncio.wait_for(wait(), within)


def _status(step: int) -> boundary_pb2.BoundaryStatus:
    return boundary_pb2.BoundaryStatus(
        middle_step=step, drift=0.1, tokens=128 * step, tokens_total=128 * step
    )


def _delta(step: int, values: np.ndarray) -> boundary_pb2.BoundaryDelta:
    payload = encode_f32(values.astype(np.float32), tensor_pb2.BOUNDARY_AGGREGATE, contributors=2)
    return boundary_pb2.BoundaryDelta(
        outer_step=step, tokens=256, middle_step=step, delta=payload, contributors=2
    )


@pytest.mark.slow
def test_garbage_from_an_authenticated_boundary_is_refused_recorded_and_the_run_goes_on(tmp_path, caplog):
    cfg = RunConfig.model_validate(small_run(budget={"outer_steps": 1}, echelon={"sync": {"interval": 1}}))
    certs = tmp_path / "certs"
    init_certs(certs, {b.id: [d.id for d in b.devices] for b in cfg.boundaries})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    caplog.set_level(logging.INFO, logger="echelon.serve")

    async def scenario() -> tuple[dict, list, grpc.StatusCode]:
        at = _port()
        role = GlobalRole(cfg, load_credentials(certs, "global"), at, run_dir, resume=False)
        serving = asyncio.create_task(role.run())
        dim = role.plane.theta_g.numel()
        async with _Boundary(certs, "b0", at) as b0, _Boundary(certs, "b1", at) as b1:
            # Both connect: the run starts and each gets the initial reference.
            for b in (b0, b1):
                await b.send(_status(0))
            for b in (b0, b1):
                await b.expect(boundary_pb2.GlobalReference)
            # Mutations of messages the plane ignores while no sync is in flight (a delta for a
            # step never asked, a cadence), so any that survive the guard change nothing.
            cadence = boundary_pb2.CadenceUpdate(interval=7)
            genuine = b0.frames(cadence) + b0.frames(_delta(9, np.ones(dim)))
            for i, frame in enumerate(_mutations(genuine, MUTATED, seed=0)):
                await b0.call.write(frame)
                if i % 16 == 15:
                    await b0.send(cadence)  # a valid frame now and then: the stream stays open
            # An impostor with b1's certificate is refused while b1's stream is live.
            async with _Boundary(certs, "b1", at) as clone:
                await clone.send(_status(0))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await clone.call.read()
            # Still reading b0: its status starts the sync (H = 1).
            await b0.send(_status(1))
            request = await b0.expect(boundary_pb2.SyncRequest)
            await b0.send(_delta(request.outer_step, np.ones(dim + 1)))  # one element too many
            await b0.send(_delta(request.outer_step, np.full(dim, np.nan)))
            await b0.send(_delta(request.outer_step, np.full(dim, 0.01)))
            await b1.send(_delta(request.outer_step, np.full(dim, -0.01)))
            final = await b0.expect(boundary_pb2.GlobalReference)
            for b in (b0, b1):
                await b.call.done_writing()
            summary = await asyncio.wait_for(serving, 60)
        return summary, final, refused.value.code()

    summary, final, clone_code = asyncio.run(scenario())
    assert clone_code == grpc.StatusCode.ALREADY_EXISTS
    assert final.final and summary["outer_steps"] == 1
    assert summary["refused"] >= MUTATED // 2  # most mutations break the contract or the encoding
    log = verify_log(run_dir / "audit" / "global.jsonl", None, "global")
    reasons = [f.reason for f in log.refused]
    assert any("BoundaryDelta of" in r and "elements" in r for r in reasons)
    assert any("NaN" in r for r in reasons)
    assert any("stream refused" in r for r in reasons)
    assert len(reasons) == summary["refused"] + 1  # every refusal is on record (and the stream's)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in metrics if r["kind"] == "outer_step" and r["outer_step"] == 1)
    assert np.isfinite(step["val_loss"]) and np.isfinite(step["pseudo_gradient_norm"])
    assert "refused a stream from boundary.b1" in caplog.text
