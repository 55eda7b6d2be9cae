"""Contiguous layer partition over an ordered list of clusters: a dynamic program.

The step time sum_g G_g + (m - 1) max_g G_g + max_g AR_g mixes a sum and two maxima, so the
program is parametric: for thresholds on what each cluster may contribute it finds the partition
with the least sum of G (a min-sum DP over contiguous ranges, O(K N^2) with N units, all
thresholds at once), and every candidate is scored with the exact step time.
- The surrogate family bounds each cluster's G' = G + AR / (m - 1) by one threshold tau, from the
  smallest achievable maximum (a min-max DP) up to where a larger one can no longer pay for
  itself: exact when the slowest cluster also has the slowest all-reduce (single devices, FSDP).
- The exact family bounds G by tau and AR by alpha separately; the optimum's own maxima are such
  a pair, so the least sum there is optimal. It runs where its work fits `PAIR_CELLS` (models of
  up to about 20 units, the exhaustive references' sizes), exact while the pairs in the windows
  fit and tau takes at most `MAX_THRESHOLDS` values.
Beyond those counts the values are sampled evenly by rank. Memory limits enter as infinite cost;
the fastest parallelism mode that fits is chosen per cell.
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
    pipeline_seconds,
)

MAX_THRESHOLDS = 40
PAIR_CELLS = 50_000  # DP cells per cluster the exact family may spend: 1,020 pairs at 6 units, 0 at 34


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
    sends = pipeline_seconds(
        clusters, structure, net, prof.micro_batch * prof.seq_len * prof.activation_bytes
    )
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
    gps = [g + ar / max(m - 1, 1) for g, ar in found]

    def solve(limits: list[tuple[list[np.ndarray], np.ndarray]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The min-sum DP for P rows of thresholds at once: least sum of G with every cluster's
        matrices under their row's threshold for each limit (matrices, thresholds of shape (P,))."""

        def allowed(c: int) -> np.ndarray:
            ok = np.ones((1, 1, 1), bool)
            for mats, th in limits:
                ok = ok & (mats[c][None] <= th[:, None, None])
            return ok

        dp = np.where(allowed(0)[:, 0, :], gs[0][0][None], INF)
        args = []
        for c in range(1, len(gs)):
            tot = dp[:, :, None] + np.where(allowed(c), gs[c][None], INF)
            arg = tot.argmin(axis=1)
            dp = np.take_along_axis(tot, arg[:, None, :], axis=1)[:, 0, :]
            args.append(arg)
        return dp[:, end], args

    def candidates(limits) -> list[tuple[tuple[int, int], ...]]:
        sums, args = solve(limits)
        out = []
        for k in np.flatnonzero(np.isfinite(sums)):
            cuts, j = [], end
            for arg in reversed(args):
                i = int(arg[k, j])
                cuts.append((i, j))
                j = i
            cuts.append((0, j))
            out.append(tuple(reversed(cuts)))
        return out

    def step_of(cuts) -> float:
        g = [float(gs[c][i, j]) for c, (i, j) in enumerate(cuts)]
        return sum(g) + (m - 1) * max(g) + max(float(ars[c][i, j]) for c, (i, j) in enumerate(cuts))

    def min_max(mats: list[np.ndarray]) -> float:
        mm = mats[0][0]
        for x in mats[1:]:
            mm = np.maximum(mm[:, None], x).min(axis=0)
        return float(mm[end])

    if min_max(gs) == INF:
        return None
    # The surrogate family: every cluster's G + AR / (m - 1) under one threshold tau.
    tau_lo = min_max(gps)
    (sum_lo, sum_free), _ = solve([(gps, np.array([tau_lo, INF]))])
    taus = _sample(_values(gps, tau_lo, tau_lo + (sum_lo - sum_free) / max(m - 1, 1)), MAX_THRESHOLDS)
    found_cuts = candidates([(gps, np.unique(np.concatenate([[tau_lo], taus])))])
    # The exact family, where the work allows: G and AR under their own thresholds (the optimum's
    # maxima are one such pair), each up to where a larger maximum cannot pay for itself.
    pairs = PAIR_CELLS // (tables.n_units + 1) ** 2
    if pairs >= 2 * MAX_THRESHOLDS:
        step_lo = min(step_of(c) for c in found_cuts)
        g_lo = min_max(gs)
        g_hi = INF if m == 1 else (step_lo - sum_free) / (m - 1)
        g_taus = _values(gs, g_lo, g_hi)
        alphas = _values([np.where(np.isfinite(g), ar, INF) for g, ar in zip(gs, ars, strict=True)], 0.0,
                         step_lo - sum_free - (m - 1) * g_lo)  # fmt: skip
        n_tau = min(len(g_taus) + 1, MAX_THRESHOLDS)
        n_alpha = max(1, min(len(alphas), pairs // n_tau))
        g_taus = np.unique(np.concatenate([[g_lo], _sample(g_taus, n_tau)]))
        alphas = np.unique(np.concatenate([[INF], _sample(alphas, n_alpha)]))
        t, a = (x.ravel() for x in np.meshgrid(g_taus, alphas, indexing="ij"))
        found_cuts += candidates([(gs, t), (ars, a)])
    best: tuple[tuple[tuple[int, int], ...], float] | None = None
    for cuts in found_cuts:
        step = step_of(cuts)
        if best is None or step < best[1] - 1e-12 or (abs(step - best[1]) <= 1e-12 and cuts < best[0]):
            best = (cuts, step)
    return best


def _values(mats: list[np.ndarray], low: float, high: float) -> np.ndarray:
    """Distinct finite values of the matrices in [low, high], sorted."""
    values = np.unique(np.concatenate([x[np.isfinite(x)].ravel() for x in mats]))
    return values[(values >= low) & (values <= high)]


def _sample(values: np.ndarray, most: int) -> np.ndarray:
    """At most `most` of sorted values, evenly by rank (the smallest and largest kept)."""
    if len(values) <= most:
        return values
    return values[np.linspace(0, len(values) - 1, most).round().astype(int)]


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
