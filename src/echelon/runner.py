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

from echelon.audit.anchor import RunBinding, config_digest, new_run_id
from echelon.audit.layout import audit_dir, log_path
from echelon.audit.log import AuditLog
from echelon.config import BoundaryConfig, RunConfig
from echelon.contract.guard import AuditSink, EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.contract.provenance import Ledger
from echelon.errors import UserError
from echelon.planes.aggregation import Aggregator, PlainAggregator
from echelon.planes.boundary import BoundaryPlane
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane
from echelon.planes.device import DevicePlane
from echelon.rundir import RunDirectory, checkpoint_path, save_checkpoint
from echelon.runtime.sim.engine import GLOBAL, Simulation, boundary_address, device_address, party_of
from echelon.secagg import Identity, SecAggPlusAggregator, StageTimeouts, simulated_identities
from echelon.strategies import effective_config, get_strategy
from echelon.train.data import Corpus, build_corpus, load_documents, partition, partition_skew
from echelon.train.model import ModelBundle, build_model
from echelon.train.trainer import LocalTrainer, ScaffoldTrainer
from echelon.yellowstone.execute.devices import PlannedDevice, PlannedTrainer


@dataclass
class Prepared:
    """Everything device compute needs: the model, the corpus and each device's shard."""

    bundle: ModelBundle
    corpus: Corpus
    shards: dict[str, np.ndarray]
    trainer: LocalTrainer
    skew: float


def prepare(cfg: RunConfig, workdir: Path | None = None, local_devices: set[str] | None = None) -> Prepared:
    """Model, corpus, shards and the local trainer for `cfg` (an `effective_config`).

    Devices that are replicas of a Yellowstone plan (`boundaries[].plan`) train on their plan's
    job, which keeps its checkpoints and logs under `workdir`; call `trainer.close()` after the run.
    `local_devices` names the devices whose rounds this process runs (None: all, as in simulation).
    """
    bundle = build_model(cfg.model, cfg.seed)
    corpus = build_corpus(load_documents(cfg.data, cfg.seed), bundle.tokenizer, cfg.data, cfg.seed)
    device_ids = [d.id for _, d in cfg.devices]
    parts = partition(
        corpus.train_domain, len(device_ids), cfg.data.partition, cfg.seed, cfg.train.micro_batch
    )
    shards = dict(zip(device_ids, parts, strict=True))
    planned = [
        PlannedDevice(d.id, b.plan, d.replica)
        for b in cfg.boundaries
        for d in b.devices
        if d.replica is not None and (local_devices is None or d.id in local_devices)
    ]
    if planned:
        if workdir is None:
            raise ValueError("a run with planned boundaries needs a working directory for their jobs")
        trainer: LocalTrainer = PlannedTrainer(
            bundle, corpus, shards, cfg.train, cfg.echelon.proximal_mu, cfg.seed, planned, workdir
        )
    else:
        local = ScaffoldTrainer if get_strategy(cfg.strategy).local == "scaffold" else LocalTrainer
        trainer = local(bundle, corpus, shards, cfg.train, cfg.echelon.proximal_mu, cfg.seed)
    return Prepared(bundle, corpus, shards, trainer, partition_skew(corpus.train_domain, parts))


def make_aggregator(cfg: RunConfig, identity: Identity | None = None, *, outer: bool = False) -> Aggregator:
    """The boundary's aggregation path (SecAgg+ by default, or the plain weighted sum), or with
    `outer` the global plane's secure round over the boundaries' Delta_b (+SA): always SecAgg+,
    quorum 1 (each Delta_b met the quorum inside its boundary), range secagg.outer_clip.

    With a party's `identity` (a deployment's certificates, or a simulation's when
    secagg.malicious_server is on) the rounds are defended against a malicious server, unless
    secagg.malicious_server is false.
    """
    e, s = cfg.echelon, cfg.echelon.secagg
    if e.aggregation == "plain" and not outer:
        return PlainAggregator(min_quorum=e.min_quorum, timeout_s=e.aggregation_timeout_s)
    clip = e.clip
    if outer:
        intervals = max(e.sync.interval, e.sync.h_max)
        clip = s.outer_clip or (None if e.clip is None else e.clip * e.middle_lr * intervals)
        if clip is None:
            raise UserError(
                "secure outer aggregation needs a range: set echelon.clip or echelon.secagg.outer_clip"
            )
    return SecAggPlusAggregator(
        threshold=s.threshold,
        degree=s.degree,
        min_quorum=1 if outer else e.min_quorum,
        timeouts=StageTimeouts(*[s.stage_timeout_s] * 5),
        clip=clip,
        scale=2.0**s.scale_bits,
        bits=s.bits,
        norm_bound=clip,  # devices clip their delta's L2 norm to C; Delta_b's is at most C x eta_mid x H
        defended=identity is not None and s.malicious_server is not False,
        signer=None if identity is None else identity.signer,
        verifier=None if identity is None else identity.verifier,
    )


def make_guards(
    cfg: RunConfig, party: str, dim: int, audit: AuditSink | None, ledger: Ledger | None = None
) -> tuple[EgressGuard, IngressGuard]:
    """`party`'s egress and ingress guards under the contract terms of `cfg` (an
    `effective_config`) for `dim`-vectors; a boundary's `ledger` lists the aggregates it minted."""
    e = cfg.echelon
    terms = Terms(e.min_quorum, dim, e.streaming.fragments, len(cfg.boundaries))
    return EgressGuard(party, terms, audit, ledger), IngressGuard(party, terms, audit)


def simulated_identity(cfg: RunConfig) -> Callable[[str], Identity | None]:
    """party -> its identity in a simulation: from an in-memory CA derived from the seed when
    secagg.malicious_server is on, else none (the rounds then assume an honest-but-curious server)."""
    if not cfg.echelon.secagg.malicious_server:
        return lambda party: None
    parties: dict[str, str | None] = {f"boundary.{b.id}": None for b in cfg.boundaries}
    parties |= {f"device.{d.id}": f"boundary.{b}" for b, d in cfg.devices}
    verifier, signers = simulated_identities(parties, cfg.seed)
    return lambda party: Identity(verifier, signers.get(party))


def make_global_plane(cfg: RunConfig, theta0: torch.Tensor, identity: Identity | None = None) -> GlobalPlane:
    """The global plane of `cfg` (an `effective_config`), starting from `theta0`."""
    e, strategy = cfg.echelon, get_strategy(cfg.strategy)
    return GlobalPlane(
        [boundary_address(b.id) for b in cfg.boundaries],
        theta0,
        e.outer,
        Cadence(e.sync, strategy.drift_aware),
        e.sync.timeout_s,
        barrier=strategy.synchronous or strategy.barrier,
        outer_aggregator=make_aggregator(cfg, identity, outer=True) if strategy.secure_outer else None,
        fragments=e.streaming.fragments,
    )


def make_boundary_plane(
    cfg: RunConfig, boundary: BoundaryConfig, dim: int, identity: Identity | None = None
) -> BoundaryPlane:
    """The coordinator of `boundary` in `cfg` (an `effective_config`), for `dim`-vectors."""
    strategy = get_strategy(cfg.strategy)
    return BoundaryPlane(
        boundary.id,
        [device_address(d.id) for d in boundary.devices],
        GLOBAL,
        cfg.echelon,
        make_aggregator(cfg, identity),
        dim,
        lockstep=strategy.synchronous,
        outer_aggregator=make_aggregator(cfg, identity, outer=True) if strategy.secure_outer else None,
    )


def make_device_plane(
    cfg: RunConfig, device_id: str, boundary_id: str, model_dim: int, identity: Identity | None = None
) -> DevicePlane:
    """Device `device_id` of boundary `boundary_id`; `model_dim` is the model part of the state."""
    e = cfg.echelon
    return DevicePlane(
        device_id,
        boundary_address(boundary_id),
        make_aggregator(cfg, identity),
        e.clip,
        e.reference_ema,
        model_dim=model_dim,
    )


def open_audit_logs(
    run_dir: Path, cfg: RunConfig, min_quorum: int, binding: RunBinding
) -> dict[str, AuditLog]:
    """One signed audit log per party (the global plane and each boundary) in `run_dir`/audit.

    In simulation every party's signing key lives only in this process's memory; the public keys
    are written beside the logs for `echelon audit`. `min_quorum` is the contract's floor the
    verifier checks every boundary aggregate against (the run file's, whatever the strategy runs);
    `binding` (run id, config digest) goes into every log's header and checkpoint signatures.
    """
    audit_dir(run_dir).mkdir(parents=True, exist_ok=True)
    parties = [GLOBAL] + [party_of(boundary_address(b.id)) for b in cfg.boundaries]
    return {
        p: AuditLog.create(
            log_path(run_dir, p), p, Ed25519PrivateKey.generate(), "virtual", binding, min_quorum=min_quorum
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
    theta0 = prep.trainer.initial_state()
    identity = simulated_identity(cfg)
    global_plane = make_global_plane(cfg, theta0, identity(GLOBAL))
    boundaries = {
        b.id: make_boundary_plane(cfg, b, theta0.numel(), identity(f"boundary.{b.id}"))
        for b in cfg.boundaries
    }
    devices = {
        d.id: make_device_plane(cfg, d.id, b, prep.bundle.dim, identity(f"device.{d.id}"))
        for b, d in cfg.devices
    }
    sinks = audit or {}
    guards = {GLOBAL: make_guards(cfg, GLOBAL, theta0.numel(), sinks.get(GLOBAL))}
    for b, plane in boundaries.items():
        party = party_of(boundary_address(b))
        guards[party] = make_guards(cfg, party, theta0.numel(), sinks.get(party), plane.ledger)
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
        prep = prepare(cfg, out.staging / "plans")
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

        binding = RunBinding(new_run_id(), config_digest(run_cfg))
        logs = open_audit_logs(out.staging, cfg, run_cfg.echelon.min_quorum, binding)
        try:
            sim = build_simulation(cfg, prep, on_emit, logs)
            with bar:
                sim.run(cfg.budget)
        finally:
            prep.trainer.close()
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
