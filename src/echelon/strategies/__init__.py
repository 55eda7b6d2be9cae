"""Training strategies: named, validated combinations of the planes' mechanisms.

A run file picks one with `strategy:`. Each is marked admissible or not under the information-flow
contract (only boundary aggregates over a quorum and metadata cross) and resolves the run file
into the configuration the planes actually run (`effective_config`):

- hierarchical (Echelon): devices aggregate inside their boundary; boundaries meet at the global plane.
- flat (FedAvg, FedProx, SCAFFOLD, DiLoCo, Drift DiLoCo, the flat DiLoCo+SA): every device is its
  own aggregation point and its update crosses its boundary alone, a per-device update: not
  admissible, simulation only.
- centralised: one worker with all the data and all the compute: not admissible.

Lockstep strategies hold every device after its local round(s) until the outer step and the
global plane waits for all (barrier). Knobs the strategy does not fix stay the run file's, so
every method is tuned over its own knobs with the same budgets. The strategies themselves are
listed in `echelon.strategies.catalog`; `echelon.strategies.base` says what a strategy is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from echelon.strategies.base import Strategy, resolve
from echelon.strategies.catalog import CATALOG

if TYPE_CHECKING:
    from echelon.config import RunConfig

STRATEGIES: dict[str, Strategy] = {s.name: s for s in CATALOG}

__all__ = ["STRATEGIES", "Strategy", "effective_config", "get_strategy"]


def get_strategy(name: str) -> Strategy:
    """The registered strategy `name`; KeyError lists the known ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None


def effective_config(cfg: RunConfig) -> RunConfig:
    """The configuration the planes run for `cfg`'s strategy (the run file itself for Echelon)."""
    return resolve(get_strategy(cfg.strategy), cfg)
