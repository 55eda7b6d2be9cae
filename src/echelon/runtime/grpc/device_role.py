"""A device deployed: it dials its boundary and trains whenever it holds a reference.

It runs the very `DevicePlane` the simulator runs; local rounds run on a worker thread so the
stream stays served while it computes. With `churn:` in the run file the device goes away and
comes back as the simulator schedules it: the same seeded share of the devices cycles
(`echelon.runtime.churn`), with uptimes and downtimes drawn from the same exponentials and the
same seeds; a round in progress when it leaves is lost, as are the frames it had not sent.
`depart()` (SIGUSR1 to `echelon serve device`; `echelon launch` sends it at the device's
`churn.departures` time) makes it leave for good: it says goodbye to its boundary (once more
online if it was away) and ends. A device of `churn.joins` is started at its time by whoever runs
it (`echelon launch` does); its boundary admits it by its certificate. A device that is a replica of a
Yellowstone plan (`boundaries[].plan`) runs its rounds on the plan's job, whose files live under
its `workdir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from echelon.assembly import make_device_plane, prepare
from echelon.config import RunConfig
from echelon.errors import UserError
from echelon.parties import boundary_address, device_address
from echelon.planes.device import StartLocalRound
from echelon.preflight import deployable
from echelon.runtime.churn import churn_rngs, cycling_devices
from echelon.runtime.grpc import evidence
from echelon.runtime.grpc.framing import DeviceReassembly, device_frames, envelope_cap
from echelon.runtime.grpc.node import Node, Outbox
from echelon.runtime.grpc.tls import Credentials
from echelon.runtime.grpc.transport import LOCAL_METHOD, Dialer
from echelon.runtime.network import Network
from echelon.sansio import Send
from echelon.wire import unwrap

log = logging.getLogger("echelon.serve")

GOODBYE_GRACE_S = 1.0  # how long a leaving device holds its stream after its goodbye went out


def owner_of(cfg: RunConfig, device_id: str) -> str:
    """The boundary id device `device_id` belongs to; UserError naming the known devices."""
    owner = next((b for b, d in cfg.all_devices if d.id == device_id), None)
    if owner is None:
        known = ", ".join(d.id for _, d in cfg.all_devices)
        raise UserError(f"device {device_id!r} is not in the run file (devices: {known})")
    return owner


class DeviceRole:
    """Device `device_id` of `cfg`, training for its boundary at `boundary_target`; a plan's
    replica keeps its job's files under `workdir`."""

    def __init__(
        self,
        cfg: RunConfig,
        creds: Credentials,
        device_id: str,
        boundary_target: str,
        workdir: Path | None = None,
    ) -> None:
        self.cfg = cfg = deployable(cfg)
        owner = owner_of(cfg, device_id)
        if workdir is None and any(d.id == device_id and d.replica for _, d in cfg.devices):
            raise UserError(
                f"device {device_id!r} is a replica of a plan: give --run-dir for its job's files"
            )
        self.creds, self.device_id, self.boundary_target = creds, device_id, boundary_target
        self.address, self.boundary = device_address(device_id), boundary_address(owner)
        self.prep = prepare(cfg, workdir, {device_id})
        self.plane = make_device_plane(cfg, device_id, owner, self.prep.bundle.dim, creds.identity())
        network = Network(cfg.seed)
        self.outbox = Outbox(network.link(self.address, self.boundary, cfg.network.lan))
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-round")
        every = [device_address(d.id) for _, d in cfg.all_devices]
        self.churn_rng = churn_rngs(every, cfg.seed)[self.address]  # the simulator's draws
        initial = [device_address(d.id) for _, d in cfg.devices]
        self.cycles = self.address in cycling_devices(cfg.churn, initial, cfg.seed)
        self.session = 0  # bumps when the device goes away: a round of an earlier session is dropped
        self.cap = envelope_cap(self.prep.trainer.initial_state().numel(), 1)
        self.node = Node(self.plane, self.address, self.route, evidence.log_event, self.on_other)
        self.reassembly = DeviceReassembly(self.cap, self.node.now)
        self.failure = asyncio.Event()
        self.leaving = asyncio.Event()  # set by `depart`: leave the run for good

    def route(self, send: Send) -> None:
        self.outbox.put(device_frames(self.device_id, send.message))

    def on_other(self, action: object) -> None:
        if not isinstance(action, StartLocalRound):
            raise TypeError(f"device cannot execute {action!r}")
        loop, session = asyncio.get_running_loop(), self.session
        job = loop.run_in_executor(
            self.compute, self.prep.trainer.local_round, action.device, action.reference, action.anchor
        )
        job.add_done_callback(lambda done: self.finished(done, session))

    def finished(self, job: asyncio.Future, session: int) -> None:
        try:
            result = job.result()
            if session == self.session:  # else the device went away meanwhile: the work is lost
                self.node.call("local_round_finished", result)
        except BaseException as err:  # surfaced by `run`, never lost in a callback
            self.node.failed = err
            self.failure.set()

    def on_connect(self) -> None:
        self.reassembly.reset()  # a half-received envelope died with the old stream
        self.node.call("start")

    def on_frame(self, frame: bytes) -> None:
        try:
            envelope = self.reassembly.add(frame)
            if envelope is not None:
                self.node.deliver(self.boundary, unwrap(envelope))
        except Exception as err:
            log.error("refused a message from its boundary: %s", err)
            raise

    def depart(self) -> None:
        """Leave the run for good, now (the departure is carried out by `run`)."""
        log.info("churn: leaving the run for good")
        self.leaving.set()

    def on_goodbye(self) -> None:
        self.reassembly.reset()
        self.node.call("leave")

    async def _online(self, uptime: float | None, goodbye: bool = False) -> bool:
        """Hold the stream to the boundary for `uptime` seconds (None: until the run is over), or
        with `goodbye` only until the device's goodbye is out; True when the run is over for it."""
        dialer = Dialer(
            self.creds,
            self.boundary_target,
            self.boundary.replace("/", "."),
            LOCAL_METHOD,
            self.outbox,
            self.cfg.deployment.patience_s,
            on_connect=self.on_goodbye if goodbye else self.on_connect,
            on_frame=self.on_frame,
            on_lost=lambda why: None,
        )
        dial, watch = asyncio.ensure_future(dialer.run()), asyncio.ensure_future(self.failure.wait())
        leaving = asyncio.ensure_future(self._said_goodbye() if goodbye else self.leaving.wait())
        try:
            await asyncio.wait([dial, watch, leaving], timeout=uptime, return_when=asyncio.FIRST_COMPLETED)
            if self.node.failed is not None:
                raise self.node.failed
            if dial.done():
                dial.result()
                return True
            return goodbye and leaving.done()
        finally:
            for task in (dial, watch, leaving):
                task.cancel()
            await asyncio.gather(dial, watch, leaving, return_exceptions=True)

    async def _said_goodbye(self) -> None:
        """Until the goodbye was queued and has left (GOODBYE_GRACE_S more for it to arrive)."""
        while not (self.plane.left and self.outbox.empty):
            await asyncio.sleep(0.1)
        await asyncio.sleep(GOODBYE_GRACE_S)

    async def run(self) -> None:
        churn = self.cfg.churn
        try:
            while not self.leaving.is_set():
                uptime = self.churn_rng.exponential(churn.mean_uptime_s) if self.cycles else None
                if await self._online(uptime):
                    return
                self.session += 1
                self.outbox.clear()  # what it had not sent is lost with it
                if self.leaving.is_set():
                    break
                downtime = self.churn_rng.exponential(churn.mean_downtime_s)
                log.info("churn: offline for %.1f s", downtime)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.leaving.wait(), downtime)
            if not await self._online(self.cfg.deployment.patience_s, goodbye=True):
                log.warning("left without its boundary hearing the goodbye")
        finally:
            self.node.stop()
            self.compute.shutdown(wait=True, cancel_futures=True)
            self.prep.trainer.close()


async def run_device(
    cfg: RunConfig,
    creds: Credentials,
    device_id: str,
    boundary_target: str,
    workdir: Path | None = None,
) -> None:
    """Train device `device_id` for its boundary until the boundary says the run is over, or the
    device leaves for good (SIGUSR1). A device that is a plan's replica runs its rounds on the
    plan's job, kept under `workdir`."""
    role = DeviceRole(cfg, creds, device_id, boundary_target, workdir)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, role.depart)
    await role.run()
