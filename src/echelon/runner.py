"""Assemble a run from its config and execute it in simulation, writing a run directory.

Reading order: `prepare` builds the model, the data and the device shards; `build_simulation`
wires the planes, guards and network into the simulation driver; `train` runs it with a
progress bar, evaluates the global model at every outer step, and writes the run directory:
config.yaml (as given), metrics.jsonl, summary.json, the final weights, and audit/ (each
party's signed log of its cross-boundary messages and its public key, see `echelon audit`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import SafetensorError

from echelon.audit.layout import audit_dir, log_path
from echelon.audit.log import AuditLog
from echelon.config import BoundaryConfig, RunConfig
from echelon.contract.guard import AuditSink, EgressGuard, IngressGuard
from echelon.errors import UserError
from echelon.planes.aggregation import Aggregator, PlainAggregator
from echelon.planes.boundary import BoundaryPlane
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane
from echelon.planes.device import DevicePlane
from echelon.rundir import RunDirectory, checkpoint_path, save_checkpoint
from echelon.runtime.sim.engine import GLOBAL, Simulation, boundary_address, device_address, party_of
from echelon.secagg import SecAggPlusAggregator, StageTimeouts
from echelon.strategies import effective_config, get_strategy
from echelon.train.data import Corpus, build_corpus, load_documents, partition, partition_skew
from echelon.train.model import ModelBundle, build_model
from echelon.train.trainer import LocalTrainer, ScaffoldTrainer


@dataclass
class Prepared:
    """Everything device compute needs: the model, the corpus and each device's shard."""

    bundle: ModelBundle
    corpus: Corpus
    shards: dict[str, np.ndarray]
    trainer: LocalTrainer
    skew: float


def prepare(cfg: RunConfig) -> Prepared:
    """Model, corpus, shards and the local trainer for `cfg` (an `effective_config`)."""
    bundle = build_model(cfg.model, cfg.seed)
    corpus = build_corpus(load_documents(cfg.data, cfg.seed), bundle.tokenizer, cfg.data, cfg.seed)
    device_ids = [d.id for _, d in cfg.devices]
    parts = partition(
        corpus.train_domain, len(device_ids), cfg.data.partition, cfg.seed, cfg.train.micro_batch
    )
    shards = dict(zip(device_ids, parts, strict=True))
    local = ScaffoldTrainer if get_strategy(cfg.strategy).local == "scaffold" else LocalTrainer
    trainer = local(bundle, corpus, shards, cfg.train, cfg.echelon.proximal_mu, cfg.seed)
    return Prepared(bundle, corpus, shards, trainer, partition_skew(corpus.train_domain, parts))


def make_aggregator(cfg: RunConfig, min_quorum: int | None = None) -> Aggregator:
    """The boundary's aggregation path: SecAgg+ (the default) or the plain weighted sum.

    `min_quorum` overrides the run's (the outer round over boundaries needs only one aggregate:
    each already met the quorum inside its boundary).
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
        clip=e.clip,
        scale=2.0**s.scale_bits,
        bits=s.bits,
    )


def make_global_plane(cfg: RunConfig, theta0: torch.Tensor) -> GlobalPlane:
    """The global plane of `cfg` (an `effective_config`), starting from `theta0`."""
    e, strategy = cfg.echelon, get_strategy(cfg.strategy)
    return GlobalPlane(
        [boundary_address(b.id) for b in cfg.boundaries],
        theta0,
        e.outer,
        Cadence(e.sync, strategy.drift_aware),
        e.sync.timeout_s,
        barrier=strategy.synchronous or strategy.barrier,
        outer_aggregator=make_aggregator(cfg, min_quorum=1) if strategy.secure_outer else None,
        fragments=e.streaming.fragments,
    )


def make_boundary_plane(cfg: RunConfig, boundary: BoundaryConfig, dim: int) -> BoundaryPlane:
    """The coordinator of `boundary` in `cfg` (an `effective_config`), for `dim`-vectors."""
    strategy = get_strategy(cfg.strategy)
    return BoundaryPlane(
        boundary.id,
        [device_address(d.id) for d in boundary.devices],
        GLOBAL,
        cfg.echelon,
        make_aggregator(cfg),
        dim,
        lockstep=strategy.synchronous,
        outer_aggregator=make_aggregator(cfg, min_quorum=1) if strategy.secure_outer else None,
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
    )


def open_audit_logs(run_dir: Path, cfg: RunConfig, min_quorum: int) -> dict[str, AuditLog]:
    """One signed audit log per party (the global plane and each boundary) in `run_dir`/audit.

    In simulation every party's signing key lives only in this process's memory; the public keys
    are written beside the logs for `echelon audit`. `min_quorum` is the contract's floor the
    verifier checks every boundary aggregate against (the run file's, whatever the strategy runs).
    """
    audit_dir(run_dir).mkdir(parents=True, exist_ok=True)
    parties = [GLOBAL] + [party_of(boundary_address(b.id)) for b in cfg.boundaries]
    return {
        p: AuditLog.create(
            log_path(run_dir, p), p, Ed25519PrivateKey.generate(), "virtual", min_quorum=min_quorum
        )
        for p in parties
    }


def build_simulation(
    cfg: RunConfig,
    prep: Prepared,
    on_emit: Callable[[str, dict], None],
    audit: Mapping[str, AuditSink] | None = None,
) -> Simulation:
    """Wire the three planes, the guards and the network for `cfg`; `audit` maps party -> log."""
    e = cfg.echelon
    theta0 = prep.trainer.initial_state()
    global_plane = make_global_plane(cfg, theta0)
    boundaries = {b.id: make_boundary_plane(cfg, b, theta0.numel()) for b in cfg.boundaries}
    devices = {d.id: make_device_plane(cfg, d.id, b, prep.bundle.dim) for b, d in cfg.devices}
    parties = [GLOBAL] + [party_of(boundary_address(b.id)) for b in cfg.boundaries]
    sinks = audit or {}
    guards = {
        p: (EgressGuard(p, e.min_quorum, sinks.get(p)), IngressGuard(p, e.min_quorum, sinks.get(p)))
        for p in parties
    }
    return Simulation(
        global_plane=global_plane,
        boundaries=boundaries,
        devices=devices,
        device_boundary={d.id: b for b, d in cfg.devices},
        device_profiles={d.id: d for _, d in cfg.devices},
        trainer=prep.trainer,
        lan=cfg.network.lan,
        wan={b.id: b.wan or cfg.network.wan for b in cfg.boundaries},
        churn=cfg.churn,
        guards=guards,
        seed=cfg.seed,
        on_emit=on_emit,
    )


def train(run_cfg: RunConfig, run_dir: Path, *, force: bool = False, progress: bool = True) -> dict:
    """Run `run_cfg` in simulation and write its run directory; returns the summary.

    config.yaml is the run file as given; the planes run its strategy's `effective_config`.
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
            if kind == "outer_step":  # the last synchronised model survives a failure at the end
                state = {"plane": sim.global_plane.state_dict(), "evals": list(evals)}
                save_checkpoint(checkpoint_path(out.staging, GLOBAL), state)

        logs = open_audit_logs(out.staging, cfg, run_cfg.echelon.min_quorum)
        try:
            sim = build_simulation(cfg, prep, on_emit, logs)
            with bar:
                sim.run(cfg.budget)
        finally:
            for log in logs.values():
                log.close()
        try:
            artefact = prep.bundle.save(out.staging, prep.trainer.model_part(sim.global_plane.theta_g))
            summary = summarise(cfg, prep, sim, evals, time.perf_counter() - wall0)
            summary["artefact"] = artefact.name
            out.write_json("summary.json", summary)
        except (OSError, SafetensorError) as e:
            raise UserError(
                f"could not write the final model or summary in {out.staging} ({e}); the last synchronised "
                f"model (outer step {sim.global_plane.outer_step}) is in "
                f"{checkpoint_path(out.staging, GLOBAL)}"
            ) from None
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
        "trainable_parameters": prep.bundle.dim,
        "partition_skew": prep.skew,
        "cross_boundary_bytes": sim.cross_boundary_by_type(),
        "intra_boundary_bytes": dict(sorted(sim.traffic.intra_bytes.items())),
        "refused": len(sim.traffic.refused),
    }
