"""Search spaces: which of a strategy's own knobs the pilots tune, and over which values.

A knob is a dotted run-file field. The default space of a strategy is every knob family below
whose knob the strategy leaves to the run file (it does not fix it), with values derived from the
base run where a knob's scale depends on the model or fleet:

| family           | knob                    | strategies                  | default values                     |
|------------------|-------------------------|-----------------------------|------------------------------------|
| local optimiser  | train.lr                | AdamW inner steps           | base lr x {1/3, 1, 3}              |
| local SGD        | train.lr                | SGD inner steps (SCAFFOLD)  | base lr x {10, 30, 100}            |
| proximal term    | echelon.proximal_mu     | those with a proximal term  | {0, 0.01, 0.1}                     |
| outer optimiser  | echelon.outer.lr        | those that do not average   | {0.5, 0.7, 1.0}                    |
| outer optimiser  | echelon.outer.momentum  | those that do not average   | {0, 0.5, 0.9}                      |
| fixed cadence    | echelon.sync.interval   | fixed-interval, not central | base H x {1/2, 1, 2} (at least 1)  |
| drift cadence    | echelon.sync.kappa      | drift-aware                 | {1.2, 2.4, 4.8}                    |
| boundary buffer  | echelon.buffer_size     | hierarchical                | min_quorum .. smallest boundary    |

Which strategies a family applies to is read from the strategy's fields (`proximal`,
`averaging`, `drift_aware`, `topology`, `local`), never from its name, so newly registered strategies get
a default space too.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from echelon.config import RunConfig
from echelon.strategies import Strategy

Space = dict[str, list[Any]]


@dataclass(frozen=True)
class Knob:
    """One knob family's default: the knob, whom it applies to and its values for a base run."""

    path: str
    family: str
    applies: Callable[[Strategy], bool]
    values: Callable[[RunConfig], list[Any]]


def _scaled(value: float, factors: tuple[float, ...]) -> list[float]:
    """`value` times each factor, to 3 significant digits."""
    return [float(f"{value * f:.3g}") for f in factors]


def _intervals(cfg: RunConfig) -> list[int]:
    h = cfg.echelon.sync.interval
    return sorted({max(1, h // 2), h, 2 * h})


def _buffer_sizes(cfg: RunConfig) -> list[int]:
    smallest = min(len(b.devices) for b in cfg.boundaries)
    return list(range(cfg.echelon.min_quorum, max(cfg.echelon.min_quorum, smallest) + 1))


DEFAULT_KNOBS: tuple[Knob, ...] = (
    Knob(
        "train.lr",
        "local optimiser",
        lambda s: s.local != "scaffold",
        lambda c: _scaled(c.train.lr, (1 / 3, 1, 3)),
    ),
    # SCAFFOLD's inner steps are plain SGD, which needs far larger steps than AdamW on the same model.
    Knob(
        "train.lr", "local SGD", lambda s: s.local == "scaffold", lambda c: _scaled(c.train.lr, (10, 30, 100))
    ),
    Knob(
        "echelon.proximal_mu",
        "proximal term",
        lambda s: s.tunes("echelon.proximal_mu"),
        lambda c: [0.0, 0.01, 0.1],
    ),
    Knob(
        "echelon.outer.lr",
        "outer optimiser",
        lambda s: s.tunes("echelon.outer.lr"),
        lambda c: [0.5, 0.7, 1.0],
    ),
    Knob(
        "echelon.outer.momentum",
        "outer optimiser",
        lambda s: s.tunes("echelon.outer.momentum"),
        lambda c: [0.0, 0.5, 0.9],
    ),
    Knob(
        "echelon.sync.interval",
        "fixed cadence",
        lambda s: s.cadence == "fixed" and s.topology != "centralised",
        _intervals,
    ),
    Knob(
        "echelon.sync.kappa", "drift cadence", lambda s: s.cadence == "drift_aware", lambda c: [1.2, 2.4, 4.8]
    ),
    Knob("echelon.buffer_size", "boundary buffer", lambda s: s.topology == "hierarchical", _buffer_sizes),
)


def default_space(strategy: Strategy, base: RunConfig) -> Space:
    """The documented default search space of `strategy` on `base` (knob -> values); knobs with a
    single value for this base (e.g. buffer_size with two-device boundaries) are left out."""
    space = {k.path: k.values(base) for k in DEFAULT_KNOBS if k.applies(strategy)}
    return {knob: values for knob, values in space.items() if len(values) > 1}


def trial_settings(
    space: Space, search: Literal["grid", "random"], trials: int, seed: int, strategy: str
) -> list[dict[str, Any]]:
    """The settings (knob -> value) the pilots try, in trial order.

    grid: every point of the product, in order; ValueError when it has more than `trials` points.
    random: `trials` distinct points drawn without replacement (all of them when the product is
    smaller), from a generator seeded by `seed` and the strategy's name: same file, same draws.
    """
    points = [dict(zip(space, combo, strict=True)) for combo in itertools.product(*space.values())]
    if search == "grid":
        if len(points) > trials:
            raise ValueError(
                f"the grid has {len(points)} settings but pilot.trials is {trials}: shrink the space, "
                "raise pilot.trials, or use search: random"
            )
        return points
    rng = random.Random(f"{seed}/{strategy}")
    return [points[i] for i in rng.sample(range(len(points)), min(trials, len(points)))]


def describe(settings: dict[str, Any]) -> str:
    """`knob=value, ...` for tables and messages (`base settings` when empty)."""
    if not settings:
        return "base settings"
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
