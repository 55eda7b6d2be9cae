"""What each device of a plan runs: the plan as written, checked for execution, with backups applied.

Pure (no torch.distributed): `check_executable` refuses a plan.json that cannot run, naming the file
and the field; `topology` turns the plan and the devices that have failed so far into replicas of
clusters and stages; `plan_devices` fixes the rank order of a local execution.

Backups are applied in the order the devices failed. An entry's replacement replica (standby
swapped in, shrunken cluster, re-planned split) is used when none of its devices has failed and
each is free (in that replica, or idle); a standby entry whose standby an earlier failure took
uses its `fallback`. After an entry is carried out, its `then` entries (planned for a second
failure of the head or raw-data devices that took over) come first for that replica. When no
planned entry applies, the failed device leaves its cluster and its share goes to the cluster's
other devices (largest shares first), or, if it was alone, the replica is dropped.
`Topology.applied` says what was done for each failure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from echelon.errors import UserError
from echelon.yellowstone.plan import Backup, Plan, ReplicaPlan

PARALLELISMS = ("DDP", "DDP+ckpt", "FSDP", "FSDP+ckpt")


@dataclass(frozen=True)
class ClusterSpec:
    id: str
    devices: tuple[str, ...]
    shares: tuple[int, ...]
    head: str
    parallelism: str

    @property
    def checkpointing(self) -> bool:
        return self.parallelism.endswith("+ckpt")


@dataclass(frozen=True)
class StageSpec:
    index: int
    cluster: int  # index into the replica's clusters
    units: tuple[int, int]


@dataclass(frozen=True)
class ReplicaSpec:
    """One pipeline replica: clusters in pipeline order and stages in order."""

    id: str
    boundary: str
    structure: str
    micro_batch: int
    micro_batches: int
    clusters: tuple[ClusterSpec, ...]
    stages: tuple[StageSpec, ...]
    predicted_step_s: float
    predicted_tokens_per_s: float

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for c in self.clusters for d in c.devices)

    @property
    def leader(self) -> str:
        """The head of cluster 0: it feeds the raw tokens and reports the replica's loss."""
        return self.clusters[0].head

    @property
    def loss_cluster(self) -> int:
        return self.stages[-1].cluster

    def stages_of(self, cluster: int) -> list[StageSpec]:
        return [s for s in self.stages if s.cluster == cluster]


@dataclass(frozen=True)
class Topology:
    replicas: tuple[ReplicaSpec, ...]
    idle: tuple[str, ...]  # standby devices and failed ones
    applied: tuple[str, ...]  # one line per failure: which backup was carried out

    def replica_of(self, device: str) -> ReplicaSpec | None:
        return next((r for r in self.replicas if device in r.devices), None)


def plan_devices(plan: Plan) -> list[str]:
    """Every device of the plan in rank order: replicas' devices, then standby, boundary by boundary."""
    out: list[str] = []
    for b in plan.boundaries:
        out += [d for r in b.replicas for c in r.clusters for d in c.devices]
        out += b.standby
    return out


def plan_digest(plan: Plan) -> str:
    """A short hash of the plan: a checkpoint records it, so one plan never resumes another's."""
    return hashlib.sha256(plan.model_dump_json().encode()).hexdigest()[:16]


def _replica_spec(boundary: str, r: ReplicaPlan) -> ReplicaSpec:
    index = {c.id: i for i, c in enumerate(r.clusters)}
    return ReplicaSpec(
        id=r.id,
        boundary=boundary,
        structure=r.structure,
        micro_batch=r.micro_batch,
        micro_batches=r.micro_batches,
        clusters=tuple(
            ClusterSpec(c.id, tuple(c.devices), tuple(c.shares), c.head, c.parallelism) for c in r.clusters
        ),
        stages=tuple(StageSpec(s.index, index[s.cluster], tuple(s.units)) for s in r.stages),
        predicted_step_s=r.predicted.step_s,
        predicted_tokens_per_s=r.predicted.tokens_per_s,
    )


def check_executable(plan: Plan, path: Path | str) -> None:
    """Refuse a plan that cannot run, naming the file, the field and the problem."""
    n_units = len(plan.model.units)
    if n_units != plan.model.layers + 2:
        raise UserError(
            f"{path}: model.units: {n_units} units for {plan.model.layers} layers (expected embed, "
            f"{plan.model.layers} layers, head); re-run `echelon plan`"
        )
    seen: dict[str, str] = {}
    for bi, b in enumerate(plan.boundaries):
        where_b = f"boundaries[{bi}]"
        for name in b.standby:
            if name in seen:
                raise UserError(f"{path}: {where_b}.standby: device {name!r} is also in {seen[name]}")
            seen[name] = f"{where_b}.standby"
        for ri, r in enumerate(b.replicas):
            where = f"{where_b}.replicas[{ri}]"
            _check_replica(r, where, path, n_units, seen)
        for ki, k in enumerate(b.backups):
            if k.replacement is not None:
                _check_replica(k.replacement, f"{where_b}.backups[{ki}].replacement", path, n_units, None)


def _check_replica(r: ReplicaPlan, where: str, path, n_units: int, seen: dict[str, str] | None) -> None:
    def fail(field: str, problem: str) -> UserError:
        return UserError(f"{path}: {where}.{field}: {problem}; re-run `echelon plan` or correct the file")

    if not r.clusters or not r.stages:
        raise fail("stages", "a replica needs at least one cluster and one stage")
    if r.micro_batch < 1 or r.micro_batches < 1:
        raise fail(
            "micro_batch", f"micro_batch {r.micro_batch} x micro_batches {r.micro_batches} trains nothing"
        )
    ids = [c.id for c in r.clusters]
    for ci, c in enumerate(r.clusters):
        cw = f"clusters[{ci}]"
        if not c.devices:
            raise fail(f"{cw}.devices", "a cluster needs at least one device")
        if len(c.shares) != len(c.devices):
            raise fail(f"{cw}.shares", f"{len(c.shares)} shares for {len(c.devices)} devices")
        if any(s < 1 for s in c.shares) or sum(c.shares) != r.micro_batch:
            raise fail(
                f"{cw}.shares",
                f"{list(c.shares)} must be whole sequences, at least 1 each, summing to micro_batch {r.micro_batch}",
            )
        if c.head not in c.devices:
            raise fail(f"{cw}.head", f"{c.head!r} is not one of the cluster's devices {c.devices}")
        if len(set(c.devices)) != len(c.devices):
            raise fail(f"{cw}.devices", "a device is listed twice")
        if c.parallelism not in PARALLELISMS:
            raise fail(f"{cw}.parallelism", f"{c.parallelism!r} is not one of {', '.join(PARALLELISMS)}")
        if seen is not None:
            for name in c.devices:
                if name in seen:
                    raise fail(f"{cw}.devices", f"device {name!r} is also in {seen[name]}")
                seen[name] = f"{where}.{cw}"
    if len(set(ids)) != len(ids):
        raise fail("clusters", "two clusters share an id")
    position = 0
    for si, s in enumerate(r.stages):
        if s.index != si:
            raise fail(
                f"stages[{si}].index", f"is {s.index}; stages must be listed in pipeline order 0, 1, ..."
            )
        if s.cluster not in ids:
            raise fail(f"stages[{si}].cluster", f"unknown cluster {s.cluster!r} (clusters: {ids})")
        start, end = s.units
        if start != position or end <= start:
            raise fail(
                f"stages[{si}].units",
                f"[{start}, {end}) does not continue the pipeline at unit {position}",
            )
        position = end
    if position != n_units:
        raise fail("stages", f"cover units [0, {position}), not all {n_units} units")
    used = [s.cluster for s in r.stages]
    expected = {
        "single": [ids[0]],
        "linear": ids,
        "U": [*ids, ids[0]],
    }[r.structure]
    if used != expected:
        raise fail(
            "stages",
            f"a {r.structure} replica runs its stages on clusters {expected}, the plan says {used}",
        )


def topology(plan: Plan, failed: list[str]) -> Topology:
    """The replicas that run after `failed` devices (in failure order) are gone."""
    current: dict[str, ReplicaSpec] = {}
    primary: dict[str, ReplicaSpec] = {}
    owner: dict[str, str] = {}
    idle: list[str] = []
    planned: dict[str, dict[str, Backup]] = {}  # replica -> device -> the entry to try first
    for b in plan.boundaries:
        for r in b.replicas:
            primary[r.id] = current[r.id] = _replica_spec(b.id, r)
            owner[r.id] = b.id
            planned[r.id] = {k.device: k for k in b.backups if k.replica == r.id}
        idle += b.standby
    gone: set[str] = set()
    applied: list[str] = []
    for device in failed:
        if device in gone:
            continue
        gone.add(device)
        rid = next((i for i, r in current.items() if device in r.devices), None)
        if rid is None:
            if device in idle:
                idle.remove(device)
                applied.append(f"{device}: standby lost, nothing to change")
            continue
        rep, entry = current[rid], planned[rid].get(device)
        carried = _carry_out(entry, rep, rep == primary[rid], owner[rid], set(idle), gone)
        if carried is None and entry is not None and entry.fallback is not None:
            entry = entry.fallback
            carried = _carry_out(entry, rep, rep == primary[rid], owner[rid], set(idle), gone)
        if carried is not None and entry is not None:
            planned[rid] = {**planned[rid], **{k.device: k for k in entry.then}}
        if carried is None:
            new = _shrink(rep, device)
            kind = "shrink (fallback)" if new is not None else "drop_replica (fallback)"
        else:
            new, kind = carried
        if new is None:
            del current[rid]
            idle += [d for d in rep.devices if d != device]
            applied.append(f"{device}: {kind}: replica {rid} stops")
            continue
        idle = [d for d in idle if d not in new.devices] + [
            d for d in rep.devices if d not in new.devices and d != device
        ]
        current[rid] = new
        applied.append(f"{device}: {kind}: replica {rid} now runs on {', '.join(new.devices)}")
    ordered = [current[r.id] for b in plan.boundaries for r in b.replicas if r.id in current]
    return Topology(tuple(ordered), tuple([*idle, *sorted(gone, key=failed.index)]), tuple(applied))


def _carry_out(
    entry: Backup | None, rep: ReplicaSpec, untouched: bool, boundary: str, idle: set[str], gone: set[str]
) -> tuple[ReplicaSpec | None, str] | None:
    """The replica after the plan's backup `entry` (None: the replica stops), or None when the
    entry cannot be carried out in the replica's current state."""
    if entry is None or entry.replica != rep.id:
        return None
    if entry.kind == "drop_replica":
        return None, entry.kind
    if entry.replacement is not None:
        new = _replica_spec(boundary, entry.replacement)
        if set(new.devices) & gone or not set(new.devices) <= idle | set(rep.devices):
            return None
        return new, entry.kind
    if entry.kind == "standby" and entry.standby in idle and untouched:
        return _swap(rep, entry.device, entry.standby), entry.kind
    return None


def _swap(rep: ReplicaSpec, old: str, new: str) -> ReplicaSpec:
    clusters = tuple(
        replace(
            c,
            devices=tuple(new if d == old else d for d in c.devices),
            head=new if c.head == old else c.head,
        )
        for c in rep.clusters
    )
    return replace(rep, clusters=clusters)


def _shrink(rep: ReplicaSpec, device: str) -> ReplicaSpec | None:
    """The replica without `device`: its share spread over the cluster's others; None if alone."""
    ci = next(i for i, c in enumerate(rep.clusters) if device in c.devices)
    c = rep.clusters[ci]
    if len(c.devices) == 1:
        return None
    keep = [i for i, d in enumerate(c.devices) if d != device]
    lost = c.shares[c.devices.index(device)]
    shares = [c.shares[i] + lost // len(keep) for i in keep]
    for k in sorted(range(len(keep)), key=lambda k: (-shares[k], k))[: lost % len(keep)]:
        shares[k] += 1
    devices = tuple(c.devices[i] for i in keep)
    head = c.head if c.head != device else devices[max(range(len(keep)), key=lambda k: (shares[k], -k))]
    # One device left: nothing to shard over.
    mode = c.parallelism.replace("FSDP", "DDP") if len(devices) == 1 else c.parallelism
    shrunk = replace(c, devices=devices, shares=tuple(shares), head=head, parallelism=mode)
    return replace(rep, clusters=(*rep.clusters[:ci], shrunk, *rep.clusters[ci + 1 :]))


def restrict(plan: Plan, replicas: set[str]) -> Plan:
    """The plan of only `replicas` (one job per Echelon device in a deployment): their boundaries'
    backups for them, and the standby devices that back them up. A standby device goes to the first
    replica whose backups name it (unnamed ones to the boundary's first replica), so the jobs of
    one plan never share a device."""
    boundaries = []
    for b in plan.boundaries:
        kept = [r for r in b.replicas if r.id in replicas]
        if not kept:
            continue
        owner: dict[str, str] = {}
        for k in b.backups:
            for name in [
                k.standby,
                *(d for c in (k.replacement.clusters if k.replacement else []) for d in c.devices),
            ]:
                if name in b.standby:
                    owner.setdefault(name, k.replica)
        first = b.replicas[0].id
        standby = [s for s in b.standby if owner.get(s, first) in replicas]
        backups = [k for k in b.backups if k.replica in replicas]
        boundaries.append(b.model_copy(update={"replicas": kept, "standby": standby, "backups": backups}))
    return plan.model_copy(update={"boundaries": boundaries})
