"""A boundary coordinator deployed: it serves its devices and dials the global plane.

It runs the very `BoundaryPlane` the simulator runs. Everything to and from the global plane
passes its egress and ingress guards and is recorded in its audit log; what its devices send is
reassembled under a byte cap and an expiry. Its plane is checkpointed (a state dict) whenever it
makes progress (a middle step, a sync, a new reference); `resume` continues from the checkpoint,
so a restarted boundary keeps its middle steps since the last sync, the devices it admitted and
those that left.

Membership (`admission`): a device is served when its certificate (checked by mutual TLS against
the run's CA) names it and this boundary, and the run file makes it a member here: its initial
membership, or a `churn.joins` entry for this boundary, admitted (`BoundaryPlane.admit`) on its
first connection. A device that said goodbye is removed for good (`BoundaryPlane.remove`) and
refused if it comes back. Every admission, departure and refusal of a device is a `membership`
record of the audit log.
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
from echelon.parties import GLOBAL, boundary_address, device_address, device_id_of, device_party, party_of
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
from echelon.sansio import Send
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
        self.joiners = {j.device.id: i for i, j in enumerate(cfg.churn.joins) if j.boundary == boundary_id}
        members = [d.id for d in spec.devices] + list(self.joiners)
        self.to_device = {
            device_address(d): Outbox(network.link(self.address, device_address(d), cfg.network.lan))
            for d in members
        }
        self.cap = envelope_cap(self.plane.dim, len(members))
        self.streams = LiveStreams()
        self.finishing = False
        self.node = Node(self.plane, self.address, self.route, self.on_emit)
        self.arriving: tuple[bytes, Message] | None = None  # (frame, body) from the global plane
        self._progress = self._progress_mark()
        self.server = make_server(creds, listen, [stream_handler(LOCAL_SERVICE, self.exchange)])

    # -- the plane's actions ---------------------------------------------------------------------

    def route(self, send: Send) -> None:
        to, message = send.to, send.message
        if to != GLOBAL:
            if send.data is not None:
                raise TypeError(
                    "tensor data beside a message crosses boundaries only: a device's holds its own"
                )
            if to in self.streams:
                self.to_device[to].put(device_frames(to.split("/", 1)[1], message))
            return
        if self.to_global.closed:
            log.error(
                "dropped a %s after the final reference (nothing crosses then)", message.DESCRIPTOR.name
            )
            return
        try:
            self.to_global.put(self.egress.stream(self.node.now(), message, GLOBAL, send.data))
        except ContractViolation as err:
            log.error("refused to send: %s", err)

    def on_emit(self, kind: str, fields: dict) -> None:
        """Telemetry to the log; the plane's refusal of what the global plane sent, and a device's
        departure, also go on record."""
        evidence.log_event(kind, fields)
        if kind == "departed":
            device = device_party(fields["device"].split("/", 1)[1])
            log.info(
                "%s left the run for good at %.3f s (after middle step %d)",
                device,
                fields["time"],
                fields["middle_step"],
            )
            self.audit.membership(self.node.now(), device, "departed", "it said goodbye: removed for good")
        if kind == "middle_step" and self.plane.last_step is not None:
            # Boundary-local knowledge (never crosses): who this middle step aggregated.
            step = self.plane.last_step
            members = ", ".join(sorted(step.weights))
            log.info(
                "middle step %d aggregated %s (round opened at %.3f s)",
                step.middle_step,
                members,
                step.opened_at,
            )
        if kind == "refused" and self.arriving is not None:
            frame, body = self.arriving
            now = self.node.now()
            evidence.record_refusal(self.audit, now, self.party, GLOBAL, frame, body, fields["reason"])

    def _progress_mark(self) -> tuple:
        p = self.plane
        return (p.middle_step, p.version, p.adopted_step, p.awaiting_global, p.finished, p.roster)

    def after_event(self) -> None:
        """Checkpoint the plane when it made progress (every middle step, sync and reference) or
        its membership changed."""
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
            complete = self.ingress.receive_apart(self.node.now(), frame, GLOBAL)
            if complete is not None:
                body, data = complete.apart()
                self.arriving = (frame, body)
                self.node.deliver(GLOBAL, body, data)
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

    def admission(self, peer: str | None, unit: str | None) -> str | None:
        """Why the device whose (CA-verified) certificate names party `peer` of boundary `unit`
        is refused a stream, or None: it is admitted. A device of `churn.joins` is admitted into
        the plane on its first connection; every admission and refusal of a device is recorded."""
        device_id = device_id_of(peer)
        if device_id is None:
            return "its certificate names no device"
        address = device_address(device_id)
        why = None
        if unit != self.party:
            why = f"its certificate names {unit}, not {self.party}"
        elif address not in self.to_device:
            why = "it is not a device of this boundary (its initial membership or a churn.joins entry)"
        elif self.plane.departed(address):
            why = "it left the run for good"
        if why is not None:
            self.audit.membership(self.node.now(), peer, "refused", why)
            return why
        if device_id in self.joiners and not self.plane.member(address):
            self.node.call("admit", address)
            i = self.joiners[device_id]
            reason = f"certificate of {self.party} from the run's CA; churn.joins[{i}] names it"
            self.audit.membership(self.node.now(), peer, "admitted", reason)
            log.info("admitted %s: %s", peer, reason)
            self.after_event()  # the admission survives a restart
        return None

    async def exchange(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        peer, unit = peer_identity(context.auth_context())
        why = self.admission(peer, unit)
        if why is not None:
            log.warning("refused a stream from %s: %s", peer or "an unidentified peer", why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{peer} refused: {why}")
        address = device_address(device_id_of(peer))
        token = self.streams.claim(address)
        if token is None:
            why = "it already holds a live stream (a second connection presenting its certificate)"
            log.warning("refused a stream from %s: %s", peer, why)
            self.audit.membership(self.node.now(), peer, "refused", why)
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
            if not self.finishing and not self.plane.departed(address):
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
                evidence.check_writable(self.audit)
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
