"""The cost model (ARCHITECTURE.md §5): time, memory and bytes of one pipeline replica.

A replica is an ordered list of clusters. Each cluster runs its stages data-parallel over its
devices with the micro-batch split proportional to speed (whole sequences, at least one each), so
its compute time per micro-batch is F x max_d(share_d x seq_len / speed_d). Parallelism per
cluster, chosen as the fastest that fits every device: DDP, DDP with activation checkpointing,
FSDP, FSDP with checkpointing (FSDP only on two or more devices).

- point to point between stages: alpha + bytes / beta on the slowest link between the clusters,
  once forward (activations) and once backward (their gradients), charged to the sender;
- ring all-reduce 2(n-1) alpha + 2(n-1)/n S/beta (DDP gradients, once per step); FSDP all-gathers
  the weights twice per micro-batch (three times with checkpointing) and reduce-scatters the
  gradients once, each (n-1) alpha + (n-1)/n S/beta;
- memory per device, DDP: state + activations; FSDP: state / n + the largest unsharded unit +
  activations; plus a fixed runtime overhead, against `memory_headroom` of the device's memory;
  1F1B keeps min(S - k, m) micro-batches in flight on stage k of S;
- a cluster's time per micro-batch G is the sum of its stages (the first cluster of a U-shaped
  pipeline runs two: the input stage and the head); the step takes
  sum_k T_k + (m - 1) max_g G_g + max_g AR_g, and the bubble is 1 - m max_g G_g / pipeline time.

Calibration: `calibrate` turns measured step times in the fleet file into a per-device factor
eta = measured FLOP/s / declared FLOP/s; `CostSettings` holds the global knobs.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from echelon.errors import UserError
from echelon.yellowstone.fleet import GIB, Fleet
from echelon.yellowstone.model_profile import PRESETS, ModelProfile, build_profile

Structure = Literal["single", "U", "linear"]
MODES = ("DDP", "DDP+ckpt", "FSDP", "FSDP+ckpt")
INF = float("inf")


@dataclass(frozen=True)
class CostSettings:
    """Global knobs of the cost model.

    micro_batches: m, micro-batches per step and replica; memory_headroom: usable fraction of a
    device's memory; overhead_bytes: runtime context per device (CUDA context, allocator slack).
    """

    micro_batches: int = 8
    memory_headroom: float = 0.9
    overhead_bytes: float = 0.5 * GIB


@dataclass(frozen=True)
class Device:
    """A device as the planner sees it: effective speed (FLOP/s) and usable memory (bytes)."""

    id: str
    site: str
    speed: float
    capacity: float
    memory: float
    cleared: bool
    reliability: float


@dataclass(frozen=True)
class Link:
    alpha: float  # seconds
    beta: float  # bytes per second

    def p2p(self, nbytes: float) -> float:
        return self.alpha + nbytes / self.beta


class Network:
    """Links between sites; a missing site pair is unreachable (None)."""

    def __init__(self, fleet: Fleet) -> None:
        self._links: dict[tuple[str, str], Link | None] = {}
        for spec in (*fleet.sites, *fleet.links):
            pair = (spec.id, spec.id) if hasattr(spec, "id") else tuple(sorted(spec.sites))
            self._links[pair] = Link(spec.latency_s, spec.bytes_per_s)
        d = fleet.default_link
        self._default = None if d is None else Link(d.latency_s, d.bytes_per_s)

    def link(self, a: str, b: str) -> Link | None:
        return self._links.get((a, b) if a <= b else (b, a), self._default)


def calibrate(fleet: Fleet, profile: ModelProfile) -> dict[str, float]:
    """eta per device id from its measured steps (1.0 without measurements).

    A measured step of `micro_batch` x `seq_len` tokens of a known model is worth that many tokens
    times the model's FLOPs per token; eta is the mean of (FLOPs / step_s) / declared FLOP/s.
    """
    out: dict[str, float] = {}
    for i, d in enumerate(fleet.devices):
        ratios = []
        for j, m in enumerate(d.measured_steps):
            if m.model in PRESETS:
                shape = PRESETS[m.model]
            elif m.model == profile.name:
                shape = profile.shape
            else:
                raise UserError(
                    f"devices[{i}].measured_steps[{j}].model: unknown model {m.model!r}; use a preset "
                    f"({', '.join(PRESETS)}) or the planned model's name {profile.name!r}"
                )
            p = build_profile(m.model, shape, trainable=m.trainable, dtype=profile.dtype, seq_len=m.seq_len)
            ratios.append(p.flops_per_token * m.seq_len * m.micro_batch / m.step_s / d.flops)
        out[d.id] = float(np.mean(ratios)) if ratios else 1.0
    return out


def devices_of(fleet: Fleet, boundary: str, settings: CostSettings, eta: dict[str, float]) -> list[Device]:
    """The boundary's devices in file order, with calibrated speed and usable memory."""
    rank = {t: i for i, t in enumerate(fleet.access_tiers)}
    need = rank[next(b.data_tier for b in fleet.boundaries if b.id == boundary)]
    return [
        Device(
            d.id,
            d.site,
            d.flops * eta.get(d.id, 1.0),
            d.memory * settings.memory_headroom,
            d.memory,
            rank[d.access_tier] >= need,
            d.reliability,
        )
        for d in fleet.devices
        if d.boundary == boundary
    ]


def split_shares(speeds: list[float], micro_batch: int) -> list[int]:
    """Whole sequences per device, at least one each, minimising max(share / speed); sums to B."""
    shares = [1] * len(speeds)
    heap = [(2 / s, i) for i, s in enumerate(speeds)]
    heapq.heapify(heap)
    for _ in range(micro_batch - len(speeds)):
        _, i = heapq.heappop(heap)
        shares[i] += 1
        heapq.heappush(heap, ((shares[i] + 1) / speeds[i], i))
    return shares


@dataclass(frozen=True)
class Cluster:
    """Devices of one site that run the same stages data-parallel."""

    devices: tuple[Device, ...]
    shares: tuple[int, ...]
    lan: Link
    seconds_per_flop: float  # per FLOP per token of the slowest share: max_d share_d * seq / speed_d

    @property
    def site(self) -> str:
        return self.devices[0].site

    @property
    def n(self) -> int:
        return len(self.devices)


def make_cluster(devices: tuple[Device, ...], lan: Link, profile: ModelProfile) -> Cluster:
    shares = split_shares([d.speed for d in devices], profile.micro_batch)
    spf = max(s * profile.seq_len / d.speed for s, d in zip(shares, devices, strict=True))
    return Cluster(devices, tuple(shares), lan, spf)


@dataclass
class Segment:
    """What a cluster hosts, summed over its units (scalars or arrays over candidate ranges).

    act_full / act_ckpt are activation bytes per token of its own share, already multiplied by
    the micro-batches in flight of each stage.
    """

    flops: object
    recompute: object
    state: object
    weight: object
    grad: object
    max_weight: object
    act_full: object
    act_ckpt: object


def group_cost(cl: Cluster, seg: Segment, sends: float, settings: CostSettings, seq_len: int):
    """(G seconds per micro-batch, AR seconds per step, mode index); G is inf where nothing fits."""
    n, a, beta = cl.n, cl.lan.alpha, cl.lan.beta
    spf = cl.seconds_per_flop
    ag = (n - 1) * a + (n - 1) / n * np.asarray(seg.weight) / beta
    rs = (n - 1) * a + (n - 1) / n * np.asarray(seg.grad) / beta
    ar = 2 * rs
    flops = np.asarray(seg.flops, dtype=float)
    times = [
        flops * spf + sends,
        (flops + seg.recompute) * spf + sends,
        flops * spf + sends + 2 * ag + rs,
        (flops + seg.recompute) * spf + sends + 3 * ag + rs,
    ]
    ars = [ar, ar, 0 * ar, 0 * ar]
    best_score = np.full(np.shape(flops), INF)
    best_g, best_ar, best_mode = best_score.copy(), np.zeros_like(best_score), np.zeros(np.shape(flops), int)
    sharded = np.asarray(seg.state) / n + seg.max_weight
    weight_terms = (seg.state, seg.state, sharded, sharded)
    for mode in range(4 if n > 1 else 2):
        act = seg.act_ckpt if mode % 2 else seg.act_full
        fits = np.ones(np.shape(flops), bool)
        for d, share in zip(cl.devices, cl.shares, strict=True):
            fits &= (
                weight_terms[mode] + share * seq_len * np.asarray(act) + settings.overhead_bytes <= d.capacity
            )
        score = times[mode] + ars[mode] / max(settings.micro_batches - 1, 1)
        better = fits & (score < best_score)
        best_score = np.where(better, score, best_score)
        best_g = np.where(better, times[mode], best_g)
        best_ar = np.where(better, ars[mode], best_ar)
        best_mode = np.where(better, mode, best_mode)
    return best_g, best_ar, best_mode


def device_memory(cl: Cluster, seg: Segment, mode: int, settings: CostSettings, seq_len: int) -> list[float]:
    """Bytes each device of `cl` holds in `mode` (scalar segment)."""
    weights = seg.state if mode < 2 else seg.state / cl.n + seg.max_weight
    act = seg.act_ckpt if mode % 2 else seg.act_full
    return [float(weights + s * seq_len * act + settings.overhead_bytes) for s in cl.shares]


class Tables:
    """Prefix sums and range maxima over a profile's units: sums[x][i, j] covers units [i, j)."""

    def __init__(self, profile: ModelProfile) -> None:
        self.profile = profile
        units = profile.units
        self.n_units = len(units)
        self.grid = np.meshgrid(np.arange(self.n_units + 1), np.arange(self.n_units + 1), indexing="ij")
        self.layer_stash = [u.stash if u.kind == "layer" else 0.0 for u in units]
        cols = {
            "flops": [u.flops for u in units],
            "recompute": [u.recompute_flops if u.kind == "layer" else 0.0 for u in units],
            "state": [u.state_bytes for u in units],
            "weight": [u.weight_bytes for u in units],
            "grad": [u.grad_bytes for u in units],
            "stash": [u.stash for u in units],
            "ckpt": [u.ckpt_stash if u.kind == "layer" else u.stash for u in units],
        }
        self.sums = {}
        for key, col in cols.items():
            pre = np.concatenate([[0.0], np.cumsum(col)])
            self.sums[key] = pre[None, :] - pre[:, None]
        self.maxes = {
            "weight": self._range_max([u.weight_bytes for u in units]),
            "stash": self._range_max(self.layer_stash),
        }

    def _range_max(self, col: list[float]) -> np.ndarray:
        n = len(col)
        a = np.where(np.arange(n)[None, :] >= np.arange(n)[:, None], np.asarray(col)[None, :], 0.0)
        acc = np.maximum.accumulate(a, axis=1)
        out = np.zeros((n + 1, n + 1))
        out[:n, 1:] = acc
        return out

    def segment(self, ranges: list[tuple[object, object, int]]) -> Segment:
        """Sum over ranges (i, j, in_flight); i and j may be index arrays for a whole matrix."""
        s, mx = self.sums, self.maxes
        flops, recompute, state, weight, grad = (
            sum(s[k][i, j] for i, j, _ in ranges) for k in ("flops", "recompute", "state", "weight", "grad")
        )
        max_w = _max(mx["weight"][i, j] for i, j, _ in ranges)
        act_full = sum(f * s["stash"][i, j] for i, j, f in ranges)
        act_ckpt = sum(f * s["ckpt"][i, j] for i, j, f in ranges) + _max(
            mx["stash"][i, j] for i, j, _ in ranges
        )
        return Segment(flops, recompute, state, weight, grad, max_w, act_full, act_ckpt)


def _max(values) -> object:
    out = None
    for v in values:
        out = v if out is None else np.maximum(out, v)
    return out


@dataclass(frozen=True)
class Layout:
    """One replica's shape: clusters in pipeline order, the structure, and unit cut points.

    cuts[k] = (start, end) of the unit range on cluster k; the head (last unit) is on cluster 0
    in a U-shaped pipeline and is not in its range there.
    """

    clusters: tuple[Cluster, ...]
    structure: Structure
    cuts: tuple[tuple[int, int], ...]


def in_flight(structure: Structure, k_clusters: int, m: int) -> list[int]:
    """Micro-batches in flight per stage (stages in pipeline order) under 1F1B."""
    stages = k_clusters + 1 if structure == "U" else k_clusters
    return [min(stages - k, m) for k in range(stages)]


def sends_seconds(
    clusters: tuple[Cluster, ...], structure: Structure, net: Network, p2p_bytes: float
) -> list[float] | None:
    """Point-to-point seconds each cluster spends sending per micro-batch; None if a link is missing."""
    k = len(clusters)
    out = [0.0] * k
    if structure == "single":
        return out
    order = list(range(k)) + ([0] if structure == "U" else [])
    for s in range(len(order) - 1):
        link = net.link(clusters[order[s]].site, clusters[order[s + 1]].site)
        if link is None:
            return None
        t = link.p2p(p2p_bytes)
        out[order[s]] += t  # forward activations
        out[order[s + 1]] += t  # backward gradients
    return out


def cluster_ranges(layout: Layout, m: int, n_units: int) -> list[list[tuple[int, int, int]]]:
    """(start, end, in_flight) ranges each cluster hosts."""
    fl = in_flight(layout.structure, len(layout.clusters), m)
    out = [[(i, j, fl[k])] for k, (i, j) in enumerate(layout.cuts)]
    if layout.structure == "U":
        out[0].append((n_units - 1, n_units, fl[-1]))
    return out


@dataclass
class ReplicaCost:
    """Predicted figures of one replica; seconds, bytes, tokens per second."""

    step_s: float
    tokens_per_s: float
    bubble: float
    group_s: list[float]
    allreduce_s: list[float]
    modes: list[str]
    stage_s: list[float]
    device_memory: dict[str, float] = field(default_factory=dict)
    link_bytes: dict[str, float] = field(default_factory=dict)


def step_time(groups: list[float], allreduces: list[float], m: int) -> float:
    return sum(groups) + (m - 1) * max(groups) + max(allreduces)


def evaluate(layout: Layout, tables: Tables, net: Network, settings: CostSettings) -> ReplicaCost | None:
    """Exact figures of a layout; None when a device runs out of memory or a link is missing."""
    prof, m = tables.profile, settings.micro_batches
    p2p_bytes = prof.micro_batch * prof.seq_len * prof.activation_bytes
    sends = sends_seconds(layout.clusters, layout.structure, net, p2p_bytes)
    if sends is None:
        return None
    groups, ars, modes, stage_s = [], [], [], []
    memory: dict[str, float] = {}
    link_bytes: dict[str, float] = {}
    for cl, ranges, snd in zip(
        layout.clusters, cluster_ranges(layout, m, tables.n_units), sends, strict=True
    ):
        seg = tables.segment(ranges)
        g, ar, mode = (x.item() for x in group_cost(cl, seg, snd, settings, prof.seq_len))
        if g == INF:
            return None
        groups.append(g)
        ars.append(ar)
        modes.append(MODES[mode])
        memory.update(
            zip((d.id for d in cl.devices), device_memory(cl, seg, mode, settings, prof.seq_len), strict=True)
        )
        if cl.n > 1:
            # Bytes all devices of the cluster send per step on the site network (ring collectives).
            per_step = 2 * seg.grad if mode < 2 else m * (seg.weight * (2 if mode == 2 else 3) + seg.grad)
            key = f"{cl.site} (inside cluster)"
            link_bytes[key] = link_bytes.get(key, 0.0) + float(per_step) * (cl.n - 1)
        stage_s.extend(_split_stage_seconds(cl, ranges, tables, g))
    if layout.structure == "U":
        stage_s = [stage_s[0], *stage_s[2:], stage_s[1]]
    order = list(range(len(layout.clusters))) + ([0] if layout.structure == "U" else [])
    for a, b in itertools.pairwise(order):
        sa, sb = sorted((layout.clusters[a].site, layout.clusters[b].site))
        key = f"{sa} <-> {sb}"
        link_bytes[key] = link_bytes.get(key, 0.0) + 2 * m * p2p_bytes
    step = step_time(groups, ars, m)
    pipe = sum(groups) + (m - 1) * max(groups)
    tokens = m * prof.micro_batch * prof.seq_len
    return ReplicaCost(
        step, tokens / step, 1 - m * max(groups) / pipe, groups, ars, modes, stage_s, memory, link_bytes
    )


def _split_stage_seconds(cl: Cluster, ranges, tables: Tables, group_s: float) -> list[float]:
    """Split a cluster's time over its stages in proportion to their FLOPs."""
    if len(ranges) == 1:
        return [group_s]
    f = [float(tables.sums["flops"][i, j]) for i, j, _ in ranges]
    total = sum(f) or 1.0
    return [group_s * x / total for x in f]
