"""The deployment driver of one plane: executes its sans-IO actions on an asyncio loop.

The very plane objects the simulator drives run here; only the clock and the wires differ.
`now` is seconds since the node started (monotonic). Timers are loop callbacks. A `Send` goes to
the `Outbox` of the peer's link, which holds each frame until the simulator's link model says it
arrives, keeping per-link order. Emits go to a callback (metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from google.protobuf.message import Message

from echelon.contract.slicing import Frames
from echelon.runtime.network import Link
from echelon.sansio import CancelTimer, Data, Emit, PlaneAction, Send, SetTimer

log = logging.getLogger("echelon.node")


class Outbox:
    """Frames for one peer, released in order at the arrival times the emulated link gives them.

    The link is the simulator's own (`echelon.runtime.network.Link`: transmission at the
    link's bandwidth, latency with jitter and Gilbert-Elliott bursts), seeded per link name as the
    simulator seeds it, on the wall clock. One stream at a time takes frames (`frames`); a frame a
    broken stream had taken is lost with it, as on a real link. An egress guard's `Frames` are
    built one by one as they are taken, so a large message is sent while its next slice is built.
    """

    def __init__(self, link: Link) -> None:
        self.link = link
        self._items: deque[tuple[float, Sequence[bytes], int]] = deque()  # release time, frames[k]
        self._wake = asyncio.Event()
        self._epoch = 0
        self.closed = False

    def put(self, frames: Sequence[bytes]) -> None:
        """Queue `frames`: a list, or a guard's `Frames` (whose sizes are known before they are built)."""
        now = asyncio.get_running_loop().time()
        sizes = frames.sizes() if isinstance(frames, Frames) else [len(f) for f in frames]
        for k, size in enumerate(sizes):
            self._items.append((self.link.transit(now, size), frames, k))
        self._wake.set()

    def clear(self) -> None:
        """Forget the frames not yet taken (the peer went away and starts afresh when it returns)."""
        self._items.clear()

    def close(self) -> None:
        """No more frames: the stream ends once the queued ones are out."""
        self.closed = True
        self._wake.set()

    async def frames(self, until: asyncio.Future | None = None) -> AsyncIterator[bytes]:
        """Yield frames at their release time until closed and drained, until `until` is done, or
        until a newer `frames()` call retires this one (a failed call's iterator may linger in
        gRPC and would otherwise take frames to a dead stream)."""
        loop = asyncio.get_running_loop()
        self._epoch += 1
        epoch = self._epoch
        self._wake.set()  # wakes a retired iterator, which then ends
        if until is not None:
            until.add_done_callback(lambda _: self._wake.set())
        while epoch == self._epoch and (until is None or not until.done()):
            if not self._items:
                if self.closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            at, frames, k = self._items[0]
            delay = at - loop.time()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            self._items.popleft()
            yield frames[k]

    @property
    def empty(self) -> bool:
        return not self._items


class Node:
    """Runs one plane: feed it events with `deliver`/`call`, and it executes the actions.

    `route(send)` hands a Send to the transport; `on_emit(kind, fields)` receives telemetry;
    `on_other(action)` handles plane-specific actions (a device's StartLocalRound).
    """

    def __init__(
        self,
        plane: Any,
        address: str,
        route: Callable[[Send], None],
        on_emit: Callable[[str, dict], None],
        on_other: Callable[[object], None] | None = None,
    ) -> None:
        self.plane, self.address = plane, address
        self._route, self._on_emit, self._on_other = route, on_emit, on_other
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.failed: BaseException | None = None

    def now(self) -> float:
        return self._loop.time() - self._t0

    def call(self, method: str, *args: object) -> None:
        """Call `plane.<method>(now, *args)` and execute the actions it returns."""
        self.do(getattr(self.plane, method)(self.now(), *args))

    def deliver(self, sender: str, message: Message, data: Data = None) -> None:
        """`message` from `sender` to the plane; `data`: its tensor's data, held apart (`Send.data`)."""
        log.debug("%s <- %s: %s", self.address, sender, message.DESCRIPTOR.name)
        if data is None:
            self.call("receive", sender, message)
        else:
            self.call("receive", sender, message, data)

    def do(self, actions: list[PlaneAction]) -> None:
        for action in actions:
            if isinstance(action, Send):
                log.debug("%s -> %s: %s", self.address, action.to, action.message.DESCRIPTOR.name)
                self._route(action)
            elif isinstance(action, SetTimer):
                self._cancel(action.key)
                at = self._t0 + action.at
                self._timers[action.key] = self._loop.call_at(at, self._fire, action.key)
            elif isinstance(action, CancelTimer):
                self._cancel(action.key)
            elif isinstance(action, Emit):
                self._on_emit(action.kind, {"time": self.now(), **action.fields})
            elif self._on_other is not None:
                self._on_other(action)
            else:
                raise TypeError(f"{self.address} cannot execute {action!r}")

    def _cancel(self, key: str) -> None:
        handle = self._timers.pop(key, None)
        if handle is not None:
            handle.cancel()

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        try:
            self.call("on_timer", key)
        except Exception as e:  # surfaced by the role's main loop, never swallowed
            log.exception("%s: timer %s failed", self.address, key)
            self.failed = e

    def stop(self) -> None:
        for key in list(self._timers):
            self._cancel(key)
