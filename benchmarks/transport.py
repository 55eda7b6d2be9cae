"""Transport figures: cross-boundary throughput and per-message overhead over gRPC, the demo over gRPC.

1. Throughput: boundary `hospital-a` sends a BoundaryDelta carrying a BOUNDARY_AGGREGATE tensor
   (2 contributors, float32) of --megabytes, minted by a `BoundaryModel` (`mint`: header, data
   and the data's SHA-256), through its EgressGuard with the data beside the body, down a gRPC
   bidi stream with mutual TLS over loopback, to the global plane (a separate process) whose
   IngressGuard reassembles it (`receive_apart`: the body and the data in place) and answers with
   a SyncRequest through its own guard. Time: from `EgressGuard.stream` to the answer read back,
   so the checks, digests, audit records (the send synced before its first byte), slicing and
   reassembly are all inside it; frames are written as they are built, as a deployment's outbox
   sends them. Baseline: the same payload as raw 1 MiB chunks over a stream of the same
   connection, each cut as it is written and gathered into one buffer on the server, without
   guards. This is the route the planes take (`Send.data`: a Delta_b and a global reference travel
   beside their messages in both runtimes). Also the route of a tensor nested deeper in a message
   (SecAgg+'s masked input, read by the aggregation protocol from its message): the data inside the
   messages on both ends (the egress guard reads it out once, the ingress guard parses the whole
   message once). Repetitions
   alternate (raw, guarded, inside, ...) and medians are reported. Target: at least 0.8 of raw
   gRPC on the same connection (the ratio), with the absolute figure beside it. Beside the gap
   (guarded minus raw time per transfer) stands the one pass a receiver cannot skip: the SHA-256
   of the data its audit record carries, timed alone on the same host. Both ends share this
   host's cores, so where the hash finds no idle core it shows in the gap.
2. Per-message overhead: an empty BoundaryDelta's frame on the wire (its CrossBoundaryEnvelope)
   against the body's own serialization, and its round trip through egress guard, gRPC, ingress
   guard and back (a SyncRequest) the same way, against a raw gRPC echo of the same frame bytes.
   Each guarded send is synced to disk by its audit log before it leaves (`AuditLog`).
3. The demo run file (token budget --demo-tokens) trained once in simulation (`runner.train`, this
   process) and once deployed (`echelon launch`: global, boundaries and devices as processes on
   loopback); wall times and their ratio. Mind the cores: the deployment runs 9 processes.

The guards write signed audit logs exactly as a deployment does. Both ends use the deployment's
own transport (`transport.make_server`, `make_channel`, `stream_handler`) and stream items are the exact
frames the guards produce.

    .venv/bin/python benchmarks/transport.py [--megabytes 100] [--reps 5] [--pings 2000]
        [--demo-tokens 100000] [--skip-demo] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.table import Table

from echelon.audit.anchor import RunBinding, deployment_id
from echelon.audit.layout import audit_dir, log_path
from echelon.audit.log import AuditLog
from echelon.commands.launch import _free_port
from echelon.contract.guard import EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.contract.provenance import BoundaryModel
from echelon.contract.slicing import MAX_SLICE_BYTES
from echelon.runtime.grpc.tls import Credentials, init_certs, load_credentials, peer_identity
from echelon.runtime.grpc.transport import CROSS_METHOD, make_channel, make_server, stream_handler
from echelon.v1 import boundary_pb2

GLOBAL = "global"
BOUNDARY = "boundary.hospital-a"
QUORUM = 2
RAW_BULK = "bench.RawBulk"  # raw bytes: an 8-byte length, then the chunks; answered with ACK
RAW_ECHO = "bench.RawEcho"  # raw bytes echoed item by item
GUARDED_MESSAGE = "bench.GuardedMessage"  # as CrossBoundary, the data inside the messages on both ends
ACK = b"\x01"
PING_BLOCKS = 4  # ping-pong runs in alternating blocks (guarded, raw, ...) of pings / PING_BLOCKS


def _open_audit(run_dir: Path, creds: Credentials) -> AuditLog:
    """The party's signed audit log, as a deployed role opens it (`evidence.open_audit`)."""
    audit_dir(run_dir).mkdir(parents=True, exist_ok=True)
    binding = RunBinding(deployment_id(creds.ca), "0" * 64)  # no run configuration: a benchmark
    return AuditLog.create(
        log_path(run_dir, creds.party), creds.party, creds.audit_key(), "wall", binding, min_quorum=QUORUM
    )


# The global plane's side, in its own process. -------------------------------------------------


def serve(certs: str, listen: str, run_dir: str, numel: int, ready: mp.Event, stop: mp.Event) -> None:
    asyncio.run(_serve(Path(certs), listen, Path(run_dir), numel, ready, stop))


async def _serve(
    certs: Path, listen: str, run_dir: Path, numel: int, ready: mp.Event, stop: mp.Event
) -> None:
    creds = load_credentials(certs, GLOBAL)
    audit = _open_audit(run_dir, creds)
    terms = Terms(QUORUM, numel)
    egress, ingress = EgressGuard(GLOBAL, terms, audit), IngressGuard(GLOBAL, terms, audit)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def now() -> float:
        return loop.time() - t0

    def guarded(apart: bool):
        async def handle(requests, context):
            peer, _ = peer_identity(context.auth_context())
            async for frame in requests:
                if apart:  # the body without its data, and the data in place where it was gathered
                    complete = ingress.receive_apart(now(), frame, peer)
                    if complete is None:
                        continue
                    body, data = complete.envelope.boundary_delta, complete.data
                else:  # the message a plane takes today: parsed once, data inside (not read out)
                    body = ingress.receive(now(), frame, peer)
                    if body is None:
                        continue
                    data = None
                # The guard checked every slice's bytes against its numel; using the data (reading
                # it out of a message copies it) is the plane's cost, which raw does not pay either.
                if body.HasField("delta") and (
                    body.delta.numel != numel or (data is not None and len(data) != 4 * numel)
                ):
                    raise RuntimeError(f"reassembled {body.delta.numel} elements of {numel}")
                sync = boundary_pb2.SyncRequest(outer_step=body.outer_step)
                for reply in egress.send(now(), sync, peer):
                    yield reply

        return handle

    async def raw_bulk(requests, context):
        expected, whole = None, bytearray()
        async for item in requests:
            if expected is None:
                expected = int.from_bytes(item, "big")
                continue
            whole += item  # gathered as the ingress guard gathers slices: one copy
            if len(whole) >= expected:
                if len(whole) != expected:
                    raise RuntimeError(f"received {len(whole)} B, expected {expected}")
                expected, whole = None, bytearray()
                yield ACK

    async def raw_echo(requests, context):
        async for item in requests:
            yield item

    server = make_server(
        creds,
        listen,
        [
            stream_handler("echelon.v1.CrossBoundary", guarded(apart=True)),
            stream_handler(GUARDED_MESSAGE, guarded(apart=False)),
            stream_handler(RAW_BULK, raw_bulk),
            stream_handler(RAW_ECHO, raw_echo),
        ],
    )
    await server.start()
    ready.set()
    try:
        while not stop.is_set():
            await asyncio.sleep(0.1)
    finally:
        await server.stop(grace=1.0)
        audit.close()


# The boundary's side, in this process. -----------------------------------------------------------


class Boundary:
    """Boundary `hospital-a` dialled to the global plane: one guarded and two raw streams."""

    def __init__(self, certs: Path, target: str, run_dir: Path, model: BoundaryModel) -> None:
        self.creds = load_credentials(certs, BOUNDARY)
        self.audit = _open_audit(run_dir, self.creds)
        terms = Terms(QUORUM, model.since_sync.numel())
        self.egress = EgressGuard(BOUNDARY, terms, self.audit, model.ledger)
        self.ingress = IngressGuard(BOUNDARY, terms, self.audit)
        self.target = target
        self.t0 = time.monotonic()
        self.step = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def __aenter__(self) -> Boundary:
        self.channel = make_channel(self.creds, self.target, GLOBAL)
        await asyncio.wait_for(self.channel.channel_ready(), 30)
        self.guarded = self.channel.stream_stream(CROSS_METHOD)()
        self.guarded_message = self.channel.stream_stream(f"/{GUARDED_MESSAGE}/Exchange")()
        self.bulk = self.channel.stream_stream(f"/{RAW_BULK}/Exchange")()
        self.echo = self.channel.stream_stream(f"/{RAW_ECHO}/Exchange")()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for call in (self.guarded, self.guarded_message, self.bulk, self.echo):
            await call.done_writing()
        await self.channel.close()
        self.audit.close()

    async def _answer(self, call) -> None:
        """Read the global plane's SyncRequest for the message just sent, through the ingress guard."""
        while (body := self.ingress.receive(self.now(), await call.read(), GLOBAL)) is None:
            pass
        if body.outer_step != self.step:
            raise RuntimeError(f"answer for step {body.outer_step}, expected {self.step}")

    async def send_guarded(self, body: boundary_pb2.BoundaryDelta, data: bytes | None = None) -> dict:
        """Seconds from the first send to the answer, seconds in EgressGuard.stream, and wire bytes.

        `data`: the delta's data held apart, as minted (`BoundaryModel.mint`), received apart; None:
        the data inside `body`, and the global plane's guard gives a parsed message.
        """
        self.step += 1
        body.outer_step = self.step
        call = self.guarded if data is not None else self.guarded_message
        t0 = time.perf_counter()
        frames = self.egress.stream(self.now(), body, GLOBAL, data)  # checked, digested and recorded
        t1 = time.perf_counter()
        for frame in frames:  # each frame is built as it is taken: written while the next is built
            await call.write(frame)
        await self._answer(call)
        return {
            "s": time.perf_counter() - t0,
            "prepare_s": t1 - t0,
            "wire": frames.nbytes,
            "frames": len(frames),
        }

    async def send_raw(self, data: bytes) -> dict:
        """As `send_guarded`, the data in raw MAX_SLICE_BYTES chunks, each cut (copied) as it is
        written, as a guard's frames are built, and gathered on the server as the guard gathers."""
        t0 = time.perf_counter()
        view = memoryview(data)
        await self.bulk.write(len(data).to_bytes(8, "big"))
        t1 = time.perf_counter()
        for start in range(0, len(data), MAX_SLICE_BYTES):
            await self.bulk.write(bytes(view[start : start + MAX_SLICE_BYTES]))
        if await self.bulk.read() != ACK:
            raise RuntimeError("raw transfer not acknowledged")
        frames = 1 + -(-len(data) // MAX_SLICE_BYTES)
        return {"s": time.perf_counter() - t0, "prepare_s": t1 - t0, "wire": 8 + len(data), "frames": frames}

    async def ping_guarded(self, n: int) -> float:
        """Microseconds per empty BoundaryDelta round trip through both guards."""
        t0 = time.perf_counter()
        for _ in range(n):
            await self.send_guarded(boundary_pb2.BoundaryDelta())
        return (time.perf_counter() - t0) / n * 1e6

    async def ping_raw(self, frame: bytes, n: int) -> float:
        """Microseconds per raw echo of `frame`."""
        t0 = time.perf_counter()
        for _ in range(n):
            await self.echo.write(frame)
            if await self.echo.read() != frame:
                raise RuntimeError("echo returned other bytes")
        return (time.perf_counter() - t0) / n * 1e6


def aggregate(
    numel: int,
) -> tuple[boundary_pb2.BoundaryDelta, bytes, boundary_pb2.BoundaryDelta, BoundaryModel]:
    """A BoundaryDelta of `numel` elements minted by a boundary model from one sealed round: its
    body without the delta's data and that data (as minted), and the body holding it."""
    model = BoundaryModel(torch.zeros(numel), QUORUM)
    vector = np.random.default_rng(0).standard_normal(numel)
    model.apply_aggregate(model.open_round(1, QUORUM).seal(vector, 1.0, QUORUM), lr=1.0)
    minted = model.mint()
    inside = boundary_pb2.BoundaryDelta(tokens=numel, contributors=QUORUM, delta=minted.header)
    inside.delta.data = minted.data
    return (
        boundary_pb2.BoundaryDelta(tokens=numel, contributors=QUORUM, delta=minted.header),
        minted.data,
        inside,
        model,
    )


async def _transport(
    certs: Path, target: str, run_dir: Path, megabytes: float, reps: int, pings: int
) -> dict:
    body, data, inside, model = aggregate(int(megabytes * 1e6) // 4)
    sync = boundary_pb2.BoundaryDelta(outer_step=1)
    frame = EgressGuard(BOUNDARY, Terms(QUORUM, model.since_sync.numel()), None).send(0.0, sync, GLOBAL)[0]
    async with Boundary(certs, target, run_dir, model) as b:
        # Warm up the connection (TLS session, flow-control windows) on every stream.
        await b.send_raw(data)
        await b.send_guarded(body, data)
        await b.send_guarded(inside)
        await b.ping_guarded(50)
        await b.ping_raw(frame, 50)
        raw, guarded, message = [], [], []
        for _ in range(reps):
            raw.append(await b.send_raw(data))
            guarded.append(await b.send_guarded(body, data))
            message.append(await b.send_guarded(inside))
        ping_guarded, ping_raw = [], []
        block = max(1, pings // PING_BLOCKS)
        for _ in range(PING_BLOCKS):
            ping_guarded.append(await b.ping_guarded(block))
            ping_raw.append(await b.ping_raw(frame, block))
    payload = len(data)
    digest_s = []  # the SHA-256 a receiver takes of the data for its audit record, alone, same host
    for _ in range(reps):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        digest_s.append(time.perf_counter() - t0)

    def mb_s(runs: list[dict]) -> float:
        return statistics.median(payload / r["s"] / 1e6 for r in runs)

    return {
        "payload": payload,
        "guarded_mb_s": mb_s(guarded),
        "message_mb_s": mb_s(message),
        "raw_mb_s": mb_s(raw),
        "ratios": [r["s"] / g["s"] for g, r in zip(guarded, raw, strict=True)],  # each rep's pair
        "gap_ms": (statistics.median(r["s"] for r in guarded) - statistics.median(r["s"] for r in raw)) * 1e3,
        "digest_ms": statistics.median(digest_s) * 1e3,
        "guarded_prepare_ms": statistics.median(r["prepare_s"] for r in guarded) * 1e3,
        "message_prepare_ms": statistics.median(r["prepare_s"] for r in message) * 1e3,
        "raw_prepare_ms": statistics.median(r["prepare_s"] for r in raw) * 1e3,
        "guarded_wire": guarded[0]["wire"],
        "guarded_frames": guarded[0]["frames"],
        "sync_body": len(sync.SerializeToString()),
        "sync_frame": len(frame),
        "ping_guarded_us": statistics.median(ping_guarded),
        "ping_raw_us": statistics.median(ping_raw),
        "pings": block * PING_BLOCKS,
    }


def transport(megabytes: float, reps: int, pings: int, tmp: Path) -> dict:
    """Figures 1 and 2: the global plane in a child process, the boundary here."""
    certs = tmp / "certs"
    init_certs(certs, {"hospital-a": []})
    target = f"127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    numel = int(megabytes * 1e6) // 4
    server = ctx.Process(target=serve, args=(str(certs), target, str(tmp / "global"), numel, ready, stop))
    server.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.wait(0.2):
            if not server.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the global plane's server did not start (exit code {server.exitcode})")
        return asyncio.run(_transport(certs, target, tmp / "boundary", megabytes, reps, pings))
    finally:
        stop.set()
        server.join(10)
        if server.is_alive():
            server.terminate()
            server.join()


# Figure 3: the demo, simulated and deployed. ------------------------------------------------------


def demo(tokens: int, tmp: Path) -> dict:
    from echelon.commands.demo import demo_file
    from echelon.commands.launch import launch
    from echelon.config import load_run
    from echelon.runner import train

    spec = yaml.safe_load(demo_file().read_text())
    spec["budget"] = {"tokens": tokens}
    tmp.mkdir(parents=True)
    run_file = tmp / "demo.yaml"
    run_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    cfg = load_run(run_file)
    t0 = time.perf_counter()
    simulated = train(cfg, tmp / "simulated", progress=False)
    sim_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    deployed = launch(cfg, run_file, tmp / "deployed", force=False, progress=False, threads=1)
    grpc_s = time.perf_counter() - t0
    return {"sim_s": sim_s, "grpc_s": grpc_s, "simulated": simulated, "deployed": deployed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100.0, help="aggregate size (1 MB = 10^6 B)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each transfer")
    parser.add_argument("--pings", type=int, default=2000, help="round trips of each ping-pong")
    parser.add_argument("--demo-tokens", type=int, default=100_000, help="token budget of the demo run")
    parser.add_argument("--skip-demo", action="store_true", help="skip the demo's wall times")
    parser.add_argument(
        "--quick", action="store_true", help="20 MB aggregate, 7 repetitions, 500 pings, no demo"
    )
    args = parser.parse_args()
    if args.quick:
        args.megabytes, args.reps, args.pings, args.skip_demo = 20.0, 7, 500, True
    with tempfile.TemporaryDirectory(prefix="echelon-transport-") as tmp:
        t = transport(args.megabytes, args.reps, args.pings, Path(tmp) / "transport")
        d = None if args.skip_demo else demo(args.demo_tokens, Path(tmp) / "demo")

    mb = t["payload"] / 1e6
    table = Table(
        title=f"Transport over loopback gRPC with mutual TLS ({os.cpu_count()} cores; "
        f"echelon = egress guard -> gRPC -> ingress guard, signed audit logs)"
    )
    for col in ("figure", "echelon", "baseline", "baseline is", "ratio", "target"):
        table.add_column(col, justify="right" if col in ("echelon", "baseline", "ratio") else "left")
    ratio = t["guarded_mb_s"] / t["raw_mb_s"]
    table.add_row(
        f"{mb:g} MB aggregate, throughput",
        f"{t['guarded_mb_s']:,.0f} MB/s",
        f"{t['raw_mb_s']:,.0f} MB/s",
        "raw 1 MiB chunks, same connection",
        f"{ratio:.3f}",
        f">= 0.8 of raw: {'met' if ratio >= 0.8 else 'MISSED'}",
    )
    table.add_row(
        "  each repetition (raw, guarded in turn)",
        "",
        "",
        "ratio of each pair",
        " ".join(f"{r:.2f}" for r in t["ratios"]),
        "",
    )
    table.add_row(
        "  the receiver's SHA-256 of the data",
        f"{t['digest_ms']:,.1f} ms",
        f"{t['gap_ms']:,.1f} ms",
        "guarded - raw time per transfer",
        f"{t['digest_ms'] / t['gap_ms']:.2f}" if t["gap_ms"] > 0 else "",
        "its audit digest, timed alone",
    )
    table.add_row(
        "  data inside the messages",
        f"{t['message_mb_s']:,.0f} MB/s",
        f"{t['raw_mb_s']:,.0f} MB/s",
        "as above",
        f"{t['message_mb_s'] / t['raw_mb_s']:.3f}",
        "(a nested tensor: +SA's masked input)",
    )
    table.add_row(
        "  of which before the first byte",
        f"{t['guarded_prepare_ms']:,.1f} ms",
        f"{t['raw_prepare_ms']:,.1f} ms",
        "check, record vs the length item",
        f"{t['guarded_prepare_ms'] / t['raw_prepare_ms']:,.0f}",
        "",
    )
    table.add_row(
        "  bytes on the wire",
        f"{t['guarded_wire']:,} B ({t['guarded_frames']} frames)",
        f"{t['payload']:,} B",
        "the tensor's data",
        f"{t['guarded_wire'] / t['payload']:.5f}",
        "",
    )
    table.add_row(
        "empty BoundaryDelta, bytes on the wire",
        f"{t['sync_frame']} B",
        f"{t['sync_body']} B",
        "the body serialized alone",
        f"{t['sync_frame'] / t['sync_body']:.1f}",
        "",
    )
    table.add_row(
        f"empty BoundaryDelta round trip (N = {t['pings']})",
        f"{t['ping_guarded_us']:,.0f} µs",
        f"{t['ping_raw_us']:,.0f} µs",
        "raw gRPC echo of the same frame",
        f"{t['ping_guarded_us'] / t['ping_raw_us']:.2f}",
        "",
    )
    if d is not None:
        table.add_row(
            f"demo, {args.demo_tokens:,} tokens, wall time",
            f"{d['grpc_s']:,.1f} s",
            f"{d['sim_s']:,.1f} s",
            "simulation (this process)",
            f"{d['grpc_s'] / d['sim_s']:.2f}",
            "",
        )
        for key, label, fmt in (
            ("tokens", "tokens trained", ",d"),
            ("outer_steps", "outer steps", "d"),
            ("end_val_loss", "final val loss", ".4f"),
        ):
            dep, sim = d["deployed"][key], d["simulated"][key]
            table.add_row(
                f"  {label}",
                f"{dep:{fmt}}",
                f"{sim:{fmt}}",
                "simulation",
                f"{dep / sim:.3f}" if sim else "",
                "",
            )
    console = Console(width=max(Console().width, 132))
    console.print(table)
    if d is not None:
        console.print(
            "[dim]demo: the deployment runs one process per party (global, 2 boundaries, 6 devices, one "
            "torch thread each) on these cores, and its wall time includes their start-up; the "
            "simulation runs every party in one process.[/dim]"
        )
    figures = {
        "guarded_mb_s": t["guarded_mb_s"],
        "raw_mb_s": t["raw_mb_s"],
        "ratio": ratio,
        "message_ratio": t["message_mb_s"] / t["raw_mb_s"],
        "gap_ms": t["gap_ms"],
        "digest_ms": t["digest_ms"],
    }
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
