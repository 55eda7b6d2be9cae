"""Typed run files: what to train, on which data, across which boundaries and devices.

A run file is YAML validated by these pydantic models; unknown fields are refused, so a typo is
an error rather than a silently ignored knob. Defaults follow ARCHITECTURE.md §2.
Relative paths in a run file are resolved against the file's own directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from echelon.strategies import STRATEGIES, get_strategy
from echelon.yamlio import load_model

Identifier = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Strict(BaseModel):
    """Every configuration model: unknown fields refused, immutable, and every float finite (YAML's
    `.inf` and `.nan` pass float parsing, then break the config digest and the arithmetic)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def resolve_path(path: Path | None, info: ValidationInfo) -> Path | None:
    """A validator's path, relative to the run file's directory (pydantic context `base_dir`)."""
    if path is None or path.is_absolute():
        return path
    base = (info.context or {}).get("base_dir")
    return (Path(base) / path).resolve() if base else path


class LoraSettings(Strict):
    """LoRA adapters (peft). Paper defaults: q_proj and v_proj, dropout 0.2."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


class ModelConfig(Strict):
    """The built-in `tiny` Llama preset, or a local Hugging Face checkpoint directory (`path`)."""

    preset: Literal["tiny"] | None = None
    path: Path | None = None
    trainable: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()

    _resolve_path = field_validator("path")(resolve_path)

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: object) -> object:
        if isinstance(data, dict):
            if data.get("preset") is not None and data.get("path") is not None:
                raise ValueError("give either `preset` or `path`, not both")
            if data.get("path") is None and data.get("preset") is None:
                return {**data, "preset": "tiny"}
        return data


class PartitionConfig(Strict):
    """How training sequences are spread over devices: IID, or Dirichlet(alpha) over domains."""

    kind: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)


class DataConfig(Strict):
    """Text to train on: the Python standard library's sources (built in), JSONL, .txt files, or a
    Hugging Face `datasets` dataset from local files (a saved dataset directory, JSONL or parquet)."""

    source: Literal["stdlib", "jsonl", "text_dir", "hf_dataset"] = "stdlib"
    path: Path | None = None
    text_field: str = "text"
    domain_field: str | None = "domain"
    seq_len: int = Field(128, ge=8, le=8192)
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    max_documents: int | None = Field(None, ge=2)
    partition: PartitionConfig = PartitionConfig()

    _resolve_path = field_validator("path")(resolve_path)

    @model_validator(mode="after")
    def _path_matches_source(self) -> DataConfig:
        if self.source == "stdlib" and self.path is not None:
            raise ValueError("`path` is only for sources jsonl, text_dir and hf_dataset")
        if self.source != "stdlib" and self.path is None:
            raise ValueError(f"source {self.source} needs `path`")
        return self


class TrainConfig(Strict):
    """The device plane's local optimisation: K inner AdamW steps per local round."""

    inner_steps: int = Field(8, ge=1, description="K, AdamW steps per local round")
    micro_batch: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(
        None, gt=0, description="clip each inner step's gradient to this global L2 norm; null: off"
    )
    warmup_steps: int = Field(0, ge=0, description="inner steps of linear warmup, counted per device")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warmup: constant, or cosine decay to min_lr_ratio * lr"
    )
    decay_steps: int | None = Field(
        None, ge=1, description="cosine: inner steps per device to decay over; null: from budget.tokens"
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: the floor, as a fraction of lr")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16: autocast the forward pass where the device supports it"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, more compute)"
    )


class OuterConfig(Strict):
    """The global plane's outer optimizer: SGD with Nesterov momentum (lr 1, momentum 0 = averaging)."""

    lr: float = Field(0.7, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True


class SyncConfig(Strict):
    """Outer synchronisation cadence: a fixed interval H (Echelon) or drift-aware (Echelon-DA; the
    strategy decides which). Drift-aware: H_b = h_min + round((h_max - h_min) * (1 - sigmoid(kappa *
    (D_b - D_0,b)))) with the scale-free drift D_b (see echelon.planes.controller)."""

    interval: int = Field(8, ge=1, description="H in middle steps (fixed cadence, and before calibration)")
    h_min: int = Field(8, ge=1)
    h_max: int = Field(100, ge=1)
    kappa: float = Field(2.4, gt=0)
    d0: float | None = Field(
        None, ge=0, description="drift midpoint D_0 for every boundary; null: each calibrates its own"
    )
    drift_ema: float = Field(0.9, ge=0, lt=1, description="beta of the drift proxy EMA")
    overlap: bool = Field(True, description="boundaries keep training while a sync is in flight")
    timeout_s: float = Field(600.0, gt=0, description="an outer step proceeds without boundaries this late")

    @model_validator(mode="after")
    def _range(self) -> SyncConfig:
        if self.h_min > self.h_max:
            raise ValueError(f"h_min ({self.h_min}) must not exceed h_max ({self.h_max})")
        return self


class SecAggConfig(Strict):
    """SecAgg+ inside each boundary (ARCHITECTURE.md §4). Each coordinate of a weighted delta is
    encoded in [-clip, clip] (echelon.clip) at scale 2^scale_bits; decoding error per coordinate
    is at most n / 2^(scale_bits + 1) for n contributors."""

    threshold: float = Field(0.5, gt=0, le=1, description="Shamir t as a fraction of a neighbourhood")
    degree: int | None = Field(None, ge=2, description="neighbour degree k; null: the complete graph")
    scale_bits: int = Field(20, ge=1, le=40, description="fixed-point scale 2^scale_bits")
    bits: Literal[32, 64] | None = Field(None, description="ring Z_(2^bits); null picks from the headroom")
    stage_timeout_s: float = Field(30.0, gt=0, description="deadline of each protocol stage")
    malicious_server: bool | None = Field(
        None,
        description="defences against a malicious server (signed keys, a consistency round, t > n/2); "
        "null: on in a deployment, off in simulation",
    )
    outer_clip: float | None = Field(
        None,
        gt=0,
        description="+SA: the range (and L2 bound) of a boundary's weighted Delta_b in the outer round; "
        "null: echelon.clip x middle_lr x the largest outer interval",
    )


class StreamingConfig(Strict):
    """Streaming DiLoCo (Douillard et al. 2025): one of `fragments` parameter fragments per outer
    step, round robin; a boundary applies a fragment's reference `overlap_steps` middle steps
    after sending (tau), mixing it with its own: (1 - mixing) * global + mixing * local (alpha)."""

    fragments: int = Field(1, ge=1, description="P; 1: the whole model every outer step")
    overlap_steps: int = Field(0, ge=0, description="tau, middle steps a sync overlaps with training")
    mixing: float = Field(0.0, ge=0, lt=1, description="alpha, weight of the local fragment when merging")
    pseudo_gradient_dtype: Literal["float32", "bfloat16"] = Field("float32", description="low-bit Delta_b")


class PrivacyConfig(Strict):
    """Longitudinal-leakage mitigations (paper §4.3, §8.6; docs/fidelity.md), safe by default.

    membership_window: a boundary's cohort (the devices its aggregates may include) changes only
        every that many middle steps; devices that join or rejoin wait for the next edge.
    shuffle: pick participants from the buffer at random (seeded) rather than first come first served.
    status_counts: what crosses of who contributed: `exact` counts; `coarse`, every count rounded
        down to a multiple of count_bucket (never below min_quorum) and token counts to multiples
        of count_bucket local rounds; `suppressed`, only the quorum floor min_quorum, and token
        counts in multiples of a round of every device of the boundary.
    """

    membership_window: int | None = Field(8, ge=1, description="middle steps per fixed-membership window")
    shuffle: bool = True
    status_counts: Literal["exact", "coarse", "suppressed"] = "suppressed"
    count_bucket: int = Field(2, ge=1, description="coarse: counts are rounded down to multiples of this")


class EchelonConfig(Strict):
    """Boundary-plane knobs (ARCHITECTURE.md §2)."""

    proximal_mu: float = Field(0.01, ge=0, description="mu of the proximal term; 0 disables")
    reference_ema: float | None = Field(None, ge=0, lt=1, description="beta_ref: anchor to an EMA of theta_b")
    clip: float | None = Field(1.0, gt=0, description="C, L2 clip of each device delta; null disables")
    buffer_size: Annotated[int, Field(ge=1)] | Literal["boundary"] = Field(
        2, description="K_buf; `boundary`: every middle step aggregates the boundary's whole cohort"
    )
    buffer_timeout_s: float = Field(30.0, gt=0, description="tau, seconds after the first arrival")
    participation_window: int = Field(4, ge=1, description="W, middle steps")
    staleness: Literal["age", "version_lag"] = Field(
        "age",
        description="s: middle steps since the device last participated (the paper's), or the version lag",
    )
    staleness_exponent: float = Field(0.5, ge=0, description="a in w = (1 + s)^-a")
    max_staleness: int | None = Field(None, ge=0, description="s_max: staler updates are dropped; null: off")
    alignment_gate: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="a device submits only if cos(delta_i, the boundary's recent direction) >= this; null: off",
    )
    middle_lr: float = Field(1.0, gt=0, description="eta_mid")
    aggregation: Literal["plain", "secagg"] = Field(
        "secagg", description="secagg: the coordinator learns only the sum; plain: a simulation baseline"
    )
    secagg: SecAggConfig = SecAggConfig()
    streaming: StreamingConfig = StreamingConfig()
    min_quorum: int = Field(
        2, ge=1, description="fewest contributors an aggregate may have (1 lets one device's update cross)"
    )
    aggregation_timeout_s: float = Field(60.0, gt=0)
    outer: OuterConfig = OuterConfig()
    sync: SyncConfig = SyncConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _quorum_reachable(self) -> EchelonConfig:
        if self.buffer_size != "boundary" and self.buffer_size < self.min_quorum:
            raise ValueError(
                f"buffer_size ({self.buffer_size}) is below min_quorum ({self.min_quorum}): no middle step "
                "could ever cross; raise buffer_size or lower min_quorum"
            )
        if self.aggregation == "secagg" and self.clip is None:
            raise ValueError(
                "secure aggregation encodes each coordinate in [-clip, clip]: set echelon.clip, or use "
                "echelon.aggregation: plain"
            )
        return self


class BurstyConfig(Strict):
    """Gilbert-Elliott bursts: each message may switch the link between a good and a bad state."""

    p_enter: float = Field(0.05, ge=0, le=1)
    p_exit: float = Field(0.3, gt=0, le=1)
    latency_factor: float = Field(5.0, ge=1)


class LinkConfig(Strict):
    """One network link: median latency with +/- jitter (percent of the median), bandwidth."""

    latency_ms: float = Field(0.0, ge=0)
    jitter_pct: float = Field(0.0, ge=0, le=100)
    bandwidth_mbps: float = Field(1000.0, gt=0)
    bursty: BurstyConfig | None = None


class NetworkConfig(Strict):
    """`lan` links devices to their boundary coordinator; `wan` links boundaries to the global plane."""

    lan: LinkConfig = LinkConfig(latency_ms=0.2, jitter_pct=10, bandwidth_mbps=10_000)
    wan: LinkConfig = LinkConfig(latency_ms=20, jitter_pct=50, bandwidth_mbps=1_000)


class DeploymentConfig(Strict):
    """How the parties of a deployment (`echelon serve`, `echelon launch`) wait for each other, on
    the wall clock. The simulator ignores it."""

    patience_s: float = Field(
        3600.0,
        gt=0,
        description="how long a party waits for a peer it needs (reconnecting to the global plane or its "
        "boundary); the global plane ends the run on its last synchronised model after this long "
        "without hearing from any boundary",
    )
    max_restarts: int = Field(3, ge=0, description="`echelon launch`: restarts of each crashed party")


class DeviceConfig(Strict):
    id: str = Identifier
    tokens_per_s: float = Field(gt=0, description="compute profile: training tokens per second")
    speed_jitter_pct: float = Field(0.0, ge=0, lt=100, description="per-round straggling, +/- percent")
    memory_gb: float | None = Field(None, gt=0)
    replica: str | None = Field(
        None, description="the plan replica this device is (set from boundaries[].plan)"
    )


class DeviceJoin(Strict):
    """A device outside the initial membership joins `boundary` at `at_s` (virtual seconds).

    `boundary` names one of the run's boundaries, or the device's own id: a one-device boundary
    that joins with it (the flat baselines' form)."""

    at_s: float = Field(ge=0)
    boundary: str = Identifier
    device: DeviceConfig


class DeviceDeparture(Strict):
    """Device `device` leaves for good at `at_s`: it never comes back."""

    at_s: float = Field(ge=0)
    device: str = Identifier


class BoundaryOutage(Strict):
    """Boundary `boundary`, its coordinator and every device, goes offline at `at_s` and comes back
    `duration_s` later, restarted (what it had not sent is lost)."""

    boundary: str = Identifier
    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)


class ChurnConfig(Strict):
    """Who comes and goes. Cycling: a share of the devices (a seeded pick) leave after an
    exponential uptime and rejoin after an exponential downtime. Scheduled: joins of new devices,
    departures for good, and whole-boundary outages."""

    mean_uptime_s: float | None = Field(None, gt=0, description="null: no cycling")
    mean_downtime_s: float = Field(60.0, gt=0)
    cycling_fraction: float = Field(1.0, gt=0, le=1, description="share of the devices that cycle")
    joins: tuple[DeviceJoin, ...] = ()
    departures: tuple[DeviceDeparture, ...] = ()
    outages: tuple[BoundaryOutage, ...] = ()


class BoundaryConfig(Strict):
    """A boundary's devices, listed, or the replicas of a Yellowstone plan (`plan`): each replica
    of the plan's boundary with this id is one device, its compute profile the plan's prediction."""

    id: str = Identifier
    devices: tuple[DeviceConfig, ...] = ()
    plan: Path | None = Field(None, description="plan.json from `echelon plan`: its replicas are the devices")
    wan: LinkConfig | None = Field(None, description="this boundary's link to the global plane")

    @model_validator(mode="before")
    @classmethod
    def _devices_from_plan(cls, data: object, info: ValidationInfo) -> object:
        if not isinstance(data, dict) or data.get("plan") is None:
            return data
        path = resolve_path(Path(data["plan"]), info)
        planned = plan_replicas(path, str(data.get("id")))
        # A configuration validated again (a strategy's resolution) carries the plan's own devices.
        given = [
            d if isinstance(d, DeviceConfig) else DeviceConfig.model_validate(d)
            for d in data.get("devices") or ()
        ]
        if given and given != [DeviceConfig.model_validate(d) for d in planned]:
            raise ValueError(
                "give `devices` or `plan`, not both: a plan's replicas are the boundary's devices"
            )
        return {**data, "plan": path, "devices": planned}

    @model_validator(mode="after")
    def _some_devices(self) -> BoundaryConfig:
        if not self.devices:
            raise ValueError("list the boundary's `devices`, or name a `plan` whose replicas are its devices")
        return self


def plan_replicas(path: Path, boundary: str) -> list[dict]:
    """The devices a plan gives `boundary`: one per replica, named after it (`acme/r0` -> `acme-r0`),
    computing at the plan's predicted tokens per second."""
    from echelon.errors import UserError
    from echelon.yellowstone.plan import read_plan

    try:
        plan = read_plan(path)
    except UserError as e:
        raise ValueError(str(e)) from None
    found = next((b for b in plan.boundaries if b.id == boundary), None)
    if found is None:
        raise ValueError(f"{path} plans boundaries {[b.id for b in plan.boundaries]}, not {boundary!r}")
    if not found.replicas:
        raise ValueError(f"{path}: boundary {boundary!r} has no replica to train")
    return [
        {"id": r.id.replace("/", "-"), "tokens_per_s": r.predicted.tokens_per_s, "replica": r.id}
        for r in found.replicas
    ]


class BudgetConfig(Strict):
    """When to stop: the first budget reached ends the run after a final outer step."""

    tokens: int | None = Field(None, ge=1)
    outer_steps: int | None = Field(None, ge=1)
    virtual_seconds: float | None = Field(None, gt=0)
    cross_boundary_bytes: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _some_budget(self) -> BudgetConfig:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("set at least one of tokens, outer_steps, virtual_seconds, cross_boundary_bytes")
        return self


class MetricsConfig(Strict):
    """How a run is recorded besides metrics.jsonl (always written)."""

    tensorboard: bool = Field(
        False, description="TensorBoard event files under RUN/tb (pip install 'echelon[tensorboard]')"
    )


class EvalConfig(Strict):
    sequences: int = Field(64, ge=1, description="validation sequences per evaluation")
    batch: int = Field(16, ge=1)


class RunConfig(Strict):
    """A whole run: model, data, devices in boundaries, strategy and knobs, network, budget, seed."""

    name: str = Identifier
    seed: int = Field(0, ge=0, le=2**63 - 1, description="every random choice of the run derives from it")
    strategy: str = Field("echelon", description="a registered strategy: see `echelon.strategies`")
    model: ModelConfig = ModelConfig(preset="tiny")
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    echelon: EchelonConfig = EchelonConfig()
    network: NetworkConfig = NetworkConfig()
    churn: ChurnConfig = ChurnConfig()
    deployment: DeploymentConfig = DeploymentConfig()
    boundaries: tuple[BoundaryConfig, ...] = Field(min_length=1)
    budget: BudgetConfig
    eval: EvalConfig = EvalConfig()
    metrics: MetricsConfig = MetricsConfig()

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
        return name

    @model_validator(mode="after")
    def _unique_ids(self) -> RunConfig:
        seen: set[str] = set()
        for b in self.boundaries:
            if b.id in seen:
                raise ValueError(f"boundary id {b.id!r} is used twice")
            seen.add(b.id)
        devices: set[str] = set()
        for b in self.boundaries:
            for d in b.devices:
                if d.id in devices:
                    raise ValueError(
                        f"device id {d.id!r} is used twice (device ids are unique across boundaries)"
                    )
                devices.add(d.id)
        for b in self.boundaries:
            if self.echelon.min_quorum > len(b.devices):
                raise ValueError(
                    f"echelon.min_quorum is {self.echelon.min_quorum} but boundary {b.id!r} has only "
                    f"{len(b.devices)} devices"
                )
        self._churn_refers_to_known_parties(seen, devices)
        t = self.train
        if t.schedule == "cosine" and t.decay_steps is None and self.budget.tokens is None:
            raise ValueError(
                "train.schedule cosine needs train.decay_steps, or a budget.tokens to derive it from"
            )
        return self

    @model_validator(mode="after")
    def _plans_match_the_run(self) -> RunConfig:
        for b in self.boundaries:
            if b.plan is not None:
                problem = plan_mismatch(self, b.plan)
                if problem:
                    raise ValueError(f"boundaries[{b.id}].plan {b.plan}: {problem}")
        return self

    def _churn_refers_to_known_parties(self, boundaries: set[str], devices: set[str]) -> None:
        joined: dict[str, float] = {}
        for i, j in enumerate(self.churn.joins):
            if j.device.id in devices or j.device.id in joined:
                raise ValueError(f"churn.joins[{i}]: device id {j.device.id!r} is already in use")
            if j.boundary not in boundaries and j.boundary != j.device.id:
                raise ValueError(
                    f"churn.joins[{i}]: no boundary {j.boundary!r}; name one of {', '.join(sorted(boundaries))}"
                )
            joined[j.device.id] = j.at_s
        for i, d in enumerate(self.churn.departures):
            if d.device not in devices and d.device not in joined:
                raise ValueError(f"churn.departures[{i}]: no device {d.device!r} in the run")
            if d.at_s < joined.get(d.device, 0.0):
                raise ValueError(f"churn.departures[{i}]: device {d.device!r} leaves before it joins")
        for i, o in enumerate(self.churn.outages):
            if o.boundary not in boundaries:
                raise ValueError(f"churn.outages[{i}]: no boundary {o.boundary!r} in the run")

    @property
    def tokens_per_round(self) -> int:
        """The tokens one device trains in a local round: K inner steps of micro_batch x grad_accum
        sequences of data.seq_len tokens (every device of a run, a Yellowstone replica too)."""
        t = self.train
        return t.inner_steps * t.grad_accum * t.micro_batch * self.data.seq_len

    @property
    def devices(self) -> list[tuple[str, DeviceConfig]]:
        """(boundary id, device) pairs of the initial membership, in file order."""
        return [(b.id, d) for b in self.boundaries for d in b.devices]

    def certified_devices(self) -> dict[str, list[str]]:
        """Boundary id -> the ids of the devices a deployment certifies for it: its initial
        membership, then the devices `churn.joins` names for it (each admitted by that certificate)."""
        out = {b.id: [d.id for d in b.devices] for b in self.boundaries}
        for j in self.churn.joins:
            if j.boundary in out:
                out[j.boundary].append(j.device.id)
        return out

    @property
    def all_devices(self) -> list[tuple[str, DeviceConfig]]:
        """The initial membership, then the devices that join later (`churn.joins`), in file order."""
        return self.devices + [(j.boundary, j.device) for j in self.churn.joins]


def plan_mismatch(cfg: RunConfig, path: Path) -> str | None:
    """Why a plan cannot run as devices of `cfg` (its model, sequence and batch), or None."""
    from echelon.yellowstone.plan import read_plan

    plan = read_plan(path)
    m = plan.model
    if cfg.model.path is not None and m.source != str(cfg.model.path):
        return f"it plans {m.source}, the run trains {cfg.model.path}: re-plan with --model {cfg.model.path}"
    if cfg.model.path is None and m.source != "tiny":
        return f"it plans {m.source!r}, the run trains the tiny preset: re-plan with --model tiny"
    if m.trainable != cfg.model.trainable or (m.trainable == "lora" and m.lora_rank != cfg.model.lora.r):
        return (
            f"it plans {m.trainable} training (LoRA rank {m.lora_rank}), the run {cfg.model.trainable} "
            f"(rank {cfg.model.lora.r}): re-plan with --{cfg.model.trainable} --lora-rank {cfg.model.lora.r}"
        )
    if m.seq_len != cfg.data.seq_len:
        return f"it plans sequences of {m.seq_len} tokens, data.seq_len is {cfg.data.seq_len}"
    batch = cfg.train.micro_batch * cfg.train.grad_accum
    for b in plan.boundaries:
        for r in b.replicas:
            if r.micro_batch * r.micro_batches != batch:
                return (
                    f"replica {r.id} trains {r.micro_batches} x {r.micro_batch} sequences per step, the run "
                    f"{cfg.train.micro_batch} x {cfg.train.grad_accum} (train.micro_batch x grad_accum)"
                )
    if get_strategy(cfg.strategy).local == "scaffold":
        return f"strategy {cfg.strategy!r} trains with its own local optimizer; planned devices run AdamW"
    return None


def load_run(path: str | Path) -> RunConfig:
    """Load and validate a run file; relative paths inside resolve against its directory."""
    p = Path(path)
    return load_model(p, RunConfig, context={"base_dir": p.resolve().parent})
