"""A boundary coordinator deployed: it serves its devices and dials the global plane.

It runs the very `BoundaryPlane` the simulator runs. Everything to and from the global plane
passes its egress and ingress guards and is recorded in its audit log; what its devices send is
reassembled under a byte cap and an expiry. Its plane is checkpointed (a state dict) whenever it
makes progress (a middle step, a sync, a new reference); `resume` continues from the checkpoint,
so a restarted boundary keeps its middle steps since the last sync.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf.message import Message

from echelon import rundir
from echelon.assembly import make_boundary_plane, make_guards, plane_fragments
from echelon.config import RunConfig
from echelon.contract.guard import ContractViolation
from echelon.errors import UserError
from echelon.parties import GLOBAL, boundary_address, device_address, device_id_of, party_of
from echelon.preflight import deployable
from echelon.runtime.grpc import evidence
from echelon.runtime.grpc.framing import (
    DeviceReassembly,
    FrameRefused,
    MessageTooLarge,
    device_frames,
    envelope_cap,
)
from echelon.runtime.grpc.handshakes import HandshakeTap
from echelon.runtime.grpc.node import Node, Outbox
from echelon.runtime.grpc.tls import Credentials, peer_identity
from echelon.runtime.grpc.transport import (
    CROSS_METHOD,
    LOCAL_SERVICE,
    Dialer,
    LiveStreams,
    StreamClosed,
    make_server,
    read_frames,
    serve_stream,
    start_server,
    stream_handler,
)
from echelon.runtime.network import Network
from echelon.train.model import build_model
from echelon.wire import unwrap

log = logging.getLogger("echelon.serve")


class BoundaryRole:
    """Boundary `boundary_id` of `cfg`: serves its devices on `listen`, dials `global_target`."""

    def __init__(
        self,
        cfg: RunConfig,
        creds: Credentials,
        boundary_id: str,
        listen: str,
        global_target: str,
        run_dir: Path,
        resume: bool,
    ) -> None:
        self.cfg = cfg = deployable(cfg)
        spec = next((b for b in cfg.boundaries if b.id == boundary_id), None)
        if spec is None:
            raise UserError(
                f"boundary {boundary_id!r} is not in the run file (boundaries: {[b.id for b in cfg.boundaries]})"
            )
        self.address = boundary_address(boundary_id)
        self.party = party_of(self.address)
        self.creds, self.listen, self.global_target, self.run_dir = creds, listen, global_target, run_dir
        bundle = build_model(cfg.model, cfg.seed)
        fragments = plane_fragments(cfg, bundle)
        self.plane = make_boundary_plane(cfg, spec, bundle.dim, creds.identity(), fragments)
        self.checkpoint = rundir.checkpoint_path(run_dir, self.party)
        if resume and self.checkpoint.exists():
            try:
                self.plane.load_state_dict(rundir.load_checkpoint(self.checkpoint)["plane"])
            except (KeyError, ValueError, RuntimeError) as err:
                raise UserError(f"cannot resume from {self.checkpoint}: {err}") from None
            log.info("resuming at middle step %d", self.plane.middle_step)
        self.audit = evidence.open_audit(run_dir, self.party, creds, cfg)
        self.egress, self.ingress = make_guards(
            cfg, self.party, self.plane.dim, self.audit, self.plane.ledger, fragments
        )
        network = Network(cfg.seed)
        self.to_global = Outbox(network.link(self.address, GLOBAL, spec.wan or cfg.network.wan))
        self.to_device = {
            device_address(d.id): Outbox(network.link(self.address, device_address(d.id), cfg.network.lan))
            for d in spec.devices
        }
        self.cap = envelope_cap(self.plane.dim, len(spec.devices))
        self.streams = LiveStreams()
        self.finishing = False
        self.node = Node(self.plane, self.address, self.route, self.on_emit)
        self.arriving: tuple[bytes, Message] | None = None  # (frame, body) from the global plane
        self._progress = self._progress_mark()
        self.server = make_server(creds, listen, [stream_handler(LOCAL_SERVICE, self.exchange)])

    # -- the plane's actions ---------------------------------------------------------------------

    def route(self, to: str, message: Message) -> None:
        if to != GLOBAL:
            if to in self.streams:
                self.to_device[to].put(device_frames(to.split("/", 1)[1], message))
            return
        if self.to_global.closed:
            log.error(
                "dropped a %s after the final reference (nothing crosses then)", message.DESCRIPTOR.name
            )
            return
        try:
            self.to_global.put(self.egress.stream(self.node.now(), message, GLOBAL))
        except ContractViolation as err:
            log.error("refused to send: %s", err)

    def on_emit(self, kind: str, fields: dict) -> None:
        """Telemetry to the log; the plane's refusal of what the global plane sent also goes on record."""
        evidence.log_event(kind, fields)
        if kind == "refused" and self.arriving is not None:
            frame, body = self.arriving
            now = self.node.now()
            evidence.record_refusal(self.audit, now, self.party, GLOBAL, frame, body, fields["reason"])

    def _progress_mark(self) -> tuple:
        p = self.plane
        return (p.middle_step, p.version, p.adopted_step, p.awaiting_global, p.finished)

    def after_event(self) -> None:
        """Checkpoint the plane when it made progress (every middle step, sync and reference)."""
        mark = self._progress_mark()
        if mark != self._progress:
            self._progress = mark
            rundir.save_checkpoint(self.checkpoint, {"plane": self.plane.state_dict()})

    # -- the global plane's stream ---------------------------------------------------------------

    def from_global(self, frame: bytes) -> None:
        """One frame from the global plane, through the ingress guard (which caps what a sliced
        message may hold); any exception is a recorded refusal, raised for the count."""
        body = None
        try:
            body = self.ingress.receive(self.node.now(), frame, GLOBAL)
            if body is not None:
                self.arriving = (frame, body)
                self.node.deliver(GLOBAL, body)
        except Exception as err:
            self.ingress.forget(GLOBAL)
            log.error("refused a message from the global plane: %s", err)
            if not isinstance(err, ContractViolation):
                reason = f"{type(err).__name__}: {err}"
                evidence.record_refusal(self.audit, self.node.now(), self.party, GLOBAL, frame, body, reason)
            raise
        finally:
            self.arriving = None
        self.after_event()
        if self.plane.finished and not self.to_global.closed:
            log.info("final reference received: closing the stream to the global plane")
            self.to_global.close()  # half-close: the global plane ends the stream when it has read all

    def global_lost(self, why: str) -> None:
        self.ingress.forget(GLOBAL)  # a half-received message died with the stream
        self.audit.checkpoint("disconnect")

    # -- the devices' streams --------------------------------------------------------------------

    async def exchange(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        peer, unit = peer_identity(context.auth_context())
        device_id = device_id_of(peer)
        is_device = device_id is not None
        address = device_address(device_id) if is_device else ""
        if address not in self.to_device or unit != self.party:
            why = (
                f"its certificate names {unit}, not {self.party}"
                if is_device and unit != self.party
                else "it is not a device of this boundary"
            )
            log.warning("refused a stream from %s: %s", peer or "an unidentified peer", why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{peer} refused: {why}")
        token = self.streams.claim(address)
        if token is None:
            why = "it already holds a live stream (a second connection presenting its certificate)"
            log.warning("refused a stream from %s: %s", peer, why)
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{peer} refused: {why}")
        device_id = address.split("/", 1)[1]
        reassembly = DeviceReassembly(self.cap, self.node.now)
        outbox = self.to_device[address]

        def on_frame(frame: bytes) -> None:
            try:
                envelope = reassembly.add(frame)
                if envelope is None:
                    return
                if envelope.device_id != device_id:
                    raise FrameRefused(f"an envelope claiming device {envelope.device_id[:64]!r}")
                self.node.deliver(address, unwrap(envelope))
            except Exception as err:
                log.error("refused a message from %s: %s", peer, err)
                if isinstance(err, MessageTooLarge):
                    raise StreamClosed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None
                raise
            self.after_event()

        try:
            async for frame in serve_stream(context, read_frames(requests, on_frame), outbox):
                yield frame
        finally:
            self.streams.release(address, token)
            outbox.clear()  # a device that comes back starts clean
            if not self.finishing:
                log.info("%s disconnected", peer)
                self.node.call("peer_lost", address)

    # -- the run ---------------------------------------------------------------------------------

    async def run(self, handshakes: HandshakeTap | None = None) -> None:
        """`handshakes`: the process's tap of TLS handshakes gRPC core refused; each goes
        into this party's audit log while it runs."""
        await start_server(self.server)
        if handshakes is not None:
            handshakes.attach(lambda why: self.audit.handshake_refused(self.node.now(), why))
        log.info("%s listening on %s for %d devices", self.party, self.listen, len(self.to_device))
        dialer = Dialer(
            self.creds,
            self.global_target,
            GLOBAL,
            CROSS_METHOD,
            self.to_global,
            self.cfg.deployment.patience_s,
            on_connect=lambda: None,
            on_frame=self.from_global,
            on_lost=self.global_lost,
        )
        finished = False
        dial = asyncio.ensure_future(dialer.run())
        try:
            while not dial.done():
                await asyncio.wait([dial], timeout=0.5)
                if self.node.failed:
                    raise self.node.failed
                self.after_event()  # progress a timer made (a round ended by its deadline)
            dial.result()
            finished = True
            self.finishing = True
            for outbox in self.to_device.values():
                outbox.close()
            await self.server.stop(grace=5.0)
        finally:
            if handshakes is not None:
                handshakes.detach()
            if not dial.done():
                dial.cancel()
            self.node.stop()
            await self.server.stop(grace=None)
            self.audit.close("close" if finished else "interrupted")


async def run_boundary(
    cfg: RunConfig,
    creds: Credentials,
    boundary_id: str,
    listen: str,
    global_target: str,
    run_dir: Path,
    resume: bool = False,
    handshakes: HandshakeTap | None = None,
) -> None:
    """Coordinate boundary `boundary_id` until the global plane ends the run."""
    await BoundaryRole(cfg, creds, boundary_id, listen, global_target, run_dir, resume).run(handshakes)
