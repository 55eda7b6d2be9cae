"""The three deployed roles: the global plane, a boundary coordinator and a device, over gRPC.

Each role builds the same plane objects, guards and audit log the simulator builds, and drives
them with a `Node`. Boundaries dial the global plane; devices dial their boundary; every stream
is mutual TLS and the peer is identified by its certificate (`tls.peer_identity`). A refused peer
gets PERMISSION_DENIED and one log line saying why. A client whose stream breaks reconnects with
exponential backoff. The run ends when the global plane finishes: it ends the boundaries'
streams, which end their devices' streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from echelon.audit.anchor import RunBinding, config_digest, deployment_id
from echelon.audit.layout import audit_dir, log_path
from echelon.audit.log import AuditLog
from echelon.config import RunConfig
from echelon.contract.guard import ContractViolation
from echelon.errors import UserError
from echelon.planes.coordinator import GlobalPlane
from echelon.planes.device import StartLocalRound
from echelon.runner import make_boundary_plane, make_device_plane, make_global_plane, make_guards, prepare
from echelon.runtime.grpc.node import Node, Outbox, chunk
from echelon.runtime.grpc.tls import Credentials, peer_identity
from echelon.runtime.sim.engine import GLOBAL, boundary_address, device_address, party_of
from echelon.strategies import effective_config, get_strategy
from echelon.train.model import build_model
from echelon.v1 import device_pb2, services_pb2
from echelon.wire import unwrap, wrap_device

log = logging.getLogger("echelon.serve")

CROSS_METHOD = "/echelon.v1.CrossBoundary/Exchange"
LOCAL_METHOD = "/echelon.v1.BoundaryLocal/Exchange"
MAX_MESSAGE = 4 << 20  # every stream item is at most 1 MiB of data plus framing
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
BACKOFF_S = (0.1, 5.0)  # first and largest reconnect delay
RECONNECT_FOR_S = 120.0  # give up after this long without a connection
HALF_CLOSE_S = 30.0  # how long the global plane waits for a finished boundary to close its side


def require_admissible(cfg: RunConfig) -> None:
    """A deployment runs only strategies the information-flow contract admits."""
    strategy = get_strategy(cfg.strategy)
    if not strategy.admissible:
        raise UserError(
            f"strategy {cfg.strategy!r} is not admissible under the information-flow contract (per-device "
            "updates would cross a boundary); it runs only in simulation: `echelon train`"
        )


def _deployable(cfg: RunConfig) -> RunConfig:
    """The configuration a party runs for the run file `cfg`: refused unless admissible, then
    resolved for its strategy exactly as the simulator resolves it."""
    require_admissible(cfg)
    return effective_config(cfg)


def _server(creds: Credentials, listen: str) -> grpc.aio.Server:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    tls = grpc.ssl_server_credentials(
        [(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True
    )
    server.add_secure_port(listen, tls)  # no insecure port: plaintext is refused by the handshake
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.health = health_servicer  # type: ignore[attr-defined]
    return server


def _channel(creds: Credentials, target: str, server_party: str) -> grpc.aio.Channel:
    tls = grpc.ssl_channel_credentials(
        root_certificates=creds.ca, private_key=creds.key, certificate_chain=creds.cert
    )
    # The server must present the certificate of the party we expect, whatever the address.
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_party)]
    return grpc.aio.secure_channel(target, tls, options=options)


def _handler(service: str, exchange: Callable) -> grpc.GenericRpcHandler:
    # No (de)serializers: stream items are the exact frame bytes the guards count.
    return grpc.method_handlers_generic_handler(
        service, {"Exchange": grpc.stream_stream_rpc_method_handler(exchange)}
    )


async def _dial(
    creds: Credentials,
    target: str,
    server_party: str,
    method: str,
    outbox: Outbox,
    on_connect: Callable[[], None],
    on_frame: Callable[[bytes], None],
) -> None:
    """Hold a stream to `target` open, reconnecting with backoff, until the server ends it (OK)."""
    delay, lost_at = BACKOFF_S[0], None
    while True:
        channel = _channel(creds, target, server_party)
        try:
            call = channel.stream_stream(method)(outbox.frames())
            await call.wait_for_connection()
            log.info("connected to %s at %s", server_party, target)
            delay, lost_at = BACKOFF_S[0], None
            on_connect()
            async for frame in call:
                on_frame(frame)
            return  # the server ended the stream: the run is over
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise UserError(f"{server_party} at {target} refused this party: {e.details()}") from None
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            if "handshake failed" in (e.details() or "").lower():
                # Not a network blip: retrying cannot help.
                raise UserError(
                    f"TLS handshake with {server_party} at {target} failed: it does not accept this party's "
                    "certificate (another deployment's?), or it is not this deployment's server"
                ) from None
            lost_at = lost_at or time.monotonic()
            if time.monotonic() - lost_at > RECONNECT_FOR_S:
                raise UserError(f"cannot reach {server_party} at {target} ({e.details()})") from None
            log.warning(
                "%s at %s unavailable (%s); retrying in %.1f s", server_party, target, e.details(), delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])
        finally:
            await channel.close()


class _DeviceReassembly:
    """DeviceChunk frames -> whole DeviceEnvelope bodies."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def add(self, frame: bytes) -> device_pb2.DeviceEnvelope | None:
        piece = services_pb2.DeviceChunk.FromString(frame)
        self._parts.append(piece.data)
        if not piece.last:
            return None
        data, self._parts = b"".join(self._parts), []
        return device_pb2.DeviceEnvelope.FromString(data)


def _device_frames(device_id: str, body: Message) -> list[bytes]:
    data = wrap_device(device_id, body).SerializeToString()
    return [services_pb2.DeviceChunk(data=c, last=last).SerializeToString() for c, last in chunk(data)]


def _open_audit(run_dir: Path, party: str, creds: Credentials, cfg: RunConfig) -> AuditLog:
    """The party's audit log, bound to the deployment (its CA) and the configuration: continued
    after a restart (a torn last line is cut, and recorded)."""
    audit_dir(run_dir).mkdir(parents=True, exist_ok=True)
    path = log_path(run_dir, party)
    binding = RunBinding(deployment_id(creds.ca), config_digest(cfg))
    if path.exists():
        return AuditLog.open(path, creds.audit_key(), repair=True, binding=binding)
    return AuditLog.create(path, party, creds.audit_key(), "wall", binding, min_quorum=cfg.echelon.min_quorum)


def _log_event(kind: str, fields: dict) -> None:
    """A boundary's or device's telemetry: refusals and SecAgg+ failures go to its log."""
    log.log(
        logging.WARNING if "refused" in kind or "failure" in kind or "rejected" in kind else logging.DEBUG,
        "%s %s",
        kind,
        json.dumps(fields, sort_keys=True),
    )


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "global.pt"


def _save_checkpoint(run_dir: Path, plane: GlobalPlane, evals: list[float]) -> None:
    """The global plane's whole protocol state after an outer step, written atomically."""
    path = checkpoint_path(run_dir)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"plane": plane, "evals": evals}, tmp)
    os.replace(tmp, path)


async def run_global(
    cfg: RunConfig, creds: Credentials, listen: str, run_dir: Path, resume: bool = False
) -> dict:
    """Serve the global plane until it finishes; writes metrics, summary, weights and its audit log.

    The plane is checkpointed at every outer step (before that step's reference goes out); with
    `resume` it continues from the checkpoint, and every boundary that (re)connects is brought up
    to date (`GlobalPlane.peer_rejoined`), so no outer step is lost or applied twice.
    """
    cfg = _deployable(cfg)
    wall0 = time.perf_counter()
    prep = prepare(cfg, local_devices=set())  # the global plane evaluates; it runs no device
    strategy = get_strategy(cfg.strategy)
    boundaries = [boundary_address(b.id) for b in cfg.boundaries]
    if resume:
        if not checkpoint_path(run_dir).exists():
            raise UserError(
                f"cannot resume: {checkpoint_path(run_dir)} does not exist (start without --resume)"
            )
        # Our own checkpoint, written by this code: a full object, not only tensors.
        state = torch.load(checkpoint_path(run_dir), weights_only=False)
        log.info("resuming from outer step %d", state["plane"].outer_step)
    plane = (
        state["plane"] if resume else make_global_plane(cfg, prep.trainer.initial_state(), creds.identity())
    )
    audit = _open_audit(run_dir, GLOBAL, creds, cfg)
    egress, ingress = make_guards(cfg, GLOBAL, plane.theta_g.numel(), audit)
    seeds = np.random.SeedSequence(cfg.seed).spawn(len(boundaries))
    links = {boundary_address(b.id): b.wan or cfg.network.wan for b in cfg.boundaries}
    outboxes = {a: Outbox(links[a], np.random.default_rng(s)) for a, s in zip(links, seeds, strict=True)}
    metrics = (run_dir / "metrics.jsonl").open("a")
    evals: list[float] = state["evals"] if resume else []
    done = asyncio.Event()
    connected: set[str] = set()
    started = resume

    def cross_bytes() -> int:
        return egress.bytes_total + ingress.bytes_total

    def on_emit(kind: str, fields: dict) -> None:
        record = {"kind": kind, **fields}
        if kind == "outer_step":
            record["val_loss"] = prep.trainer.evaluate(plane.theta_g, cfg.eval.sequences, cfg.eval.batch)
            record["tokens_total"] = plane.tokens_reported
            record["cross_boundary_bytes"] = cross_bytes()
            evals.append(record["val_loss"])
        metrics.write(json.dumps(record, sort_keys=True) + "\n")
        metrics.flush()
        if kind == "outer_step":
            # After the record, before the step's reference goes out: a crash in between repeats
            # the step's record on resume, never loses the step.
            _save_checkpoint(run_dir, plane, evals)

    def route(to: str, message: Message) -> None:
        try:
            outboxes[to].put(egress.send(node.now(), message, party_of(to)))
        except ContractViolation as err:
            log.error("refused to send: %s", err)

    node = Node(plane, GLOBAL, route, on_emit)

    def after_event() -> None:
        node.do(plane.check_budget(node.now(), cfg.budget, plane.tokens_reported, cross_bytes()))
        if plane.finished and not done.is_set():
            done.set()
            for outbox in outboxes.values():
                outbox.close()

    async def exchange(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        party, _ = peer_identity(context.auth_context())
        address = "boundary/" + party.removeprefix("boundary.") if party else ""
        if address not in outboxes:
            log.warning(
                "refused a connection from %s: not a boundary of this run", party or "an unidentified peer"
            )
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{party} is not a boundary of this run")
        sender = party_of(address)

        async def read() -> None:
            async for frame in requests:
                try:
                    body = ingress.receive(node.now(), frame, sender)
                except ContractViolation as err:
                    log.error("refused a message: %s", err)
                    continue
                if body is not None:
                    node.deliver(address, body)
                    after_event()

        reader = asyncio.create_task(read())
        nonlocal started
        connected.add(address)
        log.info("%s connected", party)
        if started:
            node.do(plane.peer_rejoined(node.now(), address))
        elif len(connected) == len(outboxes):
            started = True
            node.do(plane.start(node.now()))
        outbox = outboxes[address]
        try:
            async for frame in outbox.frames():
                yield frame
            # The final reference is out: read (and record) what the boundary sent before it saw
            # it, until the boundary closes its side, so both ends of every crossing are on record.
            await asyncio.wait_for(reader, HALF_CLOSE_S)
            log.info("%s closed its side; its stream ends", party)
        finally:
            reader.cancel()

    server = _server(creds, listen)
    server.add_generic_rpc_handlers([_handler("echelon.v1.CrossBoundary", exchange)])
    await server.start()
    await server.health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("global plane listening on %s for %d boundaries", listen, len(boundaries))
    try:
        while not done.is_set():
            await asyncio.sleep(0.05)
            if node.failed:
                raise node.failed
            after_event()  # time budgets advance without messages
        while not all(o.empty for o in outboxes.values()):
            await asyncio.sleep(0.05)
        await server.stop(grace=5.0)
    finally:
        node.stop()
        await server.stop(grace=None)  # a no-op after a clean stop; cancels streams otherwise
        metrics.close()
        audit.close()
    artefact = prep.bundle.save(run_dir, prep.trainer.model_part(plane.theta_g))
    summary = {
        "name": cfg.name,
        "runtime": "grpc",
        "strategy": strategy.label,
        "admissible": strategy.admissible,
        "start_val_loss": evals[0],
        "end_val_loss": evals[-1],
        "tokens": plane.tokens_reported,
        "outer_steps": plane.outer_step,
        "b_eff": plane.b_eff,
        "stop_reason": plane.final_reason,
        "virtual_time_s": node.now(),
        "wall_time_s": time.perf_counter() - wall0,
        "trainable_parameters": prep.bundle.dim,
        "partition_skew": prep.skew,
        "cross_boundary_bytes": dict(sorted((egress.bytes_by_type + ingress.bytes_by_type).items())),
        "artefact": artefact.name,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


async def run_boundary(
    cfg: RunConfig, creds: Credentials, boundary_id: str, listen: str, global_target: str, run_dir: Path
) -> None:
    """Coordinate boundary `boundary_id`: serve its devices, dial the global plane."""
    cfg = _deployable(cfg)
    spec = next((b for b in cfg.boundaries if b.id == boundary_id), None)
    if spec is None:
        raise UserError(
            f"boundary {boundary_id!r} is not in the run file (boundaries: {[b.id for b in cfg.boundaries]})"
        )
    party = party_of(boundary_address(boundary_id))
    plane = make_boundary_plane(cfg, spec, build_model(cfg.model, cfg.seed).dim, creds.identity())
    audit = _open_audit(run_dir, party, creds, cfg)
    egress, ingress = make_guards(cfg, party, plane.dim, audit, plane.ledger)
    seeds = np.random.SeedSequence([cfg.seed, len(boundary_id)]).spawn(len(spec.devices) + 1)
    to_global = Outbox(spec.wan or cfg.network.wan, np.random.default_rng(seeds[0]))
    to_device = {
        device_address(d.id): Outbox(cfg.network.lan, np.random.default_rng(s))
        for d, s in zip(spec.devices, seeds[1:], strict=True)
    }
    live: set[str] = set()
    streams: Counter[str] = Counter()  # connections per device, so only the latest one is live
    finishing = False

    def route(to: str, message: Message) -> None:
        if to == GLOBAL:
            if to_global.closed:
                log.error(
                    "dropped a %s after the final reference (nothing crosses then)", message.DESCRIPTOR.name
                )
                return
            try:
                to_global.put(egress.send(node.now(), message, GLOBAL))
            except ContractViolation as err:
                log.error("refused to send: %s", err)
        elif to in live:
            to_device[to].put(_device_frames(to.split("/", 1)[1], message))

    node = Node(plane, boundary_address(boundary_id), route, _log_event)

    async def exchange(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        peer, unit = peer_identity(context.auth_context())
        address = "device/" + peer.removeprefix("device.") if peer and peer.startswith("device.") else ""
        if address not in to_device or unit != party:
            reason = (
                f"its certificate names {unit}, not {party}"
                if peer and peer.startswith("device.") and unit != party
                else "it is not a device of this boundary"
            )
            log.warning("refused a connection from %s: %s", peer or "an unidentified peer", reason)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{peer} refused: {reason}")
        device_id = address.split("/", 1)[1]

        async def read() -> None:
            reassembly = _DeviceReassembly()
            async for frame in requests:
                try:
                    envelope = reassembly.add(frame)
                except DecodeError:
                    log.error("undecodable frame from %s; dropping its connection", peer)
                    return
                if envelope is None:
                    continue
                if envelope.device_id != device_id:
                    log.error("%s sent an envelope claiming device %r; ignored", peer, envelope.device_id)
                    continue
                node.deliver(address, unwrap(envelope))

        streams[address] += 1  # a reconnect: the new stream's frames() retires the old one's
        mine = streams[address]
        live.add(address)
        reader = asyncio.create_task(read())
        outbox = to_device[address]
        try:
            async for frame in outbox.frames():
                yield frame
                if reader.done():
                    break
        finally:
            reader.cancel()
            if streams[address] == mine and not finishing:
                live.discard(address)
                node.call("peer_lost", address)

    def from_global(frame: bytes) -> None:
        try:
            body = ingress.receive(node.now(), frame, GLOBAL)
        except ContractViolation as err:
            log.error("refused a message: %s", err)
            return
        if body is not None:
            node.deliver(GLOBAL, body)
            if plane.finished and not to_global.closed:
                log.info("final reference received: closing the stream to the global plane")
                to_global.close()  # half-close: the global plane ends the stream when it has read all

    server = _server(creds, listen)
    server.add_generic_rpc_handlers([_handler("echelon.v1.BoundaryLocal", exchange)])
    await server.start()
    await server.health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on %s for %d devices", party, listen, len(to_device))
    try:
        await _dial(creds, global_target, GLOBAL, CROSS_METHOD, to_global, lambda: None, from_global)
        finishing = True
        for outbox in to_device.values():
            outbox.close()
        await server.stop(grace=5.0)
    finally:
        node.stop()
        await server.stop(grace=None)
        audit.close()


async def run_device(
    cfg: RunConfig, creds: Credentials, device_id: str, boundary_target: str, workdir: Path | None = None
) -> None:
    """Train device `device_id` for its boundary until the boundary ends the stream. A device that
    is a plan's replica runs its rounds on the plan's job, kept under `workdir`."""
    cfg = _deployable(cfg)
    owner = next((b for b, d in cfg.devices if d.id == device_id), None)
    if owner is None:
        raise UserError(f"device {device_id!r} is not in the run file")
    if workdir is None and any(d.id == device_id and d.replica for _, d in cfg.devices):
        raise UserError(f"device {device_id!r} is a replica of a plan: give --run-dir for its job's files")
    prep = prepare(cfg, workdir, {device_id})
    boundary = boundary_address(owner)
    plane = make_device_plane(cfg, device_id, owner, prep.bundle.dim, creds.identity())
    outbox = Outbox(cfg.network.lan, np.random.default_rng(cfg.seed))
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-round")
    loop = asyncio.get_running_loop()

    def route(to: str, message: Message) -> None:
        outbox.put(_device_frames(device_id, message))

    def on_other(action: object) -> None:
        if not isinstance(action, StartLocalRound):
            raise TypeError(f"device cannot execute {action!r}")
        job = loop.run_in_executor(
            compute, prep.trainer.local_round, action.device, action.reference, action.anchor
        )
        job.add_done_callback(finished)

    def finished(job: asyncio.Future) -> None:
        try:
            node.call("local_round_finished", job.result())
        except BaseException as err:  # surfaced below, never lost in a callback
            node.failed = err
            failure.set()

    node = Node(plane, device_address(device_id), route, _log_event, on_other)
    reassembly = _DeviceReassembly()

    def on_connect() -> None:
        nonlocal reassembly
        reassembly = _DeviceReassembly()  # a half-received envelope died with the old stream
        node.call("start")

    def on_frame(frame: bytes) -> None:
        envelope = reassembly.add(frame)
        if envelope is not None:
            node.deliver(boundary, unwrap(envelope))

    failure = asyncio.Event()
    dial = asyncio.ensure_future(
        _dial(
            creds,
            boundary_target,
            f"boundary.{owner}",
            LOCAL_METHOD,
            outbox,
            on_connect,
            on_frame,
        )
    )
    watch = asyncio.ensure_future(failure.wait())
    try:
        await asyncio.wait([dial, watch], return_when=asyncio.FIRST_COMPLETED)
        if node.failed is not None:
            raise node.failed
        await dial
    finally:
        dial.cancel()
        watch.cancel()
        node.stop()
        compute.shutdown(wait=True, cancel_futures=True)
        prep.trainer.close()


def configure_logging(party: str) -> None:
    logging.basicConfig(
        level=os.environ.get("ECHELON_LOG", "INFO"),
        format=f"%(asctime)s {party} %(levelname)s %(message)s",
    )
