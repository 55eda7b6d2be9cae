"""plan.json: the versioned training plan an executor consumes (schema_version 2).

Layout, top down:
- `boundaries[]`: planned independently; nothing in a boundary's plan refers to another boundary.
  Boundaries meet only through Echelon aggregates.
- `boundaries[].replicas[]`: independent pipeline replicas inside the boundary. Each trains on its
  own data shard and is one training member of the boundary plane (its updates are aggregated by
  the boundary, not all-reduced per step).
- `replicas[].clusters[]`: devices of one site running the same stages data-parallel
  (`parallelism`: DDP or FSDP, `+ckpt` = activation checkpointing). `shares[i]` is how many of the
  `micro_batch` sequences of each micro-batch `devices[i]` computes; `head` coordinates the cluster.
- `replicas[].stages[]`: pipeline stages in order; `units` = [start, end) indices into
  `model.units` (0 = embedding, 1..L = decoder layers, L+1 = head with final norm and loss). In a
  U-shaped replica the last stage (the head) runs on cluster 0 again. Schedule: 1F1B over
  `micro_batches` micro-batches per step.
- `replicas[].edges[]`: point-to-point transfers between consecutive stages, over `route` (the
  sites crossed; `bandwidth_gbps` is its slowest hop, `shared_gbps` what is left of it on average
  once the other replicas crossing the same links take their share).
- `boundaries[].backups[]`: what to do when a device fails: switch to a `standby` device (at its
  site or, where a route allows, another site), `shrink` its cluster, run a `replan`, or
  `drop_replica`. Every entry but `drop_replica` carries its whole `replacement` replica (devices,
  layer split, parallelism, predicted throughput), checked like the primary plan. `fallback` is
  what to do when the standby is already taken by an earlier failure; `then` covers a second
  failure of a head or raw-data device of the replacement (two-failure coverage).
- `refused[]`: boundaries that could not be planned, with the reason; the others are planned.
- `checks[]`: constraint checks (memory, access tier, boundary, stage order, backups) re-derived
  from this file.
Units: seconds, bytes, tokens per second; bandwidth in Gbit/s and latency in milliseconds.
`Plan.model_json_schema()` is the machine-readable schema (written as plan.schema.json by the CLI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from echelon.errors import UserError
from echelon.rundir import write_atomic
from echelon.yamlio import validation_problems

SCHEMA_VERSION = 2

Parallelism = Literal["DDP", "DDP+ckpt", "FSDP", "FSDP+ckpt"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class UnitInfo(_Model):
    name: str
    kind: Literal["embed", "layer", "head"]
    params: int
    trainable: int
    flops_per_token: float
    stash_bytes_per_token: float
    raw_data: bool


class ModelInfo(_Model):
    name: str
    source: str  # what the executor builds: a preset name or an absolute checkpoint directory
    trainable: Literal["lora", "full"]
    dtype: str
    seq_len: int
    micro_batch: int
    lora_rank: int
    hidden: int
    layers: int
    vocab: int
    units: list[UnitInfo]


class ClusterPlan(_Model):
    id: str
    site: str
    devices: list[str]
    shares: list[int]
    head: str
    parallelism: Parallelism
    raw_data: bool
    memory_bytes: dict[str, float]
    capacity_bytes: dict[str, float]


class StagePlan(_Model):
    index: int
    cluster: str
    units: tuple[int, int]
    label: str
    in_flight: int
    raw_data: bool
    seconds_per_micro_batch: float


class EdgePlan(_Model):
    src_stage: int
    dst_stage: int
    src_site: str
    dst_site: str
    bandwidth_gbps: float
    latency_ms: float
    bytes_per_micro_batch: float
    route: list[str]
    shared_gbps: float


class Predicted(_Model):
    step_s: float
    tokens_per_s: float
    tokens_per_step: int
    bubble_fraction: float
    link_bytes_per_step: dict[str, float]


class ReplicaPlan(_Model):
    id: str
    structure: Literal["single", "U", "linear"]
    schedule: Literal["1F1B"] = "1F1B"
    micro_batch: int
    micro_batches: int
    clusters: list[ClusterPlan]
    stages: list[StagePlan]
    edges: list[EdgePlan]
    predicted: Predicted


class Backup(_Model):
    device: str
    kind: Literal["standby", "shrink", "replan", "drop_replica"]
    replica: str
    standby: str | None = None
    replacement: ReplicaPlan | None = None
    tokens_per_s_after: float
    fallback: Backup | None = None
    then: list[Backup] = []


class BoundaryPlan(_Model):
    id: str
    data_tier: str
    replicas: list[ReplicaPlan]
    standby: list[str]
    backups: list[Backup]
    tokens_per_s: float


class Refusal(_Model):
    boundary: str
    reason: str
    message: str


class Check(_Model):
    name: str
    ok: bool
    detail: str


class Settings(_Model):
    micro_batches: int
    memory_headroom: float
    overhead_bytes: float
    calibration: dict[str, float]


class Plan(_Model):
    schema_version: Literal[2] = SCHEMA_VERSION
    fleet: str
    model: ModelInfo
    settings: Settings
    boundaries: list[BoundaryPlan]
    refused: list[Refusal] = []
    tokens_per_s: float
    checks: list[Check]
    explain: list[str]


def write_plan(plan: Plan, path: Path) -> None:
    """Write plan.json atomically."""
    write_atomic(path, plan.model_dump_json(indent=2) + "\n")


def read_plan(path: Path) -> Plan:
    """Read plan.json; a wrong schema version or a malformed file is a UserError."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read the plan: {e}") from None
    try:
        version = json.loads(text).get("schema_version")
    except (json.JSONDecodeError, AttributeError):
        version = None
    if version is not None and version != SCHEMA_VERSION:
        raise UserError(
            f"{path}: schema_version {version!r}, but this Echelon reads schema_version {SCHEMA_VERSION} "
            "plans; re-run `echelon plan` on the fleet file to write one"
        )
    try:
        return Plan.model_validate_json(text)
    except ValidationError as e:
        problems = "; ".join(f"{f}: {m}" for f, m in validation_problems(e))
        raise UserError(f"{path}: not a schema_version {SCHEMA_VERSION} plan: {problems}") from None
