"""Network model: one directed link per (sender, receiver) pair, deterministic from a seed.

Both runtimes use it: the simulator schedules arrivals on its virtual clock, the deployment
holds each frame in its outbox until the same link says it arrives, on the wall clock.

A link sends one message at a time (a stream, like TCP): transmission takes bytes / bandwidth
after the previous message has left, then the message spends a propagation latency in flight.
Latency is the median +/- jitter percent (uniform), times a burst factor while the link is in
the bad state of a Gilbert-Elliott chain. Messages on one link arrive in the order sent.
"""

from __future__ import annotations

import zlib

import numpy as np

from echelon.config import LinkConfig


class Link:
    def __init__(self, cfg: LinkConfig, rng: np.random.Generator) -> None:
        self.cfg, self._rng = cfg, rng
        self._free_at = 0.0  # when the sender side finishes transmitting its last message
        self._last_arrival = 0.0
        self._bad = False

    def transit(self, now: float, nbytes: int) -> float:
        """Arrival time of a message of `nbytes` handed to the link at `now` (seconds)."""
        cfg = self.cfg
        start = max(now, self._free_at)
        self._free_at = start + nbytes * 8 / (cfg.bandwidth_mbps * 1e6)
        latency = cfg.latency_ms / 1e3
        if cfg.jitter_pct:
            latency *= 1 + (cfg.jitter_pct / 100) * self._rng.uniform(-1.0, 1.0)
        if cfg.bursty is not None:
            flip = self._rng.random()
            self._bad = (flip >= cfg.bursty.p_exit) if self._bad else (flip < cfg.bursty.p_enter)
            if self._bad:
                latency *= cfg.bursty.latency_factor
        self._last_arrival = max(self._free_at + latency, self._last_arrival)
        return self._last_arrival


class Network:
    """Links created on first use, each seeded from (run seed, link name)."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._links: dict[tuple[str, str], Link] = {}

    def link(self, src: str, dst: str, cfg: LinkConfig) -> Link:
        key = (src, dst)
        if key not in self._links:
            name_seed = zlib.crc32(f"{src}->{dst}".encode())
            self._links[key] = Link(cfg, np.random.default_rng([self._seed, name_seed]))
        return self._links[key]
