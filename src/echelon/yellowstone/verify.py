"""Constraint checks re-derived from a plan as written, the fleet file and the model profile alone.

Nothing here trusts the planner's own figures or reorders what the plan says: stages are checked
in the order written (indices, contiguous units from the embedding to the head, edges between
consecutive stages, 1F1B micro-batches in flight); memory is recomputed from the stages, shares
and parallelism written in the plan against each device's memory in the fleet file; tiers and
boundaries come from the fleet file. Standby entries and every backup's replacement (and its
fallback and second-failure entries) are checked as the primary replicas are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from echelon.yellowstone.cost import (
    MODES,
    Cluster,
    CostSettings,
    Device,
    Link,
    Tables,
    device_memory,
    in_flight,
)
from echelon.yellowstone.fleet import GIB, DeviceEntry, Fleet
from echelon.yellowstone.model_profile import ModelProfile
from echelon.yellowstone.plan import Backup, BoundaryPlan, Check, Plan, ReplicaPlan

CHECKS = {
    "memory": "every device within its usable memory",
    "access tier": "raw-data stages run only on devices cleared for their boundary's data tier",
    "boundary": "every pipeline stays inside one boundary, each cluster inside one site",
    "coverage": "every replica runs every unit exactly once, its stages in order",
    "single use": "no device is in two places",
    "standby": "standby devices belong to their boundary and are in no replica",
    "backups": "every device in a replica has a backup; each replacement avoids the failed devices and "
    "uses only its replica's devices and free standbys",
}


@dataclass
class _Checker:
    plan: Plan
    fleet: Fleet
    tables: Tables
    settings: CostSettings
    devices: dict[str, DeviceEntry]
    problems: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in CHECKS})
    worst: tuple[float, str] = (0.0, "")
    _memory: dict[tuple, list[float]] = field(default_factory=dict)

    def replica(self, r: ReplicaPlan, b: str, tier: int, where: str) -> None:
        """Every check of one replica as written; `where` names it in messages."""
        p = self.problems
        n_units, m = self.tables.n_units, self.settings.micro_batches
        clusters = {c.id: c for c in r.clusters}
        if len(clusters) != len(r.clusters):
            p["coverage"].append(f"{where}: a cluster id is used twice")
        if r.micro_batch != self.plan.model.micro_batch or r.micro_batches != m:
            p["coverage"].append(
                f"{where}: micro-batch {r.micro_batch} x {r.micro_batches} differs from the model's"
            )
        seen: set[str] = set()
        for c in r.clusters:
            for name in c.devices:
                if name in seen:
                    p["single use"].append(f"{where}: {name} is in two clusters")
                seen.add(name)
                dev = self.devices.get(name)
                if dev is None or dev.boundary != b:
                    p["boundary"].append(f"{where}: {name} is not a device of boundary {b}")
                elif dev.site != c.site:
                    p["boundary"].append(f"{c.id}: {name} is not at site {c.site}")
            if (
                not c.devices
                or len(c.shares) != len(c.devices)
                or min(c.shares, default=0) < 1
                or sum(c.shares) != r.micro_batch
            ):
                p["coverage"].append(
                    f"{c.id}: shares {c.shares} do not split a micro-batch of {r.micro_batch}"
                )
            if c.head not in c.devices:
                p["coverage"].append(f"{c.id}: head {c.head} is not one of its devices")
            if c.parallelism.startswith("FSDP") and len(c.devices) < 2:
                p["coverage"].append(f"{c.id}: {c.parallelism} on one device")
        self._stages(r, clusters, where, n_units, m)
        for s in r.stages:
            c = clusters.get(s.cluster)
            if c is None or not any(u.raw_data for u in self.tables.units[s.units[0] : s.units[1]]):
                continue
            for name in c.devices:
                dev = self.devices.get(name)
                if dev is not None and self.fleet.tier_rank(dev.access_tier) < tier:
                    p["access tier"].append(f"{where} stage {s.index} ({s.label}) runs on {name}")
        self._memory_of(r, clusters)

    def _stages(self, r: ReplicaPlan, clusters: dict, where: str, n_units: int, m: int) -> None:
        p = self.problems["coverage"]
        stages = r.stages
        if not stages or stages[0].units[0] != 0 or stages[-1].units[1] != n_units:
            p.append(f"{where}: stages do not run from unit 0 to unit {n_units}")
        expect = in_flight(r.structure, len(r.clusters), m)
        if len(expect) != len(stages):
            p.append(
                f"{where}: {len(stages)} stages for a {r.structure} pipeline of {len(r.clusters)} clusters"
            )
        for k, s in enumerate(stages):
            if s.index != k:
                p.append(f"{where}: stage {s.index} is written at position {k}")
            if s.units[1] <= s.units[0] or (k and s.units[0] != stages[k - 1].units[1]):
                p.append(
                    f"{where}: stage {s.index} runs units {list(s.units)} after {list(stages[k - 1].units) if k else []}"
                )
            if s.cluster not in clusters:
                p.append(f"{where}: stage {s.index} names unknown cluster {s.cluster}")
            if k < len(expect) and s.in_flight < expect[k]:
                p.append(
                    f"{where}: stage {s.index} holds {s.in_flight} micro-batches, 1F1B keeps {expect[k]}"
                )
        order = [c.id for c in r.clusters] + ([r.clusters[0].id] if r.structure == "U" and r.clusters else [])
        if [s.cluster for s in stages] != order:
            p.append(
                f"{where}: stages run on {[s.cluster for s in stages]}, the {r.structure} order is {order}"
            )
        if len(r.edges) != max(len(stages) - 1, 0):
            p.append(f"{where}: {len(r.edges)} edges between {len(stages)} stages")
        for k, e in enumerate(r.edges):
            a = clusters.get(stages[k].cluster) if k < len(stages) else None
            z = clusters.get(stages[k + 1].cluster) if k + 1 < len(stages) else None
            if (
                (e.src_stage, e.dst_stage) != (k, k + 1)
                or a is None
                or z is None
                or (e.src_site, e.dst_site) != (a.site, z.site)
            ):
                p.append(f"{where}: edge {k} does not join stage {k} to stage {k + 1}")

    def _memory_of(self, r: ReplicaPlan, clusters: dict) -> None:
        lan = Link(0.0, 1.0)
        for c in r.clusters:
            if any(name not in self.devices for name in c.devices) or len(c.shares) != len(c.devices):
                continue
            ranges = tuple((s.units[0], s.units[1], s.in_flight) for s in r.stages if s.cluster == c.id)
            memory = tuple(self.devices[n].memory * self.settings.memory_headroom for n in c.devices)
            key = (memory, tuple(c.shares), c.parallelism, ranges)
            if key not in self._memory:
                devs = tuple(
                    Device(n, c.site, 1.0, cap, cap, True, 1.0)
                    for n, cap in zip(c.devices, memory, strict=True)
                )
                cl = Cluster(devs, tuple(c.shares), lan, 0.0)
                seg = self.tables.segment(list(ranges))
                mode = MODES.index(c.parallelism)
                self._memory[key] = device_memory(cl, seg, mode, self.settings, self.tables.profile.seq_len)
            for name, cap, used in zip(c.devices, memory, self._memory[key], strict=True):
                if used > cap * (1 + 1e-9):
                    self.problems["memory"].append(
                        f"{name} in {c.id} needs {used / GIB:.1f} GiB of {cap / GIB:.1f} GiB usable"
                    )
                self.worst = max(self.worst, (used / cap, name))

    def boundary(self, b: BoundaryPlan) -> None:
        p = self.problems
        entry = next((x for x in self.fleet.boundaries if x.id == b.id), None)
        if entry is None:
            p["boundary"].append(f"boundary {b.id} is not in the fleet file")
            return
        tier = self.fleet.tier_rank(entry.data_tier)
        for r in b.replicas:
            self.replica(r, b.id, tier, r.id)
        used = {d for r in b.replicas for c in r.clusters for d in c.devices}
        for name in b.standby:
            dev = self.devices.get(name)
            if dev is None or dev.boundary != b.id:
                p["standby"].append(f"standby {name} is not a device of boundary {b.id}")
            if name in used:
                p["standby"].append(f"standby {name} is also in a replica")
        if len(set(b.standby)) != len(b.standby):
            p["standby"].append(f"boundary {b.id}: a standby device is listed twice")
        replicas = {r.id: r for r in b.replicas}
        firsts = [x.device for x in b.backups]
        missing = sorted(used - set(firsts))
        if missing:
            p["backups"].append(f"boundary {b.id}: no backup for {', '.join(missing[:5])}")
        if len(set(firsts)) != len(firsts):
            p["backups"].append(f"boundary {b.id}: a device has two backups")
        for x in b.backups:
            r = replicas.get(x.replica)
            if r is None:
                p["backups"].append(f"backup for {x.device}: unknown replica {x.replica}")
                continue
            devices = {d for c in r.clusters for d in c.devices}
            if x.device not in devices:
                p["backups"].append(f"backup for {x.device}: it is not in {x.replica}")
            self.backup(x, b, tier, devices, set(b.standby), set(), where=f"backup for {x.device}")

    def backup(
        self,
        x: Backup,
        b: BoundaryPlan,
        tier: int,
        members: set[str],
        spares: set[str],
        lost: set[str],
        where: str,
    ) -> None:
        """One entry: its replacement as a replica, built only from `members` and free `spares`."""
        p = self.problems["backups"]
        lost = lost | {x.device}
        if x.kind == "drop_replica":
            if x.replacement is not None:
                p.append(f"{where}: drop_replica carries a replacement")
            return
        if x.replacement is None:
            p.append(f"{where}: {x.kind} without its replacement replica")
            return
        rep = x.replacement
        self.replica(rep, b.id, tier, f"{where} ({x.kind})")
        devices = {d for c in rep.clusters for d in c.devices}
        if rep.id != x.replica:
            p.append(f"{where}: replacement {rep.id} for replica {x.replica}")
        if devices & lost:
            p.append(f"{where}: the replacement still uses failed {', '.join(sorted(devices & lost))}")
        outside = devices - members - spares
        if outside:
            p.append(
                f"{where}: the replacement uses {', '.join(sorted(outside))}, neither its replica's nor a standby"
            )
        taken = devices & spares - members
        if x.kind == "standby":
            if x.standby is None or x.standby not in spares or x.standby not in devices:
                p.append(f"{where}: standby {x.standby} is not a free standby in the replacement")
        elif taken:
            p.append(f"{where}: {x.kind} takes standby {', '.join(sorted(taken))}")
        if x.fallback is not None:
            if x.fallback.kind == "standby" or x.fallback.device != x.device:
                p.append(f"{where}: its fallback must do without a standby, for the same device")
            self.backup(
                x.fallback,
                b,
                tier,
                members,
                spares - {x.standby or ""},
                lost - {x.device},
                f"{where}, fallback",
            )
        for y in x.then:
            if y.device not in devices:
                p.append(f"{where}, then {y.device}: not in the replacement")
            self.backup(y, b, tier, devices, spares - devices, lost, f"{where}, then {y.device}")


def check_plan(plan: Plan, fleet: Fleet, profile: ModelProfile) -> list[Check]:
    """Every check of the module docstring; each failing one names its first five cases."""
    s = plan.settings
    checker = _Checker(plan, fleet, Tables(profile), CostSettings(s.micro_batches, s.memory_headroom, s.overhead_bytes),
                       {d.id: d for d in fleet.devices})  # fmt: skip
    seen: set[str] = set()
    for b in plan.boundaries:
        for name in [d for r in b.replicas for c in r.clusters for d in c.devices] + b.standby:
            if name in seen:
                checker.problems["single use"].append(f"{name} appears twice")
            seen.add(name)
        checker.boundary(b)
    worst = checker.worst
    ok = dict(CHECKS)
    ok["memory"] += f" (highest use {worst[0]:.0%}, {worst[1] or 'no device'})"
    return [
        Check(
            name=k,
            ok=not v,
            detail=ok[k] if not v else "; ".join(v[:5]) + (f" ... ({len(v)} in all)" if len(v) > 5 else ""),
        )
        for k, v in checker.problems.items()
    ]
