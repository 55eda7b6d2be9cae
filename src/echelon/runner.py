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
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.assembly import (
    Prepared,
    boundary_configs,
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
from echelon.parties import GLOBAL, boundary_party, device_party
from echelon.planes.boundary import BoundaryPlane
from echelon.record import RunRecorder
from echelon.rundir import RunDirectory
from echelon.runtime.sim.engine import Observer, Simulation
from echelon.strategies import effective_config
from echelon.train.data import Document
from echelon.train.model import ModelBundle


class RecordingObserver(Observer, Protocol):
    """An observer of a simulated run that keeps what it saw in the run directory."""

    def save(self, run_dir: Path) -> None:
        """Write what was observed into `run_dir` (the run directory being written)."""


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
    parties = [GLOBAL] + [boundary_party(b) for b in boundary_configs(cfg)]
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
    observer: Observer | None = None,
) -> Simulation:
    """Wire the three planes, the guards and the network for `cfg`; `audit` maps party -> log;
    `observer` sees what the global coordinator receives (the red-team's view)."""
    theta0 = prep.trainer.initial_state()
    identity = simulated_identity(cfg)
    global_plane = make_global_plane(cfg, theta0, identity(GLOBAL), prep.fragments)
    specs = boundary_configs(cfg)

    def make_boundary(boundary_id: str) -> BoundaryPlane:
        b = specs[boundary_id]
        return make_boundary_plane(cfg, b, theta0.numel(), identity(boundary_party(b.id)), prep.fragments)

    boundaries = {b: make_boundary(b) for b in specs}
    devices = {
        d.id: make_device_plane(cfg, d.id, b, prep.bundle.dim, identity(device_party(d.id)))
        for b, d in cfg.all_devices
    }
    sinks = audit or {}
    guards = {GLOBAL: make_guards(cfg, GLOBAL, theta0.numel(), sinks.get(GLOBAL), None, prep.fragments)}
    for b, plane in boundaries.items():
        party = boundary_party(b)
        guards[party] = make_guards(
            cfg, party, theta0.numel(), sinks.get(party), plane.ledger, prep.fragments
        )
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
    run_cfg: RunConfig,
    run_dir: Path,
    *,
    force: bool = False,
    progress: bool = True,
    bundle: ModelBundle | None = None,
    documents: list[Document] | None = None,
    observer: RecordingObserver | None = None,
) -> dict:
    """Run `run_cfg` in simulation and write its run directory; returns the summary
    (`echelon.record.RunSummary` as a dict).

    config.yaml is the run file as given; the planes run its strategy's `effective_config`.
    `bundle` and `documents` (a caller's own model and data) replace those the run file names.
    `observer` watches the simulation and saves what it saw into the run directory (the
    red-team's `echelon.analysis.redteam.Recorder`).
    """
    from echelon.progress import RunProgress

    wall0 = time.perf_counter()
    out = RunDirectory(run_dir, force=force)
    out.write_yaml("config.yaml", run_cfg.model_dump(mode="json"))
    cfg = effective_config(run_cfg)
    prep = prepare(cfg, out.staging / "plans", bundle=bundle, documents=documents)
    bar = RunProgress(cfg.budget, clock="virtual", enabled=progress)
    binding = RunBinding(new_run_id(), config_digest(run_cfg))
    logs = open_audit_logs(out.staging, cfg, run_cfg.echelon.min_quorum, binding)
    recorder: RunRecorder | None = None
    try:
        sim = build_simulation(cfg, prep, lambda kind, fields: recorder.on_emit(kind, fields), logs, observer)
        recorder = RunRecorder(
            out.staging,
            cfg,
            prep,
            sim.global_plane,
            sim.egress_guards,  # every crossing counted once, at its sender
            runtime="simulation",
            clock=lambda: sim.now,
            tokens=lambda: sim.tokens,
            on_outer_step=bar.update,
        )
        with bar:
            sim.run(cfg.budget)
    finally:
        prep.trainer.close()
        for log in logs.values():
            log.close()
        if recorder is not None:
            recorder.close()
    if observer is not None:
        observer.save(out.staging)
    summary = recorder.finish(
        time.perf_counter() - wall0,
        middle_steps={b: p.middle_step for b, p in sim.boundary_planes.items()},
        intra_boundary_bytes=sim.traffic.intra_bytes,
        refused=len(sim.traffic.refused),
        compute_s=sim.compute_s,
    )
    out.commit()
    return summary.to_dict()
