"""Packing replicas onto a boundary's devices: an integer program solved by HiGHS.

Devices of one site with equal speed, memory and clearance are interchangeable: a device *class*.
A replica *pattern* names, per cluster in pipeline order, the classes of its devices; its
throughput is the Evaluator's. Given candidate plans (every construction, local search result,
and sub-fleet plan: one copy of a replicated fleet, one connected group of sites), `pack` chooses
how many copies of each of their patterns to run:

    maximise  sum_p tokens_per_s(p) x_p
    subject to  sum_p count_p(c) x_p <= devices(c)  for every class c,   x_p integer >= 0.

Every candidate plan is a feasible point of this program (and is handed to HiGHS as its starting
solution), so the packing never does worse than the best of them; a sub-fleet's plan replicated
k times is a point of it too, which is how a fleet of k copies never loses to its one-copy plan.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import highspy
import numpy as np

# The binding itself: the `highspy.Highs` wrapper's constructor enables callbacks, which prints
# HiGHS's banner to stdout before any option can turn the output off.
from highspy.highs import _Highs

from echelon.yellowstone.search import Context, Evaluator, Replica

Pattern = tuple[tuple[int, ...], ...]  # class ids per cluster, sorted within a cluster
MILP_NODES = 2000  # branch-and-bound nodes HiGHS may explore: a work limit, so the result is repeatable
MILP_SECONDS = 60.0  # a safety limit only (hit, the result would depend on the machine's speed)


@dataclass(frozen=True)
class Classes:
    """Interchangeable devices: `of[i]` is device i's class, `members[c]` its devices in order."""

    of: tuple[int, ...]
    members: tuple[tuple[int, ...], ...]

    @staticmethod
    def of_context(ctx: Context) -> Classes:
        keys: dict[tuple, int] = {}
        of = []
        for d in ctx.devices:
            of.append(keys.setdefault((d.site, d.speed, d.capacity, d.cleared), len(keys)))
        members: list[list[int]] = [[] for _ in keys]
        for i, c in enumerate(of):
            members[c].append(i)
        return Classes(tuple(of), tuple(tuple(m) for m in members))

    def pattern(self, replica: Replica) -> Pattern:
        return tuple(tuple(sorted(self.of[i] for i in c)) for c in replica)


def copies(classes: Classes, limit: int) -> list[int]:
    """Copy counts k > 1 that split the devices into k equal sub-fleets (each class evenly),
    largest sub-fleet first, of at most `limit` devices each."""
    counts = [len(m) for m in classes.members]
    g = math.gcd(*counts)
    n = sum(counts)
    return [k for k in range(2, g + 1) if g % k == 0 and n // k <= limit]


def sub_fleet(classes: Classes, k: int) -> list[int]:
    """Devices of the first of k equal copies: the first 1/k of each class, in device order."""
    return sorted(i for m in classes.members for i in m[: len(m) // k])


def pack(ev: Evaluator, candidates: list[list[Replica]]) -> list[Replica]:
    """The best combination of the candidates' replica patterns (see the module docstring)."""
    classes = Classes.of_context(ev.ctx)
    value: dict[Pattern, float] = {}
    example: dict[Pattern, Replica] = {}
    for plan in candidates:
        for r in plan:
            p = classes.pattern(r)
            if p not in value:
                v = ev.score(r)
                if v > 0:
                    value[p], example[p] = v, r
    if not value:
        return []
    patterns = sorted(value, key=lambda p: (-value[p], p))
    best = max(candidates, key=lambda plan: (sum(ev.score(r) for r in plan), -len(plan)))
    start = Counter(classes.pattern(r) for r in best if ev.score(r) > 0)
    x = _solve(patterns, value, classes, start)
    chosen = (
        x if sum(value[p] * n for p, n in x.items()) > sum(value[p] * n for p, n in start.items()) else start
    )
    return _instantiate(chosen, patterns, example, classes)


def _solve(patterns: list[Pattern], value: dict[Pattern, float], classes: Classes, start: Counter) -> Counter:
    """Integer copies of each pattern, started from `start`."""
    columns = [Counter(c for cluster in p for c in cluster) for p in patterns]
    x, _ = integer_packing(
        [value[p] for p in patterns],
        columns,
        [len(m) for m in classes.members],
        [start.get(p, 0) for p in patterns],
    )
    return Counter({p: n for p, n in zip(patterns, x, strict=True) if n > 0})


def integer_packing(
    values: list[float], columns: list[Counter], capacity: list[int], start: list[int] | None = None
) -> tuple[list[int], float]:
    """max sum_j values[j] x_j subject to sum_j columns[j][i] x_j <= capacity[i], x integer >= 0.

    HiGHS on one thread with a node limit (repeatable); `start` is a feasible starting point.
    Returns the best solution found (zeros if none) and HiGHS's bound on the optimum (equal to the
    solution's value when solved to optimality).
    """
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(values), len(capacity)
    lp.sense_ = highspy.ObjSense.kMaximize
    lp.col_cost_ = np.array(values, dtype=float)
    lp.col_lower_ = np.zeros(len(values))
    lp.col_upper_ = np.array([min(capacity[i] // n for i, n in col.items()) for col in columns], dtype=float)
    lp.row_lower_ = np.full(len(capacity), -highspy.kHighsInf)
    lp.row_upper_ = np.array(capacity, dtype=float)
    starts, index, entries = [0], [], []
    for col in columns:
        for i in sorted(col):
            index.append(i)
            entries.append(float(col[i]))
        starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.array(starts)
    lp.a_matrix_.index_ = np.array(index)
    lp.a_matrix_.value_ = np.array(entries)
    lp.integrality_ = [highspy.HighsVarType.kInteger] * len(values)
    h = _Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", MILP_SECONDS)
    h.setOptionValue("mip_max_nodes", MILP_NODES)
    h.setOptionValue("mip_rel_gap", 1e-6)
    h.setOptionValue("threads", 1)
    h.setOptionValue("random_seed", 0)
    h.passModel(lp)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = [float(x) for x in start]
        h.setSolution(sol)
    h.run()
    info = h.getInfo()
    if info.primal_solution_status != 2:  # 2 = feasible
        return [0] * len(values), float(info.mip_dual_bound)
    return [round(v) for v in h.getSolution().col_value], float(info.mip_dual_bound)


def _instantiate(
    chosen: Counter, patterns: list[Pattern], example: dict[Pattern, Replica], classes: Classes
) -> list[Replica]:
    """Concrete replicas for the chosen pattern copies. The first copy of a pattern keeps its
    candidate's own devices where they are all free (a chosen plan comes back as it was); other
    copies take the first free devices of each class."""
    taken: set[int] = set()
    out: list[Replica] = []
    pending: list[Pattern] = []
    for p in patterns:
        n = chosen.get(p, 0)
        own = example[p]
        if n and not any(i in taken for cl in own for i in cl):
            out.append(own)
            taken |= {i for cl in own for i in cl}
            n -= 1
        pending += [p] * n
    free = {c: [i for i in m if i not in taken] for c, m in enumerate(classes.members)}
    for p in pending:
        out.append(tuple(tuple(free[classes.of[i]].pop(0) for i in cl) for cl in example[p]))
    return out
