"""Outer synchronisation cadence: a fixed interval (Echelon) or drift-aware (Echelon-DA).

Drift-aware: each boundary's drift proxy D_b maps to a scheduled interval

    H_b = H_min + round((H_max - H_min) * (1 - sigmoid(kappa * (D_b - D_0))))

and the global cadence is H = min_b H_b: the most-drifting boundary (the driver) sets it.
D_0 is calibrated as the mean drift reported at the first synchronisation unless configured;
until then the fixed `interval` applies.
"""

from __future__ import annotations

import math

from echelon.config import SyncConfig


class Cadence:
    """Decides how many middle steps separate outer steps."""

    def __init__(self, cfg: SyncConfig, drift_aware: bool) -> None:
        self.cfg, self.drift_aware = cfg, drift_aware
        self.drift: dict[str, float] = {}
        self.d0 = cfg.d0

    def observe(self, boundary: str, drift: float) -> None:
        """A boundary reported its drift proxy."""
        self.drift[boundary] = drift

    def on_sync(self) -> None:
        """An outer step is starting: calibrate D_0 from the drift seen at the first one."""
        if self.drift_aware and self.d0 is None and self.drift:
            self.d0 = sum(self.drift.values()) / len(self.drift)

    def scheduled(self, boundary: str) -> int:
        """H_b for one boundary."""
        cfg = self.cfg
        if not self.drift_aware or self.d0 is None or boundary not in self.drift:
            return cfg.interval
        z = cfg.kappa * (self.drift[boundary] - self.d0)
        sigmoid = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
        return cfg.h_min + round((cfg.h_max - cfg.h_min) * (1.0 - sigmoid))

    @property
    def interval(self) -> int:
        """H = min_b H_b."""
        if not self.drift:
            return self.scheduled("")
        return min(self.scheduled(b) for b in self.drift)

    @property
    def driver(self) -> str | None:
        """The boundary whose H_b sets the cadence (ties: the larger drift, then the smaller id)."""
        if not self.drift:
            return None
        return min(self.drift, key=lambda b: (self.scheduled(b), -self.drift[b], b))
