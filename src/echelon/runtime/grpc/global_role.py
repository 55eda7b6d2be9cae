"""The global plane deployed: boundaries dial it over gRPC with mutual TLS.

It runs the very `GlobalPlane` the simulator runs, behind its egress and ingress guards, and
records the run as the simulator does (`echelon.record.RunRecorder`: metrics, summary, final
weights), beside its audit log. Its plane is checkpointed
(a state dict) at every outer step, before that step's reference goes out; `resume` continues
from the checkpoint and brings every (re)connecting boundary up to date
(`GlobalPlane.peer_rejoined`), so no outer step is lost or applied twice. A boundary whose stream
ended is absent (`GlobalPlane.peer_lost`, as in the simulator's outage): outer steps go on
without it until it reconnects; one away when the run ends is given the final model if it comes
back within RETURN_S. When no boundary has
been heard from for `deployment.patience_s`, it ends the run on the last synchronised model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf.message import Message

from echelon import rundir
from echelon.assembly import make_global_plane, make_guards, prepare
from echelon.config import RunConfig
from echelon.contract.guard import ContractViolation
from echelon.errors import UserError
from echelon.parties import GLOBAL, boundary_address, boundary_id_of, party_of
from echelon.preflight import deployable
from echelon.record import RunRecorder
from echelon.runtime.grpc import evidence
from echelon.runtime.grpc.handshakes import HandshakeTap
from echelon.runtime.grpc.node import Node, Outbox
from echelon.runtime.grpc.tls import Credentials, peer_identity
from echelon.runtime.grpc.transport import (
    CROSS_SERVICE,
    LiveStreams,
    make_server,
    read_frames,
    serve_stream,
    start_server,
    stream_handler,
)
from echelon.runtime.network import Network
from echelon.sansio import Send
from echelon.v1 import boundary_pb2

log = logging.getLogger("echelon.serve")

HALF_CLOSE_S = 30.0  # how long the run's end waits for a boundary to close its side
DRAIN_S = 30.0  # how long the run's end waits for queued frames to leave
RETURN_S = 60.0  # how long the run's end waits for a boundary that is away to come back for the final model


class GlobalRole:
    """The global plane of `cfg` serving its boundaries on `listen`; `run()` until the run ends."""

    def __init__(
        self,
        cfg: RunConfig,
        creds: Credentials,
        listen: str,
        run_dir: Path,
        resume: bool,
        tensorboard: bool = False,
    ) -> None:
        self.cfg = cfg = deployable(cfg)
        self.run_dir, self.listen = run_dir, listen
        self.wall0 = time.perf_counter()
        self.prep = prepare(cfg, local_devices=set())  # the global plane evaluates; it runs no device
        self.plane = make_global_plane(
            cfg, self.prep.trainer.initial_state(), creds.identity(), self.prep.fragments
        )
        evals: list[float] = []
        path = rundir.checkpoint_path(run_dir, GLOBAL)
        if resume:
            state = rundir.load_checkpoint(path)
            try:
                self.plane.load_state_dict(state["plane"])
            except (KeyError, ValueError, RuntimeError) as e:
                raise UserError(f"cannot resume from {path}: {e}") from None
            evals = list(state["evals"])
            log.info("resuming from outer step %d", self.plane.outer_step)
        self.audit = evidence.open_audit(run_dir, GLOBAL, creds, cfg)
        self.egress, self.ingress = make_guards(
            cfg, GLOBAL, self.plane.theta_g.numel(), self.audit, None, self.prep.fragments
        )
        network = Network(cfg.seed)
        self.outboxes = {
            boundary_address(b.id): Outbox(
                network.link(GLOBAL, boundary_address(b.id), b.wan or cfg.network.wan)
            )
            for b in cfg.boundaries
        }
        self.streams = LiveStreams()
        self.told_final: set[str] = set()  # boundaries whose live stream was given the final reference
        self.started = resume
        self.refused = 0
        self.node = Node(self.plane, GLOBAL, self.route, self.on_emit)
        self.recorder = RunRecorder(
            run_dir,
            cfg,
            self.prep,
            self.plane,
            (self.egress, self.ingress),  # the global plane sees every crossing, once
            runtime="grpc",
            clock=self.node.now,
            tokens=lambda: self.plane.tokens_applied,
            evals=evals,
            tensorboard=tensorboard,
        )
        self.arriving: tuple[str, bytes, Message] | None = None  # (peer, frame, body) the plane is given
        self.heard_at = self.node.now()  # the last time any boundary connected or sent a frame
        self.done = asyncio.Event()
        self.server = make_server(creds, listen, [stream_handler(CROSS_SERVICE, self.exchange)])

    # -- the plane's actions ---------------------------------------------------------------------

    def on_emit(self, kind: str, fields: dict) -> None:
        if kind == "refused" and self.arriving is not None:  # the plane refused what a boundary sent
            self.refuse(*self.arriving, fields["reason"], recorded=False)
            return
        self.recorder.on_emit(kind, fields)

    def route(self, send: Send) -> None:
        to, message = send.to, send.message
        try:
            self.outboxes[to].put(self.egress.stream(self.node.now(), message, party_of(to), send.data))
        except ContractViolation as err:
            log.error("refused to send: %s", err)
            return
        if isinstance(message, boundary_pb2.GlobalReference) and message.final and to in self.streams:
            self.told_final.add(to)

    def after_event(self) -> None:
        plane, now = self.plane, self.node.now()
        self.node.do(
            plane.check_budget(now, self.cfg.budget, plane.tokens_reported, self.recorder.cross_bytes())
        )
        patience = self.cfg.deployment.patience_s
        if not plane.finished and now - self.heard_at > patience:
            log.error(
                "no boundary heard from for %.0f s (deployment.patience_s): ending the run on the model "
                "of outer step %d",
                now - self.heard_at,
                plane.outer_step,
            )
            self.node.do(plane.end(now, "patience"))
        if plane.finished and not self.done.is_set():
            self.done.set()
            for outbox in self.outboxes.values():
                outbox.close()

    # -- streams ---------------------------------------------------------------------------------

    def refuse(self, peer: str, frame: bytes, body: Message | None, reason: str, recorded: bool) -> None:
        """A frame from `peer` that was refused: logged, and put on record unless its guard did."""
        self.refused += 1
        log.error("refused a message from %s: %s", peer, reason)
        if not recorded:
            evidence.record_refusal(self.audit, self.node.now(), GLOBAL, peer, frame, body, reason)

    def on_frame(self, address: str, frame: bytes) -> None:
        """One frame from the boundary at `address`: through the ingress guard (which caps what a
        sliced message may hold), then to the plane. Any exception, and a refusal by the plane, is
        a recorded refusal; an exception is raised on for the stream's count."""
        peer = party_of(address)
        self.heard_at = self.node.now()
        body = None
        try:
            complete = self.ingress.receive_apart(self.node.now(), frame, peer)
            if complete is not None:
                body, data = complete.apart()
                self.arriving = (peer, frame, body)
                self.node.deliver(address, body, data)
        except Exception as err:
            self.ingress.forget(peer)
            recorded = isinstance(err, ContractViolation)
            self.refuse(peer, frame, body, str(err) if recorded else f"{type(err).__name__}: {err}", recorded)
            raise
        finally:
            self.arriving = None
        self.after_event()

    async def exchange(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        party, _ = peer_identity(context.auth_context())
        boundary_id = boundary_id_of(party)
        address = "" if boundary_id is None else boundary_address(boundary_id)
        if address not in self.outboxes:
            await self.refuse_stream(
                context, party, grpc.StatusCode.PERMISSION_DENIED, "not a boundary of this run"
            )
        token = self.streams.claim(address)
        if token is None:
            await self.refuse_stream(
                context,
                party,
                grpc.StatusCode.ALREADY_EXISTS,
                "it already holds a live stream (a second connection presenting its certificate)",
            )
        log.info("%s connected", party)
        self.heard_at = self.node.now()
        if self.started:
            self.node.do(self.plane.peer_rejoined(self.node.now(), address))
        elif len(self.streams_held()) == len(self.outboxes):
            self.started = True
            self.node.do(self.plane.start(self.node.now()))
        reader = read_frames(requests, lambda frame: self.on_frame(address, frame))
        try:
            async for frame in serve_stream(context, reader, self.outboxes[address], drain_s=HALF_CLOSE_S):
                yield frame
        finally:
            self.streams.release(address, token)
            self.ingress.forget(party)  # a half-received message died with the stream
            if not self.done.is_set():
                log.warning("%s disconnected: absent from the outer steps until it reconnects", party)
                self.audit.checkpoint("disconnect")
                if self.started:  # before the start every boundary is awaited anyway
                    self.node.do(self.plane.peer_lost(self.node.now(), address))

    def streams_held(self) -> list[str]:
        return [a for a in self.outboxes if a in self.streams]

    async def refuse_stream(
        self, context: grpc.aio.ServicerContext, party: str | None, code: grpc.StatusCode, why: str
    ) -> None:
        """Refuse a stream: one log line, an audit record when the peer names a party, the status."""
        who = party or "an unidentified peer"
        log.warning("refused a stream from %s: %s", who, why)
        if party and party != GLOBAL:
            evidence.record_refusal(
                self.audit, self.node.now(), GLOBAL, party, b"", None, f"stream refused: {why}"
            )
        await context.abort(code, f"{who} refused: {why}")

    # -- the run ---------------------------------------------------------------------------------

    async def run(self, handshakes: HandshakeTap | None = None) -> dict:
        """`handshakes`: the process's tap of TLS handshakes gRPC core refused; each goes
        into this party's audit log while it runs."""
        await start_server(self.server)
        if handshakes is not None:
            handshakes.attach(lambda why: self.audit.handshake_refused(self.node.now(), why))
        log.info("global plane listening on %s for %d boundaries", self.listen, len(self.outboxes))
        try:
            while not self.done.is_set():
                await asyncio.sleep(0.05)
                if self.node.failed:
                    raise self.node.failed
                evidence.check_writable(self.audit)
                self.after_event()  # time budgets and patience advance without messages
            # A boundary away at the end (an outage, a restart) gets the final model when it comes
            # back (`peer_rejoined` sends it the whole reference, final), for up to RETURN_S, or
            # patience_s when that is shorter (a run ended on its patience waits no more).
            wait = (
                0.0
                if self.plane.final_reason == "patience"
                else min(RETURN_S, self.cfg.deployment.patience_s)
            )
            deadline = time.monotonic() + wait
            while set(self.outboxes) - self.told_final and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + DRAIN_S
            while self._sending() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await self.server.stop(grace=HALF_CLOSE_S)
        finally:
            if handshakes is not None:
                handshakes.detach()
            self.node.stop()
            await self.server.stop(grace=None)  # a no-op after a clean stop; cancels streams otherwise
            self.recorder.close()
            self.audit.close("close" if self.done.is_set() else "interrupted")
        return self.finish()

    def _sending(self) -> bool:
        """Frames are still queued for a boundary that is connected."""
        return any(not o.empty for a, o in self.outboxes.items() if a in self.streams)

    def finish(self) -> dict:
        """Write the final model and the summary; UserError (the checkpoint kept) when the disk refuses."""
        summary = self.recorder.finish(
            time.perf_counter() - self.wall0,
            middle_steps=self.plane.middle_steps,
            intra_boundary_bytes={},  # each boundary's own business: not seen by the global plane
            refused=self.refused,  # every message refused on arrival, by the guard or the plane
            hint=": free space and run `echelon serve global --resume`",
        )
        return summary.to_dict()


async def run_global(
    cfg: RunConfig,
    creds: Credentials,
    listen: str,
    run_dir: Path,
    resume: bool = False,
    handshakes: HandshakeTap | None = None,
    tensorboard: bool = False,
) -> dict:
    """Serve the global plane of `cfg` on `listen` until the run ends; returns the run's summary.
    `tensorboard` adds TensorBoard event files whatever the run file's metrics.tensorboard says."""
    return await GlobalRole(cfg, creds, listen, run_dir, resume, tensorboard).run(handshakes)
