"""Plane assembly: a run's planes, guards, identities and device compute from its config.

Both runtimes build what they run here, so a deployment runs exactly what the simulator runs:
`prepare` builds the model, the data, each device's shard and the local trainer;
`make_global_plane`, `make_boundary_plane` and `make_device_plane` build the planes from an
`effective_config`; `make_guards` a party's egress and ingress guards under the run's terms.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from echelon.config import BoundaryConfig, RunConfig
from echelon.contract.guard import AuditSink, EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.contract.provenance import Ledger
from echelon.errors import UserError
from echelon.parties import GLOBAL, boundary_address, boundary_party, device_address, device_party
from echelon.planes.aggregation import Aggregator, PlainAggregator
from echelon.planes.boundary import BoundaryPlane
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane
from echelon.planes.device import DevicePlane
from echelon.secagg import Identity, SecAggPlusAggregator, StageTimeouts, simulated_identities
from echelon.strategies import get_strategy
from echelon.tensors import Bounds
from echelon.train.data import Corpus, Document, build_corpus, load_documents, partition, partition_skew
from echelon.train.model import ModelBundle, build_model
from echelon.train.trainer import LocalTrainer, ScaffoldTrainer, derived_seed, layer_fragments
from echelon.yellowstone.execute.devices import PlannedDevice, PlannedTrainer


@dataclass
class Prepared:
    """Everything device compute needs: the model, the corpus and each device's shard."""

    bundle: ModelBundle
    corpus: Corpus
    shards: dict[str, np.ndarray]
    trainer: LocalTrainer
    skew: float
    fragments: int | Bounds  # the fragments of theta the outer steps synchronise in turn


def prepare(
    cfg: RunConfig,
    workdir: Path | None = None,
    local_devices: set[str] | None = None,
    *,
    bundle: ModelBundle | None = None,
    documents: list[Document] | None = None,
) -> Prepared:
    """Model, corpus, shards (for every device, those that join later included) and the local
    trainer for `cfg` (an `effective_config`).

    Devices that are replicas of a Yellowstone plan (`boundaries[].plan`) train on their plan's
    job, which keeps its checkpoints and logs under `workdir`; call `trainer.close()` after the run.
    `local_devices` names the devices whose rounds this process runs (None: all, as in simulation).
    A caller's own model (`bundle`, see `train.model.own_model`) and `documents` replace those
    the run file names.
    """
    bundle = bundle or build_model(cfg.model, cfg.seed)
    fragments = plane_fragments(cfg, bundle)
    docs = load_documents(cfg.data, cfg.seed, documents)
    corpus = build_corpus(docs, bundle.tokenizer, cfg.data, cfg.seed)
    device_ids = [d.id for _, d in cfg.all_devices]
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
        trainer = local(
            bundle,
            corpus,
            shards,
            cfg.train,
            cfg.echelon.proximal_mu,
            cfg.seed,
            decay_steps=_decay_steps(cfg),
        )
    skew = partition_skew(corpus.train_domain, parts)
    return Prepared(bundle, corpus, shards, trainer, skew, fragments)


def plane_fragments(cfg: RunConfig, bundle: ModelBundle) -> int | Bounds:
    """The fragments of theta the outer steps synchronise in turn: 1, or with Streaming DiLoCo the
    [lo, hi) ranges of P strided layer fragments (the trainable parameters are ordered so, before
    any optimiser sees them). Every party of a run computes the same ranges from the same model."""
    fragments = cfg.echelon.streaming.fragments
    return layer_fragments(bundle, fragments) if fragments > 1 else fragments


def _decay_steps(cfg: RunConfig) -> int | None:
    """The cosine schedule's length when the run file does not give one: the inner steps each
    device takes if the token budget were shared evenly."""
    t = cfg.train
    if cfg.budget.tokens is None:
        return None
    tokens_per_step = t.grad_accum * t.micro_batch * cfg.data.seq_len
    return max(1, cfg.budget.tokens // (tokens_per_step * len(cfg.all_devices)))


def outer_range(cfg: RunConfig) -> float | None:
    """+SA: the coordinate range of the outer round: secagg.outer_clip, or a boundary's own bound
    on Delta_b, ||Delta_b|| <= m * eta_mid * C for m middle steps (each delta_b is a weighted mean
    of deltas clipped to C), with m the longest interval the cadence schedules. Coordinates
    beyond it are clipped by the encoding and counted by the boundary (`outer_input_clipped`)."""
    e = cfg.echelon
    if e.secagg.outer_clip:
        return e.secagg.outer_clip
    if e.clip is None:
        return None
    longest = e.sync.h_max if get_strategy(cfg.strategy).cadence == "drift_aware" else e.sync.interval
    return longest * e.middle_lr * e.clip


def make_aggregator(cfg: RunConfig, identity: Identity | None = None, *, outer: bool = False) -> Aggregator:
    """The boundary's aggregation path (SecAgg+ by default, or the plain weighted sum), or with
    `outer` the global plane's secure round over the boundaries' Delta_b (+SA): always SecAgg+,
    quorum 1 (each Delta_b met the quorum inside its boundary), range `outer_range`.

    With a party's `identity` (a deployment's certificates, or a simulation's when
    secagg.malicious_server is on) the rounds are defended against a malicious server, unless
    secagg.malicious_server is false.
    """
    e, s = cfg.echelon, cfg.echelon.secagg
    if e.aggregation == "plain" and not outer:
        return PlainAggregator(min_quorum=e.min_quorum, timeout_s=e.aggregation_timeout_s)
    clip = e.clip
    if outer:
        clip = outer_range(cfg)
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
    cfg: RunConfig,
    party: str,
    dim: int,
    audit: AuditSink | None,
    ledger: Ledger | None = None,
    fragments: int | Bounds | None = None,
) -> tuple[EgressGuard, IngressGuard]:
    """`party`'s egress and ingress guards under the contract terms of `cfg` (an
    `effective_config`) for `dim`-vectors; a boundary's `ledger` lists the aggregates it minted;
    `fragments`: the fragments' ranges when they are layer-wise (`Prepared.fragments`)."""
    e = cfg.echelon
    parts = e.streaming.fragments if fragments is None else fragments
    terms = Terms(
        e.min_quorum, dim, parts if isinstance(parts, int) else tuple(parts), len(boundary_configs(cfg))
    )
    return EgressGuard(party, terms, audit, ledger), IngressGuard(party, terms, audit)


def simulated_identity(cfg: RunConfig) -> Callable[[str], Identity | None]:
    """party -> its identity in a simulation: from an in-memory CA derived from the seed when
    secagg.malicious_server is on, else none (the rounds then assume an honest-but-curious server)."""
    if not cfg.echelon.secagg.malicious_server:
        return lambda party: None
    parties: dict[str, str | None] = {boundary_party(b): None for b in boundary_configs(cfg)}
    parties |= {device_party(d.id): boundary_party(b) for b, d in cfg.all_devices}
    verifier, signers = simulated_identities(parties, cfg.seed)
    return lambda party: Identity(verifier, signers.get(party))


def boundary_configs(cfg: RunConfig) -> dict[str, BoundaryConfig]:
    """Every boundary that may take part: the run's, and one-device boundaries joining with their
    device (the flat baselines' form of a join, `churn.joins`)."""
    out = {b.id: b for b in cfg.boundaries}
    for j in cfg.churn.joins:
        if j.boundary not in out:
            out[j.boundary] = BoundaryConfig(id=j.boundary, devices=(j.device,), wan=cfg.network.wan)
    return out


def make_global_plane(
    cfg: RunConfig,
    theta0: torch.Tensor,
    identity: Identity | None = None,
    fragments: int | Bounds | None = None,
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
        outer_aggregator=make_aggregator(cfg, identity, outer=True) if strategy.secure_outer else None,
        fragments=e.streaming.fragments if fragments is None else fragments,
    )


def make_boundary_plane(
    cfg: RunConfig,
    boundary: BoundaryConfig,
    dim: int,
    identity: Identity | None = None,
    fragments: int | Bounds | None = None,
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
        lockstep=strategy.lockstep,
        outer_aggregator=make_aggregator(cfg, identity, outer=True) if strategy.secure_outer else None,
        outer_range=outer_range(cfg) if strategy.secure_outer else None,
        fragments=cfg.echelon.streaming.fragments if fragments is None else fragments,
        seed=derived_seed(cfg.seed, 4, zlib.crc32(boundary.id.encode())),
        round_tokens=cfg.tokens_per_round,
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
        alignment_gate=e.alignment_gate,
    )
