"""Echelon: boundary-first, auditable training across administrative boundaries.

The public API is `echelon.__all__` (documented in `echelon.api`); every other module is internal
and may change. Names load on first use, so `import echelon.planes` stays light. (The simulating
function is `simulate`: `echelon.train` is the trainer's package.)
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # type checkers read the block below; `typing` itself costs an import here

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    "RunConfig": "echelon.config",
    "load_config": "echelon.api",
    "simulate": "echelon.api",
    "launch": "echelon.api",
    "RunSummary": "echelon.record",
    "read_summary": "echelon.api",
    "read_metrics": "echelon.record",
    "plan": "echelon.api",
    "TaskLoss": "echelon.train.model",
    "InnerOptimizer": "echelon.train.model",
    "UserError": "echelon.errors",
    "ConfigError": "echelon.errors",
}
__all__ = [
    "ConfigError",
    "InnerOptimizer",
    "RunConfig",
    "RunSummary",
    "TaskLoss",
    "UserError",
    "__version__",
    "launch",
    "load_config",
    "plan",
    "read_metrics",
    "read_summary",
    "simulate",
]

if TYPE_CHECKING:
    from echelon.api import launch, load_config, plan, read_summary, simulate
    from echelon.config import RunConfig
    from echelon.errors import ConfigError, UserError
    from echelon.record import RunSummary, read_metrics
    from echelon.train.model import InnerOptimizer, TaskLoss


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'echelon' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
