"""Contiguous layer partition over an ordered list of clusters: a dynamic program.

The step time sum_g G_g + (m - 1) max_g G_g + max_g AR_g mixes a sum and a maximum, so the program
is parametric: for a threshold tau on each cluster's bottleneck contribution G' = G + AR/(m - 1)
it finds the partition with the least sum of G under G' <= tau (a min-sum DP over contiguous
ranges, O(K N^2) with N units), for tau from the smallest achievable bottleneck (a min-max DP) up
to where a larger bottleneck can no longer pay for itself. Every candidate partition is scored
with the exact step time. With at most `MAX_THRESHOLDS` distinct thresholds in that window the
search is exact for the surrogate; above, thresholds are sampled evenly by rank.
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


def cells(
    clusters: tuple[Cluster, ...],
    structure: Structure,
    tables: Tables,
    net: AnyNetwork,
    settings: CostSettings,
    memo: dict | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """Per cluster: (G, AR, G') matrices over unit ranges [i, j), G = inf where the cell is not
    allowed, G' = G + AR / (m - 1) the cluster's contribution to the bottleneck.

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
    g, ar = np.where(valid, g, INF), np.where(valid, ar, 0.0)
    return g, ar, g + ar / max(settings.micro_batches - 1, 1)


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
    n = tables.n_units
    end = n - 1 if structure == "U" else n
    gp = [x[2] for x in found]

    def solve(taus: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The min-sum DP for every threshold at once: sums (T,) and argmin tables per cluster."""
        dp = np.where(gp[0][0][None, :] <= taus[:, None], found[0][0][0][None, :], INF)
        args = []
        for (g, _, _), p in zip(found[1:], gp[1:], strict=True):
            tot = dp[:, :, None] + np.where(p[None] <= taus[:, None, None], g[None], INF)
            arg = tot.argmin(axis=1)
            dp = np.take_along_axis(tot, arg[:, None, :], axis=1)[:, 0, :]
            args.append(arg)
        return dp[:, end], args

    def cuts_of(t: int, args: list[np.ndarray]) -> tuple[tuple[int, int], ...]:
        cuts, j = [], end
        for arg in reversed(args):
            i = int(arg[t, j])
            cuts.append((i, j))
            j = i
        cuts.append((0, j))
        return tuple(reversed(cuts))

    mm = gp[0][0]
    for p in gp[1:]:
        mm = np.maximum(mm[:, None], p).min(axis=0)
    tau_lo = float(mm[end])
    if tau_lo == INF:
        return None
    (sum_lo, sum_free), _ = solve(np.array([tau_lo, INF]))
    tau_hi = tau_lo + (sum_lo - sum_free) / max(m - 1, 1)
    values = np.unique(np.concatenate([p[np.isfinite(p)].ravel() for p in gp]))
    values = values[(values >= tau_lo) & (values <= tau_hi)]
    if len(values) > MAX_THRESHOLDS:
        values = values[np.linspace(0, len(values) - 1, MAX_THRESHOLDS).round().astype(int)]
    taus = np.unique(np.concatenate([[tau_lo], values]))
    sums, args = solve(taus)
    best: tuple[tuple[tuple[int, int], ...], float] | None = None
    for t in np.flatnonzero(np.isfinite(sums)):
        cuts = cuts_of(int(t), args)
        g = [float(found[c][0][i, j]) for c, (i, j) in enumerate(cuts)]
        ar = [float(found[c][1][i, j]) for c, (i, j) in enumerate(cuts)]
        step = sum(g) + (m - 1) * max(g) + max(ar)
        if best is None or step < best[1] - 1e-12 or (abs(step - best[1]) <= 1e-12 and cuts < best[0]):
            best = (cuts, step)
    return best


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
