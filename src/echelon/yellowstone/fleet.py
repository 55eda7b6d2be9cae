"""Fleet files: boundaries, ordered access tiers, sites and links, and the devices to plan over.

A fleet file is YAML validated by these pydantic models (unknown fields are refused). Units:
memory in GiB (`memory_gib`) or bytes (`memory_bytes`), achieved compute in TFLOP/s (the dense
matmul rate the device really sustains in the training dtype), bandwidth in Gbit/s, latency in
milliseconds. `access_tiers` are ordered from least to most cleared: a device may touch raw data
of its boundary only when its tier is at or above the boundary's `data_tier`.

Example (see examples/fleets/ for whole files):

    name: lab
    access_tiers: [public, internal, restricted]
    boundaries: [{id: lab, data_tier: restricted}]
    sites: [{id: rack, bandwidth_gbps: 100, latency_ms: 0.01}]
    links: []
    devices:
      - {id: gpu0, boundary: lab, site: rack, memory_gib: 24, tflops: 80, access_tier: restricted}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from echelon.errors import ConfigError
from echelon.yamlio import load_model

GIB = 1024**3
Name = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _within(low: float, high: float, unit: str, hint: str) -> AfterValidator:
    """Refuse values outside [low, high] (the physically plausible range) with the reason."""

    def check(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(f"{value:g} {unit} is not plausible: {hint}")
        return value

    return AfterValidator(check)


def _some(what: str) -> AfterValidator:
    """At least one entry; checked after the entries themselves, so a bad entry is reported alone."""

    def check(value: tuple) -> tuple:
        if not value:
            raise ValueError(f"at least one {what} is needed")
        return value

    return AfterValidator(check)


# Every number is finite (YAML's .inf and .nan are refused) and within what a real device or link has.
Bandwidth = Annotated[
    float,
    Field(gt=0, allow_inf_nan=False),
    _within(1e-6, 1e6, "Gbit/s", "bandwidth_gbps is in Gbit/s, from 1 kbit/s to 1 Pbit/s"),
]
Latency = Annotated[
    float,
    Field(ge=0, allow_inf_nan=False),
    _within(0, 600_000, "ms", "latency_ms is in milliseconds, at most 10 minutes"),
]
MemoryGiB = Annotated[
    float,
    Field(gt=0, allow_inf_nan=False),
    _within(1 / 1024, 65_536, "GiB", "memory_gib is in GiB (1 MiB to 64 TiB)"),
]
MemoryBytes = Annotated[
    int, Field(gt=0), _within(2**20, 2**46, "bytes", "memory_bytes is in bytes (1 MiB to 64 TiB)")
]
TFlops = Annotated[
    float,
    Field(gt=0, allow_inf_nan=False, description="achieved dense TFLOP/s in the training dtype"),
    _within(1e-6, 1e5, "TFLOP/s", "tflops is one device's achieved TFLOP/s, from 1 MFLOP/s to 100 PFLOP/s"),
]
Seconds = Annotated[
    float,
    Field(gt=0, allow_inf_nan=False),
    _within(1e-9, 1e6, "s", "step_s is in seconds, at most about 11 days"),
]

RingSize = Annotated[int, Field(ge=2, le=2**20, description="processes a measurement was sharded over")]
RingSeconds = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
StageSeconds = Annotated[float, Field(ge=0, le=60, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BoundaryEntry(_Strict):
    """An administrative boundary; `data_tier` is the access tier its raw data requires."""

    id: str = Name
    data_tier: str


class LinkSpec(_Strict):
    """A network path: bandwidth in Gbit/s and one-way latency in milliseconds."""

    bandwidth_gbps: Bandwidth
    latency_ms: Latency = 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1000


class SiteEntry(LinkSpec):
    """A place whose devices share a fast local network (the bandwidth and latency given)."""

    id: str = Name


class LinkEntry(LinkSpec):
    """A link between two sites."""

    sites: tuple[str, str]


class MeasuredStep(_Strict):
    """One measured training step on this device alone: calibrates its achieved compute.

    `model` is a preset name (llama-1b, ...) or the name of the profile being planned; the step
    trained `micro_batches` micro-batches of `micro_batch` sequences of `seq_len` tokens (gradients
    accumulated, then one optimizer step) in `step_s` seconds, of which the optimizer update took
    `update_s` (`echelon profile` times it; without it the update is spread over the step's tokens,
    which prices a device that holds all the parameters but trains a part of the batch too low).
    `fsdp_s`: what FSDP2 added to a micro-batch's forward and backward of one decoder layer, by the
    number of processes it was sharded over (`echelon profile --ranks N`, N >= 2, times 2 and N;
    without it FSDP is priced from the site's latency and bandwidth).
    `ddp_s`: what DDP added to a step's backward that reduces the gradients of one decoder layer
    (the all-reduce, DDP's copies, the wait for the slower rank), by ring size (as `fsdp_s`;
    without it DDP is priced from the site's latency and bandwidth).
    `stage_s`: what `torch.distributed.pipelining` added to a stage's forward and backward of a
    micro-batch beyond its hand-offs (`echelon profile --ranks N`, N >= 2; without it nothing).
    """

    model: str
    trainable: Literal["lora", "full"] = "lora"
    seq_len: int = Field(ge=1, le=2**24)
    micro_batch: int = Field(ge=1, le=2**16)
    micro_batches: int = Field(1, ge=1, le=2**16)
    step_s: Seconds
    update_s: Seconds | None = None
    fsdp_s: dict[RingSize, RingSeconds] | None = None
    ddp_s: dict[RingSize, RingSeconds] | None = None
    stage_s: StageSeconds | None = None

    @model_validator(mode="after")
    def _update_within_step(self) -> MeasuredStep:
        if self.update_s is not None and self.update_s >= self.step_s:
            raise ValueError(f"update_s ({self.update_s} s) is part of step_s ({self.step_s} s): give less")
        return self


class DeviceEntry(_Strict):
    """One accelerator or CPU: where it is, how much it holds and computes, what it may see."""

    id: str = Name
    boundary: str
    site: str
    memory_gib: MemoryGiB | None = None
    memory_bytes: MemoryBytes | None = None
    tflops: TFlops
    access_tier: str
    reliability: float = Field(
        0.99, gt=0, le=1, allow_inf_nan=False, description="probability it stays up through a run"
    )
    measured_steps: tuple[MeasuredStep, ...] = ()

    @model_validator(mode="after")
    def _one_memory(self) -> DeviceEntry:
        if (self.memory_gib is None) == (self.memory_bytes is None):
            raise ValueError("give exactly one of memory_gib or memory_bytes")
        return self

    @property
    def memory(self) -> float:
        """Memory in bytes."""
        return float(self.memory_bytes) if self.memory_bytes is not None else self.memory_gib * GIB

    @property
    def flops(self) -> float:
        """Achieved compute in FLOP/s."""
        return self.tflops * 1e12


class Fleet(_Strict):
    """The whole fleet. Cross-references are checked by `check_references` (see `load_fleet`)."""

    name: str = Name
    access_tiers: Annotated[tuple[str, ...], _some("access tier")]
    boundaries: Annotated[tuple[BoundaryEntry, ...], _some("boundary")]
    sites: Annotated[tuple[SiteEntry, ...], _some("site")]
    links: tuple[LinkEntry, ...] = ()
    default_link: LinkSpec | None = Field(None, description="for site pairs without a link entry")
    devices: Annotated[tuple[DeviceEntry, ...], _some("device")]

    def tier_rank(self, tier: str) -> int:
        return self.access_tiers.index(tier)

    def cleared(self, device: DeviceEntry) -> bool:
        """Whether `device` may touch its boundary's raw data."""
        boundary = next(b for b in self.boundaries if b.id == device.boundary)
        return self.tier_rank(device.access_tier) >= self.tier_rank(boundary.data_tier)

    def link(self, a: str, b: str) -> LinkSpec | None:
        """The path between sites a and b (a site's own network when a == b); None when unlinked."""
        if a == b:
            return next(s for s in self.sites if s.id == a)
        for entry in self.links:
            if set(entry.sites) == {a, b}:
                return entry
        return self.default_link


def check_references(fleet: Fleet) -> list[tuple[str, str]]:
    """(field, problem) pairs for unknown or duplicate names; empty when the fleet is consistent."""
    problems: list[tuple[str, str]] = []
    tiers, boundaries, sites = (
        set(fleet.access_tiers),
        {b.id for b in fleet.boundaries},
        {s.id for s in fleet.sites},
    )

    def dupes(kind: str, ids: list[str]) -> None:
        seen: set[str] = set()
        for i, x in enumerate(ids):
            if x in seen:
                problems.append((f"{kind}[{i}].id", f"{x!r} is used twice"))
            seen.add(x)

    def known(field: str, value: str, names: set[str], what: str, where: str) -> None:
        if value not in names:
            problems.append(
                (
                    field,
                    f"unknown {what} {value!r}; known: {', '.join(sorted(names))} (declare it under {where})",
                )
            )

    if len(tiers) != len(fleet.access_tiers):
        problems.append(("access_tiers", "a tier is listed twice"))
    dupes("boundaries", [b.id for b in fleet.boundaries])
    dupes("sites", [s.id for s in fleet.sites])
    dupes("devices", [d.id for d in fleet.devices])
    for i, b in enumerate(fleet.boundaries):
        known(f"boundaries[{i}].data_tier", b.data_tier, tiers, "access tier", "access_tiers")
    for i, link in enumerate(fleet.links):
        for s in link.sites:
            known(f"links[{i}].sites", s, sites, "site", "sites")
        if link.sites[0] == link.sites[1]:
            problems.append((f"links[{i}].sites", "a link joins two different sites"))
    for i, d in enumerate(fleet.devices):
        known(f"devices[{i}].boundary", d.boundary, boundaries, "boundary", "boundaries")
        known(f"devices[{i}].site", d.site, sites, "site", "sites")
        known(f"devices[{i}].access_tier", d.access_tier, tiers, "access tier", "access_tiers")
    return problems


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a fleet file; raise ConfigError naming the file, the field and the fix."""
    fleet = load_model(path, Fleet)
    problems = check_references(fleet)
    if problems:
        raise ConfigError(str(path), problems)
    return fleet
