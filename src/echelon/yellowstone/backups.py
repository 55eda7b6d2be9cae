"""Backups: what each device's failure turns its replica into, precomputed and carried out in full.

For a failed device the options are those that keep the replica's layer split (only the failed
device's cluster changes, so an executor moves no layers): a standby takes its place (at its
site, or at another site joined by routes when it was alone in its cluster); its cluster shrinks;
a lone device's layers join the cluster before or after it. And those whose split the DP solves
again: the same, a standby at another site as a new cluster after the failed device's, the
replica without the device's cluster, another cleared device as cluster 0 (on boundaries too
large for the local search, only when nothing keeps the split: that bounds planning time). Else
the replica stops. The fastest option wins; on a tie, a standby, then an unchanged split. Each entry but
`drop_replica` carries its whole replacement replica (devices, layer split, parallelism,
predicted figures over the links as the replica shares them), so an executor applies it without
planning; `verify` checks every one as it checks the primary plan.

A standby entry also carries its `fallback`, the best option without a standby, for when an
earlier failure took that standby. Heads and raw-data devices get two-failure coverage: their
entry's `then` holds the backups, in the replacement, of the devices that took over their role
(all raw-data devices after a raw-data device fails; the new head after a head fails), so two
failures in the same critical role, one after the other, are both planned for.
"""

from __future__ import annotations

from dataclasses import dataclass

from echelon.yellowstone import plan as P
from echelon.yellowstone.cost import Layout, ReplicaCost, evaluate
from echelon.yellowstone.emit import head_of, replica_plan
from echelon.yellowstone.network import SharedNetwork
from echelon.yellowstone.search import LOCAL_SEARCH_DEVICES, Context, Evaluator, Replica

SPARES_TRIED = 3  # kinds of standby tried per failure at its site, and as many at other sites


@dataclass(frozen=True)
class Option:
    kind: str
    replica: Replica
    layout: Layout
    cost: ReplicaCost
    standby: int | None = None
    moved: bool = False  # the layer split changed

    def rank(self) -> tuple:
        """Fastest first; on ties a standby (it keeps the replica whole), then an unchanged split."""
        return (-self.cost.tokens_per_s, self.standby is None, self.moved)


def _raw(replica: Replica, layout: Layout) -> set[int]:
    """Clusters hosting raw-data stages: cluster 0, and the last one of a linear pipeline."""
    return {0} | ({len(replica) - 1} if layout.structure == "linear" else set())


def _head(ctx: Context, cluster: tuple[int, ...]) -> int:
    name = head_of([ctx.devices[i] for i in cluster])
    return next(i for i in cluster if ctx.devices[i].id == name)


def critical(ctx: Context, replica: Replica, layout: Layout) -> list[int]:
    """Heads and raw-data devices: every device of a raw-data cluster, and every cluster's head."""
    raw = _raw(replica, layout)
    return [i for c, cl in enumerate(replica) for i in cl if c in raw or i == _head(ctx, cl)]


def heirs(ctx: Context, rep: Replica, layout: Layout, d: int, new: Replica, new_layout: Layout) -> list[int]:
    """The devices of `new` holding the role d held in `rep`: every raw-data device if d was one;
    the head of the cluster that carries on d's cluster if d was its head; none otherwise."""
    c = next(k for k, cl in enumerate(rep) if d in cl)
    if c in _raw(rep, layout):
        return [i for k in sorted(_raw(new, new_layout)) for i in new[k]]
    if d != _head(ctx, rep[c]):
        return []
    carry = (set(rep[c]) - {d}) or ({i for cl in new for i in cl} - {i for cl in rep for i in cl})
    return [_head(ctx, cl) for cl in new if set(cl) & carry][:1]


class Backups:
    """Backup entries of one boundary (see the module docstring)."""

    def __init__(
        self,
        ctx: Context,
        ev: Evaluator,
        standby: list[int],
        rids: list[str],
        shared: list[tuple[ReplicaCost, SharedNetwork]],
    ) -> None:
        self.ctx, self.ev, self.rids, self.shared = ctx, ev, rids, shared
        devs = ctx.devices
        self.spares = sorted(standby, key=lambda s: (-devs[s].capacity, -devs[s].speed, s))
        self.total = sum(cost.tokens_per_s for cost, _ in shared)

    def all(self, replicas: list[Replica]) -> list[P.Backup]:
        out = []
        for r, rep in enumerate(replicas):
            rest = self.total - self.shared[r][0].tokens_per_s
            layout = self.ev.layout(rep)
            keep = set(critical(self.ctx, rep, layout))
            for cl in rep:
                for d in cl:
                    out.append(
                        self.entry(r, rep, layout, d, set(self.spares), rest, second=d in keep, fallback=True)
                    )
        return out

    def entry(
        self,
        r: int,
        rep: Replica,
        layout: Layout,
        d: int,
        spares: set[int],
        rest: float,
        second: bool,
        fallback: bool,
    ) -> P.Backup:
        """The backup for device d of replica r (now `rep` laid out as `layout`) with `spares` free."""
        devs, rid = self.ctx.devices, self.rids[r]
        options = self.options(r, rep, layout, d, spares)
        if not options:
            return P.Backup(device=devs[d].id, kind="drop_replica", replica=rid, tokens_per_s_after=rest)
        best = options[0]
        entry = self._entry_for(r, d, best, rest)
        if fallback and best.standby is not None:
            alone = [o for o in options if o.standby is None] or self.options(r, rep, layout, d, set())
            entry.fallback = (
                self._entry_for(r, d, alone[0], rest)
                if alone
                else P.Backup(device=devs[d].id, kind="drop_replica", replica=rid, tokens_per_s_after=rest)
            )
        if second:
            left = spares - {best.standby}
            entry.then = [
                self.entry(r, best.replica, best.layout, e, left, rest, second=False, fallback=False)
                for e in heirs(self.ctx, rep, layout, d, best.replica, best.layout)
            ]
        return entry

    def _entry_for(self, r: int, d: int, option: Option, rest: float) -> P.Backup:
        ctx, view = self.ctx, self.shared[r][1]
        plan = replica_plan(self.rids[r], option.layout, option.cost, ctx.tables, view, ctx.settings)
        standby = None if option.standby is None else ctx.devices[option.standby].id
        return P.Backup(
            device=ctx.devices[d].id, kind=option.kind, replica=self.rids[r], standby=standby, replacement=plan,
            tokens_per_s_after=rest + option.cost.tokens_per_s,
        )  # fmt: skip

    def _kinds(self, spares: set[int], keep) -> list[int]:
        """The first free standby of each kind (site, speed, memory, clearance) that `keep` accepts."""
        devs, seen, out = self.ctx.devices, set(), []
        for s in self.spares:
            d = devs[s]
            key = (d.site, d.speed, d.capacity, d.cleared)
            if s in spares and keep(d) and key not in seen:
                seen.add(key)
                out.append(s)
                if len(out) == SPARES_TRIED:
                    break
        return out

    def options(self, r: int, rep: Replica, layout: Layout, d: int, spares: set[int]) -> list[Option]:
        """Feasible replacements of `rep` without device d, best first (standby first on ties).

        Those that keep the layer split: a standby in d's place (at d's site, or at another site
        when d was alone in its cluster), the cluster without d, or, for a lone device, its units
        joined to the cluster before or after. Then, with the split solved again by the DP: the
        same, a standby at another site as a new cluster after d's, the replica without d's
        cluster, or another cleared device as cluster 0; on boundaries too large for the local
        search only when nothing keeps the split.
        """
        devs = self.ctx.devices
        c = next(k for k, cl in enumerate(rep) if d in cl)
        left = tuple(i for i in rep[c] if i != d)
        raw = c == 0 or (layout.structure == "linear" and c == len(rep) - 1)
        site = devs[d].site
        kept: list[tuple[str, Replica, tuple, int | None]] = []
        for s in self._kinds(spares, lambda x: (x.site == site or not left) and (x.cleared or not raw)):
            kept.append(("standby", (*rep[:c], (*left, s), *rep[c + 1 :]), layout.cuts, s))
        if left:
            kept.append(("shrink", (*rep[:c], left, *rep[c + 1 :]), layout.cuts, None))
        elif c > 0:
            without = (*rep[:c], *rep[c + 1 :])
            cuts = list(layout.cuts)
            merged = [(*cuts[: c - 1], (cuts[c - 1][0], cuts[c][1]), *cuts[c + 1 :])]
            if c + 1 < len(cuts):
                merged.append((*cuts[:c], (cuts[c][0], cuts[c + 1][1]), *cuts[c + 2 :]))
            kept += [("replan", without, tuple(m), None) for m in merged]
        out = [o for kind, t, cuts, s in kept if (o := self._fixed(r, kind, t, layout, cuts, s)) is not None]
        if out and len(devs) > LOCAL_SEARCH_DEVICES:
            return sorted(out, key=Option.rank)
        solved: list[tuple[str, Replica, int | None]] = [(kind, t, s) for kind, t, _, s in kept]
        if left:
            solved += [
                ("standby", (*rep[:c], left, (s,), *rep[c + 1 :]), s)
                for s in self._kinds(spares, lambda x: x.site != site)
            ]
        elif c > 0:
            solved.append(("replan", (*rep[:c], *rep[c + 1 :]), None))
        else:  # cluster 0 lost its only device: another cleared device takes over
            for e in sorted(i for cl in rep[1:] for i in cl if devs[i].cleared):
                rest = (tuple(i for i in cl if i != e) for cl in rep[1:])
                solved.append(("replan", ((e,), *(x for x in rest if x)), None))
        out += [o for kind, t, s in solved if (o := self._solved(r, kind, t, s)) is not None]
        return sorted(out, key=Option.rank)

    def _fixed(
        self, r: int, kind: str, trial: Replica, layout: Layout, cuts: tuple, s: int | None
    ) -> Option | None:
        """The option with the given cuts, if it fits memory and its routes exist."""
        ev, ctx = self.ev, self.ctx
        if not ev.valid(trial):
            return None
        structure = layout.structure if len(trial) > 1 else "single"
        if structure == "single":
            cuts = ((0, ctx.tables.n_units),)  # the head, folded back in a U, is its own again
        if structure == "linear" and not all(ctx.devices[i].cleared for i in trial[-1]):
            return None
        fixed = Layout(ev.clusters(trial), structure, cuts)
        cost = evaluate(fixed, ctx.tables, self.shared[r][1], ctx.settings)
        return None if cost is None else Option(kind, ev.canonical(trial), fixed, cost, s)

    def _solved(self, r: int, kind: str, trial: Replica, s: int | None) -> Option | None:
        """The option with the split the DP finds best for it, if it trains at all."""
        if self.ev.score(trial) <= 0:
            return None
        layout = self.ev.layout(trial)
        cost = evaluate(layout, self.ctx.tables, self.shared[r][1], self.ctx.settings)
        assert cost is not None  # the DP found it feasible; sharing only slows links
        return Option(kind, self.ev.canonical(trial), layout, cost, s, moved=True)


def backups(
    ctx: Context,
    ev: Evaluator,
    replicas: list[Replica],
    standby: list[int],
    rids: list[str],
    shared: list[tuple[ReplicaCost, SharedNetwork]],
) -> list[P.Backup]:
    """One backup entry per device in a replica (see the module docstring)."""
    return Backups(ctx, ev, standby, rids, shared).all(replicas)
