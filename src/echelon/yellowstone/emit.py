"""The plan.json form of evaluated replicas and of the model (see `plan` for the schema)."""

from __future__ import annotations

from echelon.yellowstone import plan as P
from echelon.yellowstone.cost import (
    AnyNetwork,
    CostSettings,
    Layout,
    ReplicaCost,
    Tables,
    in_flight,
    stage_sites,
)
from echelon.yellowstone.model_profile import ModelProfile


def label(profile: ModelProfile, i: int, j: int) -> str:
    """Readable name of units [i, j): "embed + layers 0-9", "layer 31 + head", ..."""
    units = profile.units[i:j]
    parts = []
    layers = [int(u.name.split()[1]) for u in units if u.kind == "layer"]
    if units and units[0].kind == "embed":
        parts.append("embed")
    if layers:
        parts.append(f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}")
    if units and units[-1].kind == "head":
        parts.append("head")
    return " + ".join(parts)


def head_of(devices) -> str:
    """The cluster's head: the most reliable device, then the largest, then the fastest."""
    return max(devices, key=lambda d: (d.reliability, d.capacity, d.speed, d.id)).id


def replica_plan(
    rid: str, layout: Layout, cost: ReplicaCost, tables: Tables, net: AnyNetwork, settings: CostSettings
) -> P.ReplicaPlan:
    """The plan.json form of one evaluated replica; `net` is the network as this replica sees it
    (with the share of each link other replicas leave it)."""
    prof, m, n = tables.profile, settings.micro_batches, tables.n_units
    k = len(layout.clusters)
    clusters = [
        P.ClusterPlan(
            id=f"{rid}/c{c}",
            site=cl.site,
            devices=[d.id for d in cl.devices],
            shares=list(cl.shares),
            head=head_of(cl.devices),
            parallelism=cost.modes[c],
            raw_data=c == 0 or (layout.structure == "linear" and c == k - 1),
            memory_bytes={d.id: cost.device_memory[d.id] for d in cl.devices},
            capacity_bytes={d.id: d.capacity for d in cl.devices},
        )
        for c, cl in enumerate(layout.clusters)
    ]
    order = list(range(k)) + ([0] if layout.structure == "U" else [])
    ranges = [*layout.cuts, (n - 1, n)] if layout.structure == "U" else list(layout.cuts)
    fl = in_flight(layout.structure, k, m)
    stages = [
        P.StagePlan(
            index=s,
            cluster=clusters[c].id,
            units=ranges[s],
            label=label(prof, *ranges[s]),
            in_flight=fl[s],
            raw_data=any(u.raw_data for u in prof.units[ranges[s][0] : ranges[s][1]]),
            seconds_per_micro_batch=cost.stage_s[s],
        )
        for s, c in enumerate(order)
    ]
    p2p = prof.micro_batch * prof.seq_len * prof.activation_bytes
    sites = stage_sites(layout)
    edges = []
    for s in range(len(order) - 1):
        a, b = sites[s], sites[s + 1]
        link, route = net.link(a, b), net.route(a, b)
        assert link is not None and route is not None  # the layout was evaluated over this network
        nominal = min((net.physical(h).beta for h in net.hops(a, b)), default=link.beta)
        edges.append(
            P.EdgePlan(
                src_stage=s,
                dst_stage=s + 1,
                src_site=a,
                dst_site=b,
                bandwidth_gbps=nominal * 8 / 1e9,
                latency_ms=link.alpha * 1000,
                bytes_per_micro_batch=p2p,
                route=list(route),
                shared_gbps=link.beta * 8 / 1e9,
            )
        )
    predicted = P.Predicted(
        step_s=cost.step_s,
        tokens_per_s=cost.tokens_per_s,
        tokens_per_step=m * prof.micro_batch * prof.seq_len,
        bubble_fraction=cost.bubble,
        link_bytes_per_step=cost.link_bytes,
    )
    return P.ReplicaPlan(
        id=rid, structure=layout.structure, micro_batch=prof.micro_batch, micro_batches=m, clusters=clusters,
        stages=stages, edges=edges, predicted=predicted,
    )  # fmt: skip


def model_info(profile: ModelProfile, tables: Tables) -> P.ModelInfo:
    """The model as planned: its shape and every unit's costs (activation bytes as modelled)."""
    s = profile.shape
    return P.ModelInfo(
        name=profile.name, source=profile.source, trainable=profile.trainable, dtype=profile.dtype,
        seq_len=profile.seq_len,
        micro_batch=profile.micro_batch, lora_rank=profile.lora_rank, hidden=s.hidden, layers=s.layers,
        vocab=s.vocab,
        units=[
            P.UnitInfo(name=u.name, kind=u.kind, params=u.params, trainable=u.trainable, flops_per_token=u.flops,
                       stash_bytes_per_token=u.stash, raw_data=u.raw_data)
            for u in tables.units
        ],
    )  # fmt: skip
