"""Execute a run in simulation, writing a run directory.

Reading order: `echelon.assembly.prepare` builds the model, the data and the device shards;
`build_simulation` wires the planes, guards and network into the simulation driver; `train` runs it with a
progress bar, evaluates the global model at every outer step, and writes the run directory:
config.yaml (as given), metrics.jsonl, summary.json, the final weights, and audit/ (each
party's signed log of its cross-boundary messages and its public key, see `echelon audit`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import SafetensorError

from echelon.assembly import (
    Prepared,
    make_boundary_plane,
    make_device_plane,
    make_global_plane,
    make_guards,
    prepare,
    simulated_identity,
)
from echelon.audit.anchor import RunBinding, config_digest, new_run_id
from echelon.audit.layout import audit_dir, log_path
from echelon.audit.log import AuditLog
from echelon.config import RunConfig
from echelon.contract.guard import AuditSink
from echelon.errors import UserError
from echelon.parties import GLOBAL, boundary_party, device_party
from echelon.rundir import RunDirectory, checkpoint_path, save_checkpoint
from echelon.runtime.sim.engine import Simulation
from echelon.strategies import effective_config, get_strategy


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
    parties = [GLOBAL] + [boundary_party(b.id) for b in cfg.boundaries]
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
        b.id: make_boundary_plane(cfg, b, theta0.numel(), identity(boundary_party(b.id)))
        for b in cfg.boundaries
    }
    devices = {
        d.id: make_device_plane(cfg, d.id, b, prep.bundle.dim, identity(device_party(d.id)))
        for b, d in cfg.devices
    }
    sinks = audit or {}
    guards = {GLOBAL: make_guards(cfg, GLOBAL, theta0.numel(), sinks.get(GLOBAL))}
    for b, plane in boundaries.items():
        party = boundary_party(b)
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
