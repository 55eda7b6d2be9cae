"""The cost model (ARCHITECTURE.md §5): time, memory and bytes of one pipeline replica.

A replica is an ordered list of clusters. Each cluster runs its stages data-parallel over its
devices with the micro-batch split proportional to speed (whole sequences, at least one each), so
its compute time per micro-batch is F x max_d(share_d x seq_len / speed_d). Parallelism per
cluster, chosen as the fastest that fits every device: DDP, DDP with activation checkpointing,
FSDP, FSDP with checkpointing (FSDP only on two or more devices).

- point to point between stages: alpha + bytes / beta over the route between the clusters' sites
  (`network`: summed latency, slowest hop, the share of it other replicas leave free), once
  forward (activations) and once backward (their gradients), charged to the sender; and where
  `echelon profile` timed it (`stage_s`, `stage_rates`), what the pipelining runtime adds to each
  stage's forward and backward of a micro-batch, charged to the cluster that runs the stage;
- ring all-reduce 2(n-1) alpha + 2(n-1)/n S/beta (DDP gradients, once per step; where `echelon
  profile` timed DDP on this model, `ddp_s` by ring size, `ddp_rates`, that measurement instead,
  scaled by the gradient bytes the cluster reduces, read off by ring size as FSDP's is); FSDP all-gathers
  the weights twice per micro-batch (checkpointing adds none: FSDP2 recomputes a layer inside its
  backward, while the layer is gathered; counted on gloo) and reduce-scatters the gradients once,
  each (n-1) alpha per FSDP unit (every decoder layer, and each stage's root) + (n-1)/n S/beta.
  Where `echelon profile` timed FSDP on this model (`fsdp_s` by ring size, `fsdp_rates`), a
  micro-batch is charged that measurement instead, scaled by the weight bytes the cluster holds
  (`ring_rate`: a ring size between or beyond those measured is read off the line through them in
  n - 1; one size measured, scaled by the ring's (n-1)/n): on CPU over gloo FSDP's collectives and
  copies cost several times what the link's latency and bandwidth say;
- memory per device, DDP: state + activations; FSDP: state / n + the largest unsharded unit +
  activations; plus a fixed runtime overhead, against `memory_headroom` of the device's memory;
  1F1B keeps min(S - k, m) micro-batches in flight on stage k of S;
- the loss head is budgeted as the executor runs it (`loss_bytes_per_token`): a stock
  `torch.nn.functional.cross_entropy` over logits upcast to float32;
- a cluster's time per micro-batch G is the sum of its stages (the first cluster of a U-shaped
  pipeline runs two: the input stage and the head); the step takes
  sum_k T_k + (m - 1) max_g G_g + max_g AR_g, and the bubble is 1 - m max_g G_g / pipeline time.

Calibration: `calibrate` turns measured step times in the fleet file into a per-device factor
eta = measured FLOP/s / declared FLOP/s; `CostSettings` holds the global knobs.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from echelon.errors import UserError
from echelon.yellowstone.fleet import GIB, Fleet
from echelon.yellowstone.model_profile import PRESETS, ModelProfile, Unit, build_profile
from echelon.yellowstone.network import Hop, Link, Network, SharedNetwork

AnyNetwork = Network | SharedNetwork

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
    update_s_per_param: float = 0.0  # the optimizer update's seconds per trainable parameter held
    fsdp_s_per_byte: tuple[
        tuple[int, float], ...
    ] = ()  # (ring size, FSDP's s per micro-batch per weight byte)
    ddp_s_per_byte: tuple[tuple[int, float], ...] = ()  # (ring size, DDP's s per step per gradient byte)
    stage_s: float = 0.0  # the pipelining runtime's seconds per stage and micro-batch


def loss_bytes_per_token(profile: ModelProfile) -> float:
    """Peak bytes per token of the loss head as the executor runs it.

    A stock `torch.nn.functional.cross_entropy` over logits upcast to float32 holds, per
    vocabulary entry, the logits in the training dtype, their float32 copy and its float32
    gradient: dtype + 4 + 4 bytes (10 in bf16, 12 in fp32, where the float32 log-softmax output
    takes the copy's place). A chunked loss would need less; the executor does not chunk.
    """
    return (profile.dtype_bytes + 4 + 4) * profile.shape.vocab


def modelled_units(profile: ModelProfile) -> tuple[Unit, ...]:
    """The profile's units with the head's activation budget as the loss runs (its input + loss)."""
    head = profile.activation_bytes + loss_bytes_per_token(profile)
    return tuple(
        dataclasses.replace(u, stash=head, ckpt_stash=head) if u.kind == "head" else u for u in profile.units
    )


def _measured(fleet: Fleet, profile: ModelProfile):
    """(device, measured step, the measured model's profile) for every measured step."""
    for i, d in enumerate(fleet.devices):
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
            yield d, m, p


def calibrate(fleet: Fleet, profile: ModelProfile) -> dict[str, float]:
    """eta per device id from its measured steps (1.0 without measurements).

    A measured step of `micro_batches` x `micro_batch` x `seq_len` tokens of a known model is worth
    that many tokens times the model's FLOPs per token; eta is the mean of (FLOPs / seconds) /
    declared FLOP/s, the seconds being the step's less its optimizer update where that was timed
    (`update_rates` prices the update). Where it was not, the update is spread over the step's
    micro-batches, so a step measured with the plan's shape calibrates that plan's steps exactly.
    """
    ratios: dict[str, list[float]] = {d.id: [] for d in fleet.devices}
    for d, m, p in _measured(fleet, profile):
        tokens = m.seq_len * m.micro_batch * m.micro_batches
        ratios[d.id].append(p.flops_per_token * tokens / (m.step_s - (m.update_s or 0.0)) / d.flops)
    return {k: float(np.mean(v)) if v else 1.0 for k, v in ratios.items()}


def update_rates(fleet: Fleet, profile: ModelProfile) -> dict[str, float]:
    """Seconds of optimizer update per trainable parameter, per device id whose measured steps
    timed the update (`update_s`): the mean over them. An update touches every parameter a device
    holds once per step, however little of the batch it trains."""
    rates: dict[str, list[float]] = {}
    for d, m, p in _measured(fleet, profile):
        if m.update_s is not None:
            rates.setdefault(d.id, []).append(m.update_s / sum(u.trainable for u in p.units))
    return {k: float(np.mean(v)) for k, v in rates.items()}


def _per_layer_rates(
    fleet: Fleet, profile: ModelProfile, field: str, per: str
) -> dict[str, tuple[tuple[int, float], ...]]:
    """A collective timed per decoder layer by ring size (the measured steps' `field`), as seconds
    per byte of a layer's `per` (a `Unit` bytes field), per device id that timed it: the mean over
    its measured steps at each size, sizes in order. A layer without such bytes gives no rate."""
    rates: dict[str, dict[int, list[float]]] = {}
    for d, m, p in _measured(fleet, profile):
        layer = next(getattr(u, per) for u in p.units if u.kind == "layer")
        for n, seconds in (getattr(m, field) or {}).items() if layer else ():
            rates.setdefault(d.id, {}).setdefault(n, []).append(seconds / layer)
    return {k: tuple((n, float(np.mean(v[n]))) for n in sorted(v)) for k, v in rates.items()}


def fsdp_rates(fleet: Fleet, profile: ModelProfile) -> dict[str, tuple[tuple[int, float], ...]]:
    """FSDP's seconds per micro-batch per weight byte sharded, by ring size, per device id whose
    measured steps timed FSDP (`fsdp_s`, per decoder layer by the processes it was sharded over)."""
    return _per_layer_rates(fleet, profile, "fsdp_s", "weight_bytes")


def ddp_rates(fleet: Fleet, profile: ModelProfile) -> dict[str, tuple[tuple[int, float], ...]]:
    """DDP's seconds per step per gradient byte reduced, by ring size, per device id whose measured
    steps timed DDP (`ddp_s`, per decoder layer by the processes it ran over). A model that trains
    no layer weights gives no rate."""
    return _per_layer_rates(fleet, profile, "ddp_s", "grad_bytes")


def stage_rates(fleet: Fleet) -> dict[str, float]:
    """The pipelining runtime's seconds per stage and micro-batch, per device id whose measured
    steps timed it (`stage_s`): the mean over them."""
    rates = {d.id: [m.stage_s for m in d.measured_steps if m.stage_s is not None] for d in fleet.devices}
    return {k: float(np.mean(v)) for k, v in rates.items() if v}


def rates(fleet: Fleet, profile: ModelProfile) -> tuple[dict, dict, dict, dict, dict]:
    """Everything the fleet's measured steps calibrate, per device id, in `devices_of`'s order:
    eta (`calibrate`), `update_rates`, `fsdp_rates`, `ddp_rates`, `stage_rates`."""
    return (
        calibrate(fleet, profile),
        update_rates(fleet, profile),
        fsdp_rates(fleet, profile),
        ddp_rates(fleet, profile),
        stage_rates(fleet),
    )


def ring_rate(points: tuple[tuple[int, float], ...], n: int) -> float:
    """A collective's seconds per byte on a ring of `n` from those measured by ring size
    (`fsdp_rates`, `ddp_rates`; 0.0 without any, or on one device: nothing to exchange): the
    measured size itself, else the line through the two nearest sizes in n - 1 (never below 0),
    else with one size the ring's (n-1)/n scaling."""
    if not points or n < 2:
        return 0.0
    known = dict(points)
    if n in known:
        return known[n]
    if len(points) == 1:
        ((m, rate),) = points
        return rate * ((n - 1) / n) / ((m - 1) / m)
    (a, ra), (b, rb) = sorted(points, key=lambda p: (abs(p[0] - n), p[0]))[:2]
    return max(ra + (rb - ra) * (n - a) / (b - a), 0.0)


def devices_of(
    fleet: Fleet,
    boundary: str,
    settings: CostSettings,
    eta: dict[str, float],
    update: dict[str, float] | None = None,
    fsdp: dict[str, tuple[tuple[int, float], ...]] | None = None,
    ddp: dict[str, tuple[tuple[int, float], ...]] | None = None,
    stage: dict[str, float] | None = None,
) -> list[Device]:
    """The boundary's devices in file order, with calibrated speed, usable memory and, where they
    were timed, the optimizer update's seconds per parameter (`update_rates`), FSDP's seconds per
    weight byte (`fsdp_rates`), DDP's per gradient byte (`ddp_rates`) and the pipelining runtime's
    seconds per stage (`stage_rates`)."""
    update, fsdp, ddp, stage = update or {}, fsdp or {}, ddp or {}, stage or {}
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
            update.get(d.id, 0.0),
            fsdp.get(d.id, ()),
            ddp.get(d.id, ()),
            stage.get(d.id, 0.0),
        )
        for d in fleet.devices
        if d.boundary == boundary
    ]


def split_shares(speeds: list[float], micro_batch: int, capacities: list[float] | None = None) -> list[int]:
    """Whole sequences per device, at least one each, minimising max(share / speed); sums to B.

    Ties (the same time either way) go to the device with fewer sequences so far, then to the one
    with more memory, so the split does not depend on the order the devices are listed in.
    """
    room = capacities or [0.0] * len(speeds)
    shares = [1] * len(speeds)
    heap = [(2 / s, 1, -room[i], i) for i, s in enumerate(speeds)]
    heapq.heapify(heap)
    for _ in range(micro_batch - len(speeds)):
        _, _, _, i = heapq.heappop(heap)
        shares[i] += 1
        heapq.heappush(heap, ((shares[i] + 1) / speeds[i], shares[i], -room[i], i))
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

    @functools.cached_property
    def key(self) -> tuple:
        """What sets the cluster's cost: device speeds, memory and measured rates, shares, the site
        network."""
        devices = tuple(
            (d.speed, d.capacity, d.update_s_per_param, d.fsdp_s_per_byte, d.ddp_s_per_byte, d.stage_s)
            for d in self.devices
        )
        return (devices, self.shares, self.lan)

    @property
    def n(self) -> int:
        return len(self.devices)


def make_cluster(devices: tuple[Device, ...], lan: Link, profile: ModelProfile) -> Cluster:
    shares = split_shares([d.speed for d in devices], profile.micro_batch, [d.capacity for d in devices])
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
    trainable: object = 0.0  # trainable parameters (the optimizer updates them once per step)
    fsdp_units: object = 0.0  # decoder layers and stage roots: FSDP gathers each on its own


@dataclass
class ModeCost:
    """One parallelism mode of a cluster: G seconds per micro-batch, AR seconds per step, bytes
    each device needs (scalars or arrays over candidate ranges, like the segment)."""

    mode: str
    g: np.ndarray
    ar: np.ndarray
    need: list[np.ndarray]

    def fits(self, cl: Cluster) -> np.ndarray | bool:
        out: np.ndarray | bool = True
        for d, need in zip(cl.devices, self.need, strict=True):
            out = out & (need <= d.capacity)
        return out


def mode_costs(
    cl: Cluster, seg: Segment, sends: float, settings: CostSettings, seq_len: int
) -> list[ModeCost]:
    """Time and memory of every parallelism mode the cluster can run (FSDP needs two devices).

    The per-step term (AR) holds the gradient all-reduce and the optimizer update: of every
    parameter of the stage under DDP, of a 1/n shard under FSDP. The all-reduce is the measured
    rate (`ddp_rates`, the slowest device's: the reduction waits for every rank) over the gradient
    bytes, or the ring formula (module docstring) where DDP was not timed."""
    n, a, beta = cl.n, cl.lan.alpha, cl.lan.beta
    spf = cl.seconds_per_flop
    if any(d.ddp_s_per_byte for d in cl.devices):
        ar = max(ring_rate(d.ddp_s_per_byte, n) for d in cl.devices) * seg.grad
    else:
        ar = 2 * ((n - 1) * a + (n - 1) / n * seg.grad / beta)
    fsdp = _fsdp_seconds(cl, seg)
    flops = seg.flops
    times = [
        flops * spf + sends,
        (flops + seg.recompute) * spf + sends,
        flops * spf + sends + fsdp,
        (flops + seg.recompute) * spf + sends + fsdp,
    ]
    update = seg.trainable * max(d.update_s_per_param for d in cl.devices)
    ars = [ar + update, ar + update, update / n, update / n]
    sharded = seg.state / n + seg.max_weight
    weights = (seg.state, seg.state, sharded, sharded)
    out = []
    for mode in range(4 if n > 1 else 2):
        act = seg.act_ckpt if mode % 2 else seg.act_full
        need = [weights[mode] + share * seq_len * act + settings.overhead_bytes for share in cl.shares]
        out.append(ModeCost(MODES[mode], times[mode] + 0 * flops, ars[mode] + 0 * flops, need))
    return out


def _fsdp_seconds(cl: Cluster, seg: Segment) -> object:
    """FSDP's collectives per micro-batch, with or without checkpointing (the same: FSDP2
    recomputes a layer inside its backward, while the layer is gathered): the measured rate
    (`fsdp_rates`, the slowest device's: a collective waits for every rank) over the weight bytes
    held, or the link's formula (module docstring) where FSDP was not timed."""
    n, a, beta = cl.n, cl.lan.alpha, cl.lan.beta
    if any(d.fsdp_s_per_byte for d in cl.devices):
        return max(ring_rate(d.fsdp_s_per_byte, n) for d in cl.devices) * seg.weight
    units = seg.fsdp_units
    ag = units * (n - 1) * a + (n - 1) / n * seg.weight / beta
    rs = units * (n - 1) * a + (n - 1) / n * seg.grad / beta
    return 2 * ag + rs


def group_cost(cl: Cluster, seg: Segment, sends: float, settings: CostSettings, seq_len: int):
    """(G seconds per micro-batch, AR seconds per step, mode index): the fastest mode that fits
    every device, AR spread over the step's other micro-batches; G is inf where nothing fits."""
    options = mode_costs(cl, seg, sends, settings, seq_len)
    spread = max(settings.micro_batches - 1, 1)
    if np.ndim(seg.flops) == 0:  # one range: plain floats are much faster than 0-d arrays
        mode = _fastest(cl, options, spread)
        return (INF, 0.0, 0) if mode is None else (float(options[mode].g), float(options[mode].ar), mode)
    shape = np.shape(seg.flops)
    best_score = np.full(shape, INF)
    best_g, best_ar, best_mode = best_score.copy(), np.zeros(shape), np.zeros(shape, int)
    for mode, mc in enumerate(options):
        score = mc.g + mc.ar / spread
        better = mc.fits(cl) & (score < best_score)
        best_score = np.where(better, score, best_score)
        best_g = np.where(better, mc.g, best_g)
        best_ar = np.where(better, mc.ar, best_ar)
        best_mode = np.where(better, mode, best_mode)
    return best_g, best_ar, best_mode


def _fastest(cl: Cluster, options: list[ModeCost], spread: int) -> int | None:
    """The mode (index) with the least G + AR / spread among those that fit one range; None if none fits."""
    fitting = [(float(mc.g + mc.ar / spread), mode) for mode, mc in enumerate(options) if mc.fits(cl)]
    return min(fitting)[1] if fitting else None


def device_memory(cl: Cluster, seg: Segment, mode: int, settings: CostSettings, seq_len: int) -> list[float]:
    """Bytes each device of `cl` holds in `mode` (scalar segment)."""
    return [float(x) for x in mode_costs(cl, seg, 0.0, settings, seq_len)[mode].need]


class Tables:
    """Prefix sums and range maxima over a profile's units: sums[x][i, j] covers units [i, j)."""

    def __init__(self, profile: ModelProfile) -> None:
        self.profile = profile
        self.units = units = modelled_units(profile)
        self.n_units = len(units)
        self.grid = np.meshgrid(np.arange(self.n_units + 1), np.arange(self.n_units + 1), indexing="ij")
        self.layer_stash = [u.stash if u.kind == "layer" else 0.0 for u in units]
        cols = {
            "flops": [u.flops for u in units],
            "recompute": [u.recompute_flops if u.kind == "layer" else 0.0 for u in units],
            "state": [u.state_bytes for u in units],
            "weight": [u.weight_bytes for u in units],
            "grad": [u.grad_bytes for u in units],
            "trainable": [float(u.trainable) for u in units],
            "layers": [1.0 if u.kind == "layer" else 0.0 for u in units],
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
        self.grid_segments: dict[tuple, tuple[np.ndarray, Segment]] = {}  # see partition._grid
        # the same tables as nested lists of floats: one range at a time is much faster so
        self.lists = {k: _Rows(v.tolist()) for k, v in self.sums.items()}
        self.list_maxes = {k: _Rows(v.tolist()) for k, v in self.maxes.items()}
        self._scalar: dict[tuple, Segment] = {}

    def _range_max(self, col: list[float]) -> np.ndarray:
        n = len(col)
        a = np.where(np.arange(n)[None, :] >= np.arange(n)[:, None], np.asarray(col)[None, :], 0.0)
        acc = np.maximum.accumulate(a, axis=1)
        out = np.zeros((n + 1, n + 1))
        out[:n, 1:] = acc
        return out

    def segment(self, ranges: list[tuple[object, object, int]]) -> Segment:
        """Sum over ranges (i, j, in_flight); i and j may be index arrays for a whole matrix."""
        if all(isinstance(i, int) and isinstance(j, int) for i, j, _ in ranges):
            key = tuple(ranges)
            if key not in self._scalar:
                self._scalar[key] = self._segment(ranges, scalar=True)
            return self._scalar[key]
        return self._segment(ranges)

    def _segment(self, ranges, scalar: bool = False) -> Segment:
        s, mx = (self.lists, self.list_maxes) if scalar else (self.sums, self.maxes)
        flops, recompute, state, weight, grad, trainable, layers = (
            sum(s[k][i, j] for i, j, _ in ranges)
            for k in ("flops", "recompute", "state", "weight", "grad", "trainable", "layers")
        )
        max_w = _max(mx["weight"][i, j] for i, j, _ in ranges)
        act_full = sum(f * s["stash"][i, j] for i, j, f in ranges)
        act_ckpt = sum(f * s["ckpt"][i, j] for i, j, f in ranges) + _max(
            mx["stash"][i, j] for i, j, _ in ranges
        )
        units = layers + len(ranges)  # each range is a stage whose root FSDP wraps too
        return Segment(flops, recompute, state, weight, grad, max_w, act_full, act_ckpt, trainable, units)


class _Rows:
    """A nested list indexed like a 2-D array: rows[i, j]."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = rows

    def __getitem__(self, ij: tuple[int, int]) -> float:
        return self.rows[ij[0]][ij[1]]


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


def pipeline_seconds(
    clusters: tuple[Cluster, ...], structure: Structure, net: AnyNetwork, p2p_bytes: float
) -> list[float] | None:
    """Seconds each cluster spends per micro-batch on the pipeline around its compute: sending
    activations and gradients, and the pipelining runtime's work for each stage it runs (its
    slowest device's `stage_s`; a stage's members wait for their head). None if a link is missing."""
    k = len(clusters)
    out = [0.0] * k
    if structure == "single":
        return out
    order = list(range(k)) + ([0] if structure == "U" else [])
    for c in order:
        out[c] += max(d.stage_s for d in clusters[c].devices)
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


def stage_sites(layout: Layout) -> list[str]:
    """The site of each pipeline stage, in order (a U-shaped replica ends on cluster 0 again)."""
    sites = [c.site for c in layout.clusters]
    return sites + sites[:1] if layout.structure == "U" else sites


def hop_bytes(layout: Layout, net: AnyNetwork, p2p_bytes: float, m: int) -> dict[Hop, float]:
    """Bytes per step one replica sends each way over each physical link its stage edges cross."""
    out: dict[Hop, float] = {}
    sites = stage_sites(layout)
    for a, b in itertools.pairwise(sites):
        for h in net.hops(a, b):
            out[h] = out.get(h, 0.0) + m * p2p_bytes
    return out


def evaluate(
    layout: Layout,
    tables: Tables,
    net: AnyNetwork,
    settings: CostSettings,
    given: Sequence[str] | None = None,
) -> ReplicaCost | None:
    """Exact figures of a layout; None when a device runs out of memory or a link is missing.
    `given`: each cluster's parallelism (one of MODES), else the fastest that fits."""
    prof, m = tables.profile, settings.micro_batches
    p2p_bytes = prof.micro_batch * prof.seq_len * prof.activation_bytes
    sends = pipeline_seconds(layout.clusters, layout.structure, net, p2p_bytes)
    if sends is None:
        return None
    groups, ars, modes, stage_s = [], [], [], []
    memory: dict[str, float] = {}
    link_bytes: dict[str, float] = {}
    for cl, ranges, snd in zip(
        layout.clusters, cluster_ranges(layout, m, tables.n_units), sends, strict=True
    ):
        seg = tables.segment(ranges)
        options = mode_costs(cl, seg, snd, settings, prof.seq_len)
        if given is None:
            mode = _fastest(cl, options, max(m - 1, 1))
        else:
            mode = MODES.index(given[len(groups)])
            if mode >= len(options) or not np.all(options[mode].fits(cl)):
                mode = None
        if mode is None:
            return None
        g, ar = float(options[mode].g), float(options[mode].ar)
        groups.append(g)
        ars.append(ar)
        modes.append(MODES[mode])
        memory.update(zip((d.id for d in cl.devices), (float(x) for x in options[mode].need), strict=True))
        if cl.n > 1:
            # Bytes all devices of the cluster send per step on the site network (ring collectives).
            per_step = 2 * seg.grad if mode < 2 else m * (2 * seg.weight + seg.grad)
            key = f"{cl.site} (inside cluster)"
            link_bytes[key] = link_bytes.get(key, 0.0) + float(per_step) * (cl.n - 1)
        stage_s.extend(_split_stage_seconds(cl, ranges, tables, g))
    if layout.structure == "U":
        stage_s = [stage_s[0], *stage_s[2:], stage_s[1]]
    for (a, b), nbytes in hop_bytes(layout, net, p2p_bytes, m).items():
        link_bytes[f"{a} <-> {b}"] = 2 * nbytes  # both ways: activations and their gradients
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
