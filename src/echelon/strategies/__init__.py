"""Training strategies: named, validated combinations of the planes' mechanisms.

A run file picks one with `strategy:`. Each is marked admissible or not under the information-flow
contract (only boundary aggregates over a quorum and metadata cross) and resolves the run file
into the configuration the planes actually run (`effective_config`):

- hierarchical (Echelon): devices aggregate inside their boundary; boundaries meet at the global plane.
- flat (FedAvg, FedProx, SCAFFOLD, DiLoCo, Drift DiLoCo): every device is its own aggregation point
  and its update crosses its boundary alone, a per-device update: not admissible, simulation only.
- centralised: one worker with all the data and all the compute: not admissible.

Synchronous strategies hold every device after its local round(s) until the outer step (lockstep)
and the global plane waits for all (barrier). Knobs the strategy does not fix stay the run file's,
so every method is tuned over its own knobs with the same budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # echelon.config validates strategy names against this module: no import back
    from echelon.config import RunConfig


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    admissible: bool
    topology: Literal["hierarchical", "flat", "centralised"] = "hierarchical"
    drift_aware: bool = False
    synchronous: bool = False
    local: Literal["proximal", "scaffold"] = "proximal"
    proximal: bool = True  # False: mu = 0 whatever the run file says
    averaging: bool = False  # True: outer lr 1, momentum 0 (the server averages)
    secure_outer: bool = False  # +SA: the outer step sees only a SecAgg+ sum over boundaries
    barrier: bool = False  # the outer step waits for every boundary (implied by synchronous)
    streaming: bool = False  # Streaming DiLoCo: fragments, overlap tau, mixing alpha, low-bit

    @property
    def label(self) -> str:
        """How runs of this strategy are labelled in progress bars, summaries and tables."""
        return self.name if self.admissible else f"{self.name} [not admissible: simulation only]"


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("echelon", "boundary aggregates, fixed outer interval H", admissible=True),
        Strategy(
            "echelon-da",
            "Echelon with the drift-aware cadence H = min_b H_b",
            admissible=True,
            drift_aware=True,
        ),
        Strategy(
            "echelon+sa",
            "Echelon with the boundaries' Delta_b securely aggregated at the global plane",
            admissible=True,
            secure_outer=True,
        ),
        Strategy(
            "echelon-da+sa",
            "Echelon-DA with the boundaries' Delta_b securely aggregated at the global plane",
            admissible=True,
            drift_aware=True,
            secure_outer=True,
        ),
        Strategy(
            "diloco+sa",
            "DiLoCo with every device's update securely aggregated across boundaries (privacy parity)",
            admissible=False,
            topology="flat",
            synchronous=True,
            proximal=False,
            secure_outer=True,
        ),
        Strategy(
            "echelon-sync",
            "Echelon in lockstep: every boundary does H middle steps, then the outer step (reproducible)",
            admissible=True,
            synchronous=True,
        ),
        Strategy(
            "centralised",
            "one worker, all the data and compute (upper reference)",
            admissible=False,
            topology="centralised",
            proximal=False,
            averaging=True,
            synchronous=True,
        ),
        Strategy(
            "fedavg",
            "every device's model averaged each round",
            admissible=False,
            topology="flat",
            synchronous=True,
            proximal=False,
            averaging=True,
        ),
        Strategy(
            "fedprox",
            "FedAvg with the proximal term towards the round's reference",
            admissible=False,
            topology="flat",
            synchronous=True,
            averaging=True,
        ),
        Strategy(
            "scaffold",
            "FedAvg with SCAFFOLD control variates (option II)",
            admissible=False,
            topology="flat",
            synchronous=True,
            local="scaffold",
            proximal=False,
            averaging=True,
        ),
        Strategy(
            "diloco",
            "per-device inner steps, outer Nesterov on the devices' pseudo-gradients",
            admissible=False,
            topology="flat",
            synchronous=True,
            proximal=False,
        ),
        Strategy(
            "streaming-diloco",
            "DiLoCo syncing one parameter fragment per outer step, overlapped, merged, in bfloat16",
            admissible=False,
            topology="flat",
            barrier=True,
            proximal=False,
            streaming=True,
        ),
        Strategy(
            "drift-diloco",
            "DiLoCo with the drift-aware cadence over devices",
            admissible=False,
            topology="flat",
            synchronous=True,
            proximal=False,
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


def effective_config(cfg: RunConfig) -> RunConfig:
    """The configuration the planes run for `cfg`'s strategy (the run file itself for Echelon)."""
    s = get_strategy(cfg.strategy)
    echelon = cfg.echelon
    if not s.proximal:
        echelon = echelon.model_copy(update={"proximal_mu": 0.0})
    if s.averaging:
        echelon = echelon.model_copy(
            update={"outer": echelon.outer.model_copy(update={"lr": 1.0, "momentum": 0.0})}
        )
    if s.synchronous:
        # Everyone waits for the outer step: nothing overlaps it.
        echelon = echelon.model_copy(update={"sync": echelon.sync.model_copy(update={"overlap": False})})
    if s.streaming:
        # Fields the run file left at their plain defaults take the settings of Douillard et al. (2025).
        paper = {"fragments": 4, "overlap_steps": 1, "mixing": 0.5, "pseudo_gradient_dtype": "bfloat16"}
        plain = type(echelon.streaming)()
        left = {k: v for k, v in paper.items() if getattr(echelon.streaming, k) == getattr(plain, k)}
        echelon = echelon.model_copy(update={"streaming": echelon.streaming.model_copy(update=left)})
    if s.local == "scaffold":
        # Control variates have no declared range for fixed-point encoding: the plain sum.
        echelon = echelon.model_copy(update={"aggregation": "plain"})
    if s.topology != "hierarchical":
        # The baselines anchor the proximal term at the round's starting model, not an EMA.
        echelon = echelon.model_copy(update={"reference_ema": None})
    update: dict = {"echelon": echelon}
    if s.topology == "flat":
        # Each device aggregates alone, on its own machine: no intra-boundary link, quorum of one.
        update["boundaries"] = tuple(
            type(b)(id=d.id, devices=(d,), wan=b.wan or cfg.network.wan)
            for b in cfg.boundaries
            for d in b.devices
        )
        update["echelon"] = echelon.model_copy(update={"buffer_size": 1, "min_quorum": 1})
        update["network"] = cfg.network.model_copy(update={"lan": type(cfg.network.lan)()})
    elif s.topology == "centralised":
        # The config classes are reached through the run's own objects (see the import above).
        first = cfg.boundaries[0]
        speed = sum(d.tokens_per_s for _, d in cfg.devices)
        pooled = type(first.devices[0])(id="central", tokens_per_s=speed)
        update["boundaries"] = (type(first)(id="central", devices=(pooled,), wan=type(cfg.network.lan)()),)
        update["echelon"] = echelon.model_copy(update={"buffer_size": 1, "min_quorum": 1})
        update["network"] = cfg.network.model_copy(update={"lan": type(cfg.network.lan)()})
        update["churn"] = cfg.churn.model_copy(update={"mean_uptime_s": None})
    return cfg.model_copy(update=update)
