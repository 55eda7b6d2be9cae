"""Training strategies: named, validated combinations of the planes' mechanisms.

A run file picks one with `strategy:`. Each strategy says whether it is admissible under the
information-flow contract (only boundary aggregates and metadata cross) and how the planes are
configured to run it. The knobs themselves (K, H, mu, outer optimizer, ...) stay in the run file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    admissible: bool
    drift_aware: bool


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy(
            "echelon", "boundary aggregates, fixed outer interval H", admissible=True, drift_aware=False
        ),
        Strategy(
            "echelon-da",
            "Echelon with the drift-aware cadence H = min_b H_b",
            admissible=True,
            drift_aware=True,
        ),
    ]
}


def get_strategy(name: str) -> Strategy:
    """The registered strategy `name`; KeyError lists the known ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
