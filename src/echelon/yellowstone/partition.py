"""Contiguous layer partition over an ordered list of clusters: a dynamic program.

The step time sum_g G_g + (m - 1) max_g G_g + max_g AR_g mixes a sum and two maxima, so the
program is parametric in both: for thresholds tau on every cluster's G and alpha on its AR it
finds the partition with the least sum of G under G <= tau and AR <= alpha (a min-sum DP over
contiguous ranges, O(K N^2) with N units, all threshold pairs at once). The optimum's own maxima
are such a pair, so the least sum there is optimal. tau runs from the smallest achievable maximum
(a min-max DP) up to where a larger maximum can no longer pay for itself, alpha up to the same
bound; every candidate is scored with the exact step time. With at most `MAX_THRESHOLDS` values
of tau and `MAX_AR_THRESHOLDS` of alpha in those windows the search is exact; above, the values
are sampled evenly by rank.
Memory limits enter as infinite cost; the fastest parallelism mode that fits is chosen per cell.
"""

from __future__ import annotations

import numpy as np

from echelon.yellowstone.cost import (
    INF,
    AnyNetwork,
    Cluster,
    CostSettings,
    Layout,
    Structure,
    Tables,
    group_cost,
    in_flight,
    sends_seconds,
)

MAX_THRESHOLDS = 40
MAX_AR_THRESHOLDS = 4


def cells(
    clusters: tuple[Cluster, ...],
    structure: Structure,
    tables: Tables,
    net: AnyNetwork,
    settings: CostSettings,
    memo: dict | None = None,
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per cluster: (G, AR) matrices over unit ranges [i, j), G = inf where the cell is not allowed.

    None when a link between consecutive clusters is missing. `memo` caches cells across calls.
    """
    prof, m, _n = tables.profile, settings.micro_batches, tables.n_units
    k = len(clusters)
    sends = sends_seconds(clusters, structure, net, prof.micro_batch * prof.seq_len * prof.activation_bytes)
    if sends is None:
        return None
    fl = in_flight(structure, k, m)
    out = []
    for c, cl in enumerate(clusters):
        role = "first" if c == 0 else ("last" if c == k - 1 else "middle")
        key = (cl.key, role, structure, fl[c], fl[-1], sends[c])
        if memo is None or key not in memo:
            cell = _cell(cl, role, structure, fl[c], fl[-1], sends[c], tables, settings)
            if memo is None:
                out.append(cell)
                continue
            memo[key] = cell
        out.append(memo[key])
    return out


def _cell(cl, role, structure, fl, fl_head, send, tables: Tables, settings: CostSettings):
    valid, seg = _grid(role, structure, fl, fl_head, tables)
    g, ar, _ = group_cost(cl, seg, send, settings, tables.profile.seq_len)
    return np.where(valid, g, INF), np.where(valid, ar, 0.0)


def _grid(role: str, structure: Structure, fl: int, fl_head: int, tables: Tables):
    """Which unit ranges [i, j) a cluster in `role` may host, and their segment (cached)."""
    key = (role, structure, fl, fl_head)
    if key not in tables.grid_segments:
        n = tables.n_units
        i_idx, j_idx = tables.grid
        if role == "first":
            ranges = [(0, j_idx, fl)]
            valid = (i_idx == 0) & (j_idx >= 1) & (j_idx <= (n if structure == "single" else n - 1))
            if structure == "single":
                valid &= j_idx == n
            if structure == "U":
                ranges.append((n - 1, n, fl_head))
        else:
            ranges = [(i_idx, j_idx, fl)]
            end = n - 1 if structure == "U" else n
            valid = (i_idx >= 1) & (j_idx > i_idx) & ((j_idx == end) if role == "last" else (j_idx <= n - 1))
        tables.grid_segments[key] = (valid, tables.segment(ranges))
    return tables.grid_segments[key]


def best_split(
    clusters: tuple[Cluster, ...],
    structure: Structure,
    tables: Tables,
    net: AnyNetwork,
    settings: CostSettings,
    memo: dict | None = None,
) -> tuple[tuple[tuple[int, int], ...], float] | None:
    """Best unit cut points for `clusters` under `structure` and the step time; None if infeasible."""
    found = cells(clusters, structure, tables, net, settings, memo)
    if found is None:
        return None
    m = settings.micro_batches
    end = tables.n_units - 1 if structure == "U" else tables.n_units
    gs, ars = [g for g, _ in found], [ar for _, ar in found]

    def solve(taus: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The min-sum DP for every (tau, alpha) pair at once: least sum of G with every G <= tau
        and every AR <= alpha; the sums and the argmin tables per cluster."""
        t, a = taus[:, None], alphas[:, None]
        dp = np.where((gs[0][0][None] <= t) & (ars[0][0][None] <= a), gs[0][0][None], INF)
        args = []
        for g, ar in zip(gs[1:], ars[1:], strict=True):
            allowed = (g[None] <= t[:, :, None]) & (ar[None] <= a[:, :, None])
            tot = dp[:, :, None] + np.where(allowed, g[None], INF)
            arg = tot.argmin(axis=1)
            dp = np.take_along_axis(tot, arg[:, None, :], axis=1)[:, 0, :]
            args.append(arg)
        return dp[:, end], args

    def cuts_of(k: int, args: list[np.ndarray]) -> tuple[tuple[int, int], ...]:
        cuts, j = [], end
        for arg in reversed(args):
            i = int(arg[k, j])
            cuts.append((i, j))
            j = i
        cuts.append((0, j))
        return tuple(reversed(cuts))

    def step_of(cuts) -> float:
        g = [float(gs[c][i, j]) for c, (i, j) in enumerate(cuts)]
        return sum(g) + (m - 1) * max(g) + max(float(ars[c][i, j]) for c, (i, j) in enumerate(cuts))

    mm = gs[0][0]
    for g in gs[1:]:
        mm = np.maximum(mm[:, None], g).min(axis=0)
    tau_lo = float(mm[end])
    if tau_lo == INF:
        return None
    (_, sum_free), args = solve(np.array([tau_lo, INF]), np.array([INF, INF]))
    step_lo = step_of(cuts_of(0, args))
    # The optimum has max G <= tau_hi and max AR <= alpha_hi, or the partition at tau_lo beats it.
    tau_hi = INF if m == 1 else (step_lo - sum_free) / (m - 1)
    alpha_hi = step_lo - sum_free - (m - 1) * tau_lo
    taus = _thresholds(gs, tau_lo, tau_hi, MAX_THRESHOLDS, [tau_lo])
    alphas = _thresholds([np.where(np.isfinite(g), ar, INF) for g, ar in zip(gs, ars, strict=True)], 0.0, alpha_hi,
                         MAX_AR_THRESHOLDS, [INF])  # fmt: skip
    pairs_t, pairs_a = (x.ravel() for x in np.meshgrid(taus, alphas, indexing="ij"))
    sums, args = solve(pairs_t, pairs_a)
    best: tuple[tuple[tuple[int, int], ...], float] | None = None
    for k in np.flatnonzero(np.isfinite(sums)):
        cuts = cuts_of(int(k), args)
        step = step_of(cuts)
        if best is None or step < best[1] - 1e-12 or (abs(step - best[1]) <= 1e-12 and cuts < best[0]):
            best = (cuts, step)
    return best


def _thresholds(mats: list[np.ndarray], low: float, high: float, most: int, extra: list[float]) -> np.ndarray:
    """Distinct finite values of the matrices in [low, high], evenly sampled by rank down to
    `most`, plus `extra`."""
    values = np.unique(np.concatenate([x[np.isfinite(x)].ravel() for x in mats]))
    values = values[(values >= low) & (values <= high)]
    if len(values) > most:
        values = values[np.linspace(0, len(values) - 1, most).round().astype(int)]
    return np.unique(np.concatenate([extra, values]))


def best_layout(
    clusters: tuple[Cluster, ...],
    tables: Tables,
    net: AnyNetwork,
    settings: CostSettings,
    memo: dict | None = None,
) -> tuple[Layout, float] | None:
    """The best structure and split for clusters in this order (cluster 0 must be cleared)."""
    if len(clusters) == 1:
        options: list[Structure] = ["single"]
    else:
        options = ["U"] + (["linear"] if all(d.cleared for d in clusters[-1].devices) else [])
    best: tuple[Layout, float] | None = None
    for structure in options:
        found = best_split(clusters, structure, tables, net, settings, memo)
        if found is not None and (best is None or found[1] < best[1] - 1e-12):
            best = (Layout(clusters, structure, found[0]), found[1])
    return best
