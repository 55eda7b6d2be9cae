"""Assemble a run from its config and execute it in simulation, writing a run directory.

Reading order: `prepare` builds the model, the data and the device shards; `build_simulation`
wires the planes, guards and network into the simulation driver; `train` runs it with a
progress bar, evaluates the global model at every outer step, and writes the run directory:
config.yaml (as given), metrics.jsonl, summary.json, the final weights, and audit/ (each
party's signed log of its cross-boundary messages and its public key, see `echelon audit`).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.layout import audit_dir, log_path
from echelon.audit.log import AuditLog
from echelon.config import BoundaryConfig, RunConfig
from echelon.contract.guard import AuditSink, EgressGuard, IngressGuard
from echelon.contract.provenance import Bounds
from echelon.planes.aggregation import Aggregator, PlainAggregator
from echelon.planes.boundary import BoundaryPlane
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane
from echelon.planes.device import DevicePlane
from echelon.rundir import RunDirectory
from echelon.runtime.sim.engine import (
    GLOBAL,
    Observer,
    Simulation,
    boundary_address,
    device_address,
    party_of,
)
from echelon.secagg import SecAggPlusAggregator, StageTimeouts
from echelon.strategies import effective_config, get_strategy
from echelon.train.data import Corpus, build_corpus, load_documents, partition, partition_skew
from echelon.train.model import ModelBundle, build_model
from echelon.train.trainer import LocalTrainer, ScaffoldTrainer, derived_seed, layer_fragments


@dataclass
class Prepared:
    """Everything device compute needs: the model, the corpus and each device's shard."""

    bundle: ModelBundle
    corpus: Corpus
    shards: dict[str, np.ndarray]
    trainer: LocalTrainer
    skew: float
    fragments: int | Bounds  # the fragments of theta the outer steps synchronise in turn


def prepare(cfg: RunConfig) -> Prepared:
    """Model, corpus, shards (for every device, those that join later included) and the local
    trainer for `cfg` (an `effective_config`)."""
    bundle = build_model(cfg.model, cfg.seed)
    fragments: int | Bounds = cfg.echelon.streaming.fragments
    if fragments > 1:
        fragments = layer_fragments(bundle, fragments)  # before any optimiser sees the parameters
    corpus = build_corpus(load_documents(cfg.data, cfg.seed), bundle.tokenizer, cfg.data, cfg.seed)
    device_ids = [d.id for _, d in cfg.all_devices]
    parts = partition(
        corpus.train_domain, len(device_ids), cfg.data.partition, cfg.seed, cfg.train.micro_batch
    )
    shards = dict(zip(device_ids, parts, strict=True))
    local = ScaffoldTrainer if get_strategy(cfg.strategy).local == "scaffold" else LocalTrainer
    trainer = local(
        bundle, corpus, shards, cfg.train, cfg.echelon.proximal_mu, cfg.seed, decay_steps=_decay_steps(cfg)
    )
    return Prepared(bundle, corpus, shards, trainer, partition_skew(corpus.train_domain, parts), fragments)


def _decay_steps(cfg: RunConfig) -> int | None:
    """The cosine schedule's length when the run file does not give one: the inner steps each
    device takes if the token budget were shared evenly."""
    t = cfg.train
    if cfg.budget.tokens is None:
        return None
    tokens_per_step = t.grad_accum * t.micro_batch * cfg.data.seq_len
    return max(1, cfg.budget.tokens // (tokens_per_step * len(cfg.all_devices)))


def make_aggregator(cfg: RunConfig, min_quorum: int | None = None, clip: float | None = None) -> Aggregator:
    """The boundary's aggregation path: SecAgg+ (the default) or the plain weighted sum.

    `min_quorum` overrides the run's (the outer round over boundaries needs only one aggregate:
    each already met the quorum inside its boundary); `clip` overrides the coordinate range of
    the fixed-point encoding (the outer round's range is the boundaries' own bound).
    """
    e = cfg.echelon
    quorum = e.min_quorum if min_quorum is None else min_quorum
    if e.aggregation == "plain":
        return PlainAggregator(min_quorum=quorum, timeout_s=e.aggregation_timeout_s)
    s = e.secagg
    return SecAggPlusAggregator(
        threshold=s.threshold,
        degree=s.degree,
        min_quorum=quorum,
        timeouts=StageTimeouts(*[s.stage_timeout_s] * 4),
        clip=e.clip if clip is None else clip,
        scale=2.0**s.scale_bits,
        bits=s.bits,
    )


def outer_range(cfg: RunConfig) -> float | None:
    """+SA: the coordinate range of the outer round, from a boundary's own bound on Delta_b:
    ||Delta_b|| <= m * eta_mid * C for m middle steps (each delta_b is a weighted mean of deltas
    clipped to C), with m the longest interval the cadence schedules. Coordinates beyond it are
    clipped by the encoding and counted by the boundary (`outer_input_clipped`)."""
    e = cfg.echelon
    if e.clip is None:
        return None
    longest = e.sync.h_max if get_strategy(cfg.strategy).cadence == "drift_aware" else e.sync.interval
    return longest * e.middle_lr * e.clip


def _outer_aggregator(cfg: RunConfig) -> Aggregator | None:
    if not get_strategy(cfg.strategy).secure_outer:
        return None
    return make_aggregator(cfg, min_quorum=1, clip=outer_range(cfg))


def make_global_plane(
    cfg: RunConfig, theta0: torch.Tensor, fragments: int | Bounds | None = None
) -> GlobalPlane:
    """The global plane of `cfg` (an `effective_config`), starting from `theta0`; `fragments`:
    the fragments' ranges when they are layer-wise (`Prepared.fragments`)."""
    e, strategy = cfg.echelon, get_strategy(cfg.strategy)
    return GlobalPlane(
        [boundary_address(b.id) for b in cfg.boundaries],
        theta0,
        e.outer,
        Cadence(e.sync, strategy.cadence == "drift_aware"),
        e.sync.timeout_s,
        barrier=strategy.barrier,
        outer_aggregator=_outer_aggregator(cfg),
        fragments=e.streaming.fragments if fragments is None else fragments,
    )


def make_boundary_plane(
    cfg: RunConfig, boundary: BoundaryConfig, dim: int, fragments: int | Bounds | None = None
) -> BoundaryPlane:
    """The coordinator of `boundary` in `cfg` (an `effective_config`), for `dim`-vectors."""
    strategy = get_strategy(cfg.strategy)
    return BoundaryPlane(
        boundary.id,
        [device_address(d.id) for d in boundary.devices],
        GLOBAL,
        cfg.echelon,
        make_aggregator(cfg),
        dim,
        lockstep=strategy.lockstep,
        outer_aggregator=_outer_aggregator(cfg),
        outer_range=outer_range(cfg) if strategy.secure_outer else None,
        fragments=cfg.echelon.streaming.fragments if fragments is None else fragments,
        seed=derived_seed(cfg.seed, 4, zlib.crc32(boundary.id.encode())),
    )


def make_device_plane(cfg: RunConfig, device_id: str, boundary_id: str, model_dim: int) -> DevicePlane:
    """Device `device_id` of boundary `boundary_id`; `model_dim` is the model part of the state."""
    e = cfg.echelon
    return DevicePlane(
        device_id,
        boundary_address(boundary_id),
        make_aggregator(cfg),
        e.clip,
        e.reference_ema,
        model_dim=model_dim,
        alignment_gate=e.alignment_gate,
    )


def open_audit_logs(run_dir: Path, cfg: RunConfig, min_quorum: int) -> dict[str, AuditLog]:
    """One signed audit log per party (the global plane and each boundary) in `run_dir`/audit.

    In simulation every party's signing key lives only in this process's memory; the public keys
    are written beside the logs for `echelon audit`. `min_quorum` is the contract's floor the
    verifier checks every boundary aggregate against (the run file's, whatever the strategy runs).
    """
    audit_dir(run_dir).mkdir(parents=True, exist_ok=True)
    parties = [GLOBAL] + [party_of(boundary_address(b)) for b in _boundary_configs(cfg)]
    return {
        p: AuditLog.create(
            log_path(run_dir, p), p, Ed25519PrivateKey.generate(), "virtual", min_quorum=min_quorum
        )
        for p in parties
    }


def _boundary_configs(cfg: RunConfig) -> dict[str, BoundaryConfig]:
    """Every boundary that may take part: the run's, and one-device boundaries joining with their
    device (the flat baselines' form of a join)."""
    out = {b.id: b for b in cfg.boundaries}
    for j in cfg.churn.joins:
        if j.boundary not in out:
            out[j.boundary] = BoundaryConfig(id=j.boundary, devices=(j.device,), wan=cfg.network.wan)
    return out


def build_simulation(
    cfg: RunConfig,
    prep: Prepared,
    on_emit: Callable[[str, dict], None],
    audit: Mapping[str, AuditSink] | None = None,
    observer: Observer | None = None,
) -> Simulation:
    """Wire the three planes, the guards and the network for `cfg`; `audit` maps party -> log."""
    e = cfg.echelon
    theta0 = prep.trainer.initial_state()
    global_plane = make_global_plane(cfg, theta0, prep.fragments)
    specs = _boundary_configs(cfg)

    def make_boundary(boundary_id: str) -> BoundaryPlane:
        return make_boundary_plane(cfg, specs[boundary_id], theta0.numel(), prep.fragments)

    boundaries = {b: make_boundary(b) for b in specs}
    devices = {d.id: make_device_plane(cfg, d.id, b, prep.bundle.dim) for b, d in cfg.all_devices}
    parties = [GLOBAL] + [party_of(boundary_address(b)) for b in specs]
    sinks = audit or {}
    guards = {
        p: (EgressGuard(p, e.min_quorum, sinks.get(p)), IngressGuard(p, e.min_quorum, sinks.get(p)))
        for p in parties
    }
    return Simulation(
        global_plane=global_plane,
        boundaries=boundaries,
        devices=devices,
        device_boundary={d.id: b for b, d in cfg.all_devices},
        device_profiles={d.id: d for _, d in cfg.all_devices},
        trainer=prep.trainer,
        lan=cfg.network.lan,
        wan={b.id: b.wan or cfg.network.wan for b in specs.values()},
        churn=cfg.churn,
        guards=guards,
        seed=cfg.seed,
        on_emit=on_emit,
        make_boundary=make_boundary,
        observer=observer,
    )


def train(
    run_cfg: RunConfig, run_dir: Path, *, force: bool = False, progress: bool = True, redteam: bool = False
) -> dict:
    """Run `run_cfg` in simulation and write its run directory; returns the summary.

    config.yaml is the run file as given; the planes run its strategy's `effective_config`.
    `redteam`: also record what the global coordinator received (redteam/) and, apart, the
    simulator's private ground truth (private/), for `echelon redteam` (echelon.analysis.redteam).
    """
    from echelon.progress import RunProgress

    wall0 = time.perf_counter()
    out = RunDirectory(run_dir, force=force)
    try:
        out.write_yaml("config.yaml", run_cfg.model_dump(mode="json"))
        cfg = effective_config(run_cfg)
        prep = prepare(cfg)
        evals: list[float] = []
        sim: Simulation | None = None
        bar = RunProgress(cfg.budget, enabled=progress)

        def on_emit(kind: str, fields: dict) -> None:
            record = {"kind": kind, **fields}
            if kind == "outer_step":
                record["val_loss"] = prep.trainer.evaluate(
                    sim.global_plane.theta_g, cfg.eval.sequences, cfg.eval.batch
                )
                record["tokens_total"] = sim.tokens
                record["cross_boundary_bytes"] = sim.cross_boundary_bytes
                evals.append(record["val_loss"])
                bar.update(sim.now, sim.tokens, sim.global_plane.outer_step, record["val_loss"])
            out.metric(record)

        logs = open_audit_logs(out.staging, cfg, run_cfg.echelon.min_quorum)
        recorder = None
        if redteam:
            from echelon.analysis.redteam import Recorder

            recorder = Recorder(cfg)
        try:
            sim = build_simulation(cfg, prep, on_emit, logs, observer=recorder)
            with bar:
                sim.run(cfg.budget)
        finally:
            for log in logs.values():
                log.close()
        if recorder is not None:
            recorder.save(out.staging)
        artefact = prep.bundle.save(out.staging, prep.trainer.model_part(sim.global_plane.theta_g))
        summary = summarise(cfg, prep, sim, evals, time.perf_counter() - wall0)
        summary["artefact"] = artefact.name
        out.write_json("summary.json", summary)
    except BaseException:
        out.abandon()
        raise
    out.commit()
    return summary


def summarise(cfg: RunConfig, prep: Prepared, sim: Simulation, evals: list[float], wall_s: float) -> dict:
    strategy = get_strategy(cfg.strategy)
    return {
        "name": cfg.name,
        "strategy": strategy.label,
        "admissible": strategy.admissible,
        "start_val_loss": evals[0],
        "end_val_loss": evals[-1],
        "tokens": sim.tokens,
        "outer_steps": sim.global_plane.outer_step,
        "b_eff": sim.global_plane.b_eff,
        "middle_steps": {b: p.middle_step for b, p in sim.boundary_planes.items()},
        "stop_reason": sim.global_plane.final_reason,
        "virtual_time_s": sim.now,
        "wall_time_s": wall_s,
        # Throughput measured from the run: over the virtual clock (the modelled fleet, stalls and
        # all), and of the real local-round compute on this machine, per CPU second.
        "tokens_per_virtual_s": sim.tokens / sim.now if sim.now else 0.0,
        "compute_tokens_per_s": sim.tokens / sim.compute_s if sim.compute_s else 0.0,
        "trainable_parameters": prep.bundle.dim,
        "partition_skew": prep.skew,
        "cross_boundary_bytes": sim.cross_boundary_by_type(),
        "intra_boundary_bytes": dict(sorted(sim.traffic.intra_bytes.items())),
        "refused": len(sim.traffic.refused),
    }
