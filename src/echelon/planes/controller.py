"""Outer synchronisation cadence: a fixed interval (Echelon) or drift-aware (Echelon-DA).

Drift-aware: each boundary's drift proxy D_b maps to its own scheduled interval

    H_b = H_min + round((H_max - H_min) * (1 - sigmoid(kappa * (D_b - D_0,b))))

and the global cadence is H = min_b H_b: the most-drifting boundary (the driver) sets it.
D_b is scale-free: the boundary's distance from the global reference in units of its own recent
middle-step update norm (see echelon.planes.boundary), so it does not depend on the model's size.
Each boundary has its own midpoint D_0,b: the configured `d0`, or the mean of the D_b it reported
over its own first window (its first `interval` middle steps); until then H_b is `interval`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from echelon.config import SyncConfig


@dataclass
class _Calibration:
    """A boundary's drift reports during its first window, then its midpoint D_0,b."""

    seen: list[float] = field(default_factory=list)
    d0: float | None = None


class Cadence:
    """Decides how many middle steps separate outer steps."""

    def __init__(self, cfg: SyncConfig, drift_aware: bool) -> None:
        self.cfg, self.drift_aware = cfg, drift_aware
        self.drift: dict[str, float] = {}
        self._calibration: dict[str, _Calibration] = {}

    def observe(self, boundary: str, drift: float, middle_step: int) -> None:
        """Boundary `boundary` reported drift D_b after its middle step `middle_step`."""
        self.drift[boundary] = drift
        cal = self._calibration.setdefault(boundary, _Calibration(d0=self.cfg.d0))
        if cal.d0 is None:
            cal.seen.append(drift)
            if middle_step >= self.cfg.interval:
                cal.d0 = sum(cal.seen) / len(cal.seen)

    def forget(self, boundary: str) -> None:
        """`boundary` restarted: it calibrates again from its new first window."""
        self.drift.pop(boundary, None)
        self._calibration.pop(boundary, None)

    def state_dict(self) -> dict:
        """The drift reports and each boundary's calibration, as plain values."""
        calibration = {b: {"seen": list(c.seen), "d0": c.d0} for b, c in self._calibration.items()}
        return {"drift": dict(self.drift), "calibration": calibration}

    def load_state_dict(self, state: dict) -> None:
        self.drift = dict(state["drift"])
        self._calibration = {
            b: _Calibration(list(c["seen"]), c["d0"]) for b, c in state["calibration"].items()
        }

    def d0(self, boundary: str) -> float | None:
        """D_0,b, or None while the boundary is still in its first window."""
        cal = self._calibration.get(boundary)
        return None if cal is None else cal.d0

    def scheduled(self, boundary: str) -> int:
        """H_b for one boundary."""
        cfg = self.cfg
        d0 = self.d0(boundary)
        if not self.drift_aware or d0 is None or boundary not in self.drift:
            return cfg.interval
        z = cfg.kappa * (self.drift[boundary] - d0)
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
