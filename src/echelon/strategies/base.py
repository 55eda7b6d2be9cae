"""What a strategy is, and how it resolves a run file into the configuration the planes run.

A `Strategy` is data: its name, whether the information-flow contract admits it, its topology
(how devices map onto aggregation points), the mechanisms the planes switch on for it (cadence,
schedule, secure outer aggregation, local algorithm) and the run-file fields it fixes or
defaults. `effective_config` applies any strategy the same way, with no per-strategy branch:
rewrite the topology, then set the fixed fields, then the defaults the run file left unset.
So adding a strategy is one entry in `echelon.strategies.catalog`.

This module never imports `echelon.config` at run time (config validates strategy names against
the catalog); it reads and rebuilds a run configuration through pydantic's own methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from echelon.config import RunConfig

Topology = Literal["hierarchical", "flat", "centralised"]
Cadence = Literal["fixed", "drift_aware"]
Schedule = Literal["asynchronous", "barrier", "lockstep"]
LocalAlgorithm = Literal["adamw", "scaffold"]


@dataclass(frozen=True)
class Strategy:
    """One named strategy.

    topology: hierarchical (devices aggregate inside their boundary), flat (every device is its
        own aggregation point: its update crosses alone) or centralised (one pooled worker).
    cadence: fixed outer interval H, or drift-aware H = min_b H_b (Echelon-DA).
    schedule: asynchronous (the leading boundary triggers the outer step), barrier (the outer step
        waits for every boundary) or lockstep (barrier, and devices wait for the outer step).
    secure_outer: +SA, the global plane learns only a SecAgg+ sum of the boundaries' Delta_b.
    local: the device's inner optimiser: AdamW on the proximal objective, or SCAFFOLD's SGD.
    fixes: dotted run-file fields the strategy sets whatever the run file says.
    defaults: dotted run-file fields it sets only where the run file left them unset.
    """

    name: str
    description: str
    admissible: bool
    topology: Topology = "hierarchical"
    cadence: Cadence = "fixed"
    schedule: Schedule = "asynchronous"
    secure_outer: bool = False
    local: LocalAlgorithm = "adamw"
    fixes: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How runs of this strategy are labelled in progress bars, summaries and tables."""
        return self.name if self.admissible else f"{self.name} [not admissible: simulation only]"

    @property
    def lockstep(self) -> bool:
        return self.schedule == "lockstep"

    @property
    def barrier(self) -> bool:
        return self.schedule != "asynchronous"

    def tunes(self, knob: str) -> bool:
        """Whether the run file's `knob` (a dotted field) reaches the planes under this strategy."""
        return knob not in self.fixes


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data[key]
    data[leaf] = value


def _is_set(model: BaseModel, dotted: str) -> bool:
    """Whether the run file (or whoever built `model`) set the dotted field explicitly."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        if key not in model.model_fields_set:
            return False
        model = getattr(model, key)
    return leaf in model.model_fields_set


def _flat(data: dict) -> None:
    """Each device aggregates alone, on its own machine: no intra-boundary link, quorum of one."""
    wan = data["network"]["wan"]
    members = {b["id"]: [d["id"] for d in b["devices"]] for b in data["boundaries"]}
    data["boundaries"] = [
        {"id": d["id"], "devices": [d], "wan": b["wan"] or wan}
        for b in data["boundaries"]
        for d in b["devices"]
    ]
    data["echelon"] |= {"buffer_size": 1, "min_quorum": 1, "reference_ema": None}
    data["network"]["lan"] = {}
    # Churn in device terms: a joining device brings its own boundary; a boundary's outage takes
    # each of its devices' one-device boundaries offline.
    churn = data["churn"]
    churn["joins"] = [j | {"boundary": j["device"]["id"]} for j in churn["joins"]]
    churn["outages"] = [o | {"boundary": d} for o in churn["outages"] for d in members[o["boundary"]]]


def _centralised(data: dict) -> None:
    """One worker with all the data and all the compute, on one machine, never churning."""
    speed = sum(d["tokens_per_s"] for b in data["boundaries"] for d in b["devices"])
    data["boundaries"] = [{"id": "central", "devices": [{"id": "central", "tokens_per_s": speed}], "wan": {}}]
    data["echelon"] |= {"buffer_size": 1, "min_quorum": 1, "reference_ema": None}
    data["network"]["lan"] = {}
    data["churn"] = {}


TOPOLOGIES: dict[Topology, Callable[[dict], None]] = {
    "hierarchical": lambda data: None,
    "flat": _flat,
    "centralised": _centralised,
}


def resolve(strategy: Strategy, cfg: RunConfig) -> RunConfig:
    """`cfg` as the planes run it under `strategy`: topology, then fixed fields, then defaults."""
    data = cfg.model_dump(mode="python")
    TOPOLOGIES[strategy.topology](data)
    for dotted, value in strategy.fixes.items():
        _set(data, dotted, value)
    for dotted, value in strategy.defaults.items():
        if not _is_set(cfg, dotted):
            _set(data, dotted, value)
    return type(cfg).model_validate(data)
