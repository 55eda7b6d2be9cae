"""Plans with a layout chosen by hand, for trying the executor on a given structure.

`echelon plan` chooses the layout; tests and benchmarks also need particular ones (a DDP cluster
with uneven shares, an FSDP cluster with checkpointing, a U-shaped three-stage pipeline). Here a
layout is written as clusters of fleet devices and unit cut points, and priced by the same cost
model the planner uses, so its predictions and memory figures are the planner's for that layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from echelon.yellowstone import plan as P
from echelon.yellowstone.cost import (
    CostSettings,
    Layout,
    Network,
    Tables,
    devices_of,
    evaluate,
    make_cluster,
    rates,
)
from echelon.yellowstone.emit import model_info, replica_plan
from echelon.yellowstone.fleet import Fleet
from echelon.yellowstone.model_profile import ModelProfile


@dataclass(frozen=True)
class HandLayout:
    """One replica: clusters as device ids (cluster 0 first), the structure, the unit cuts of each
    cluster ([start, end), the head unit of a U-shaped replica excluded), and optionally the
    parallelism of each cluster (default: what the cost model picks)."""

    clusters: tuple[tuple[str, ...], ...]
    structure: str
    cuts: tuple[tuple[int, int], ...]
    modes: tuple[str, ...] | None = None


def hand_plan(
    fleet: Fleet, profile: ModelProfile, layouts: list[HandLayout], settings: CostSettings | None = None
) -> P.Plan:
    """A plan.json for `layouts` (all in the fleet's first boundary); unused devices are standby."""
    settings = settings or CostSettings()
    boundary = fleet.boundaries[0]
    eta, *measured = rates(fleet, profile)
    tables, net = Tables(profile), Network(fleet)
    devices = {d.id: d for d in devices_of(fleet, boundary.id, settings, eta, *measured)}
    replicas = []
    for r, layout in enumerate(layouts):
        clusters = tuple(
            make_cluster(
                tuple(devices[d] for d in ids), net.link(devices[ids[0]].site, devices[ids[0]].site), profile
            )
            for ids in layout.clusters
        )
        shape = Layout(clusters, layout.structure, layout.cuts)
        cost = evaluate(shape, tables, net, settings, layout.modes)
        if cost is None:
            modes = "" if layout.modes is None else f" in the modes given ({', '.join(layout.modes)})"
            raise ValueError(f"layout {r} does not fit the fleet's memory or links{modes}")
        replicas.append(replica_plan(f"{boundary.id}/r{r}", shape, cost, tables, net, settings))
    used = {d for r in replicas for c in r.clusters for d in c.devices}
    return P.Plan(
        fleet=fleet.name,
        model=model_info(profile, tables),
        settings=P.Settings(
            micro_batches=settings.micro_batches,
            memory_headroom=settings.memory_headroom,
            overhead_bytes=settings.overhead_bytes,
            calibration={k: v for k, v in eta.items() if v != 1.0},
        ),
        boundaries=[
            P.BoundaryPlan(
                id=boundary.id,
                data_tier=boundary.data_tier,
                replicas=replicas,
                standby=[d for d in devices if d not in used],
                backups=[],
                tokens_per_s=sum(r.predicted.tokens_per_s for r in replicas),
            )
        ],
        tokens_per_s=sum(r.predicted.tokens_per_s for r in replicas),
        checks=[],
        explain=["layout written by hand (echelon.yellowstone.execute.handmade)"],
    )
