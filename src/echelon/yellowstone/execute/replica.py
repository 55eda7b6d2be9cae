"""One rank's part of one pipeline replica: its stages, its cluster, the schedule and the optimizer.

Every rank of a replica builds the whole model from the same source and seed, keeps the units of
its cluster's stages (`UnitRange`), wraps them in its cluster's data parallelism, and (on cluster
heads) in `torch.distributed.pipelining` stages driven by 1F1B. The replica's leader (the head of
cluster 0, cleared for the boundary's raw data) drives everything else with commands broadcast
over the replica's process group: train a step, set the trainable state, collect it, checkpoint.

Only cleared ranks touch token ids: the leader feeds them, its cluster members receive their rows,
and the loss head reads labels on the leader (U-shaped and single replicas) or on the last,
cleared cluster (linear replicas). Between stages only hidden states and their gradients move.

A training step is the local objective of the device plane (`echelon.train.trainer`): the mean
next-token loss over m micro-batches of B sequences, plus the proximal gradient mu (theta - anchor)
added once, then AdamW. Checkpoints are `torch.distributed.checkpoint` directories of the
trainable parameters and the AdamW state under the whole model's names, so a checkpoint taken
under one layout loads under the layout a backup leaves.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.pipelining import PipelineStage, Schedule1F1B
from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime
from torch.distributed.tensor import DTensor, distribute_tensor

from echelon.train.model import ModelBundle
from echelon.yellowstone.execute import p2p
from echelon.yellowstone.execute.cluster import (
    END,
    ClusterStage,
    DataParallel,
    Labels,
    Link,
    MemberSlot,
    local_step,
    serve_member,
    wait,
)
from echelon.yellowstone.execute.schedule import rank_orders
from echelon.yellowstone.execute.stages import UnitRange, canonical_name, causal_lm_of
from echelon.yellowstone.execute.topology import ReplicaSpec


@dataclass(frozen=True)
class Optimisation:
    """The local objective's knobs: AdamW and the proximal weight mu (0 disables)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    mu: float = 0.0


@dataclass
class Placement:
    """Where the processes of a job are: device id -> global rank, and this process's device."""

    device: str
    ranks: dict[str, int]
    torch_device: torch.device
    dtype: torch.dtype = torch.float32

    @property
    def rank(self) -> int:
        return self.ranks[self.device]


@dataclass
class ReplicaGroups:
    """The process groups of one replica: all its ranks, each cluster's ranks (data parallelism),
    and the cluster heads (the pipeline). None where this rank is not a member."""

    replica: dist.ProcessGroup | None
    clusters: list[dist.ProcessGroup | None]
    pipeline: dist.ProcessGroup | None


def make_groups(replicas: tuple[ReplicaSpec, ...], ranks: dict[str, int]) -> dict[str, ReplicaGroups]:
    """Every replica's groups. torch.distributed wants every rank of the job to create every group,
    in the same order, members or not: every process calls this with the same topology."""

    def group(members: list[int]) -> dist.ProcessGroup | None:
        pg = dist.new_group(sorted(members))
        return None if pg == dist.GroupMember.NON_GROUP_MEMBER else pg

    out = {}
    for r in replicas:
        replica = group([ranks[d] for d in r.devices])
        clusters = [group([ranks[d] for d in c.devices]) if len(c.devices) > 1 else None for c in r.clusters]
        pipeline = group([ranks[c.head] for c in r.clusters]) if len(r.clusters) > 1 else None
        out[r.id] = ReplicaGroups(replica, clusters, pipeline)
    return out


@dataclass
class _Slot:
    stage: int  # index in the replica's pipeline
    module: UnitRange
    dp: DataParallel
    optimizer: torch.optim.Optimizer | None
    params: dict[str, nn.Parameter] = field(default_factory=dict)


class ReplicaRank:
    """This process's part of replica `spec` (see the module docstring)."""

    def __init__(
        self,
        spec: ReplicaSpec,
        place: Placement,
        groups: ReplicaGroups,
        bundle: ModelBundle,
        seq_len: int,
        opt: Optimisation,
    ) -> None:
        self.spec, self.place, self.opt = spec, place, opt
        self.m = spec.micro_batches
        self.steps = 0
        ranks = place.ranks
        self.group = groups.replica
        self.leader = ranks[spec.leader]
        self.cluster = next(i for i, c in enumerate(spec.clusters) if place.device in c.devices)
        c = spec.clusters[self.cluster]
        self.link = Link(
            ranks=tuple(ranks[d] for d in c.devices),
            devices=c.devices,
            shares=c.shares,
            head=c.devices.index(c.head),
            me=c.devices.index(place.device),
            seq_len=seq_len,
            hidden=causal_lm_of(bundle.model).config.hidden_size,
            dtype=place.dtype,
            device=place.torch_device,
        )
        dp_group = groups.clusters[self.cluster]
        self.pipe_group = groups.pipeline if self.link.is_head else None
        lm = causal_lm_of(bundle.model)
        self.offsets = _offsets(bundle)
        self.slots: list[_Slot] = []
        taken: set[int] = set()
        for stage in spec.stages_of(self.cluster):
            module = UnitRange(lm, *stage.units, checkpointing=c.checkpointing).to(place.torch_device)
            params = {
                canonical_name(n): p
                for n, p in module.named_parameters()
                if p.requires_grad and id(p) not in taken
            }
            dp = DataParallel(module, c.parallelism, dp_group, place.torch_device)
            # FSDP replaced the parameters with sharded ones: read them again by name.
            by_name = dict(module.named_parameters())
            params = {name: by_name[name] for name in params}
            taken |= {id(p) for p in params.values()}
            optimizer = (
                torch.optim.AdamW(
                    list(params.values()),
                    lr=opt.lr,
                    betas=opt.betas,
                    weight_decay=opt.weight_decay,
                    foreach=True,
                )
                if params
                else None
            )
            self.slots.append(_Slot(stage.index, module, dp, optimizer, params))
        self.params = {n: p for s in self.slots for n, p in s.params.items()}
        self.anchor: dict[str, torch.Tensor] = {}
        self.labels = Labels() if self.cluster == spec.loss_cluster else None
        self.is_loss_rank = self.link.is_head and self.cluster == spec.loss_cluster
        if self.link.is_head:
            self._build_schedule()
        else:
            self.member_slots = {
                k: MemberSlot(s.dp, first=s.module.first, loss=s.module.last)
                for k, s in enumerate(self.slots)
            }

    # -- construction ------------------------------------------------------------------------------

    def _build_schedule(self) -> None:
        spec, labels = self.spec, self.labels
        self.cluster_stages = [
            ClusterStage(k, s.dp, self.link, self.m, labels if s.module.last else None)
            for k, s in enumerate(self.slots)
        ]
        if spec.structure == "single":
            self.schedule = None
            return
        pipe_ranks = sorted(self.place.ranks[x.head] for x in spec.clusters)
        group_rank = {c: pipe_ranks.index(self.place.ranks[x.head]) for c, x in enumerate(spec.clusters)}
        mapping = {s.index: group_rank[s.cluster] for s in spec.stages}
        stages = []
        for s, cs in zip(self.slots, self.cluster_stages, strict=True):
            # Shapes given up front: pipelining then never runs the stage on stand-in tensors,
            # which would send them to the cluster's members.
            inputs, outputs = self._stage_shapes(s.module)
            stage = PipelineStage(
                cs,
                s.stage,
                len(spec.stages),
                self.place.torch_device,
                input_args=inputs,
                output_args=outputs,
                group=self.pipe_group,
            )
            stage.stage_index_to_group_rank = mapping
            stages.append(stage)

        def loss_fn(loss: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
            return loss  # the loss stage already computed the micro-batch's mean token loss

        if spec.structure == "U":
            self.schedule = _PipelineScheduleRuntime(stages, self.m, loss_fn=loss_fn, scale_grads=False)
            orders = rank_orders([mapping[s.index] for s in spec.stages], self.m)
            self.schedule._prepare_schedule_with_comms(orders)
        else:
            (stage,) = stages
            self.schedule = Schedule1F1B(stage, self.m, loss_fn=loss_fn, scale_grads=False)

    def _stage_shapes(self, module: UnitRange) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta tensors of one micro-batch's stage input and output."""
        rows, t, h = self.spec.micro_batch, self.link.seq_len, self.link.hidden
        meta = torch.device("meta")
        hidden = torch.empty((rows, t, h), dtype=self.place.dtype, device=meta, requires_grad=True)
        inputs = torch.empty((rows, t), dtype=torch.long, device=meta) if module.first else hidden
        outputs = (
            torch.empty((), dtype=torch.float32, device=meta, requires_grad=True) if module.last else hidden
        )
        return inputs, outputs

    # -- one step -------------------------------------------------------------------------------

    def train_step(self, tokens: torch.Tensor | None) -> float | None:
        """One optimizer step of the local objective; the leader passes the step's m x B token ids
        and gets the mean loss back (None elsewhere)."""
        loss = self._forward_backward(tokens)
        self._optimizer_step()
        self.steps += 1
        return loss

    def _forward_backward(self, tokens: torch.Tensor | None) -> float | None:
        spec, link = self.spec, self.link
        if not link.is_head:
            serve_member(link, self.member_slots)
            return None
        for cs in self.cluster_stages:
            cs.reset()
        leader = self.place.rank == self.leader
        linear = spec.structure == "linear"
        device = self.place.torch_device
        tokens = tokens.to(device) if tokens is not None else None
        labels = tokens
        if linear and leader:
            self._send_labels(tokens)
        elif linear and self.is_loss_rank:
            labels = self._receive_labels()
        if self.is_loss_rank:
            self.labels.micro_batches = list(labels.tensor_split(self.m))
        losses: list[torch.Tensor] = []
        if self.schedule is None:  # the whole model on this cluster: its ranks run their rows alone
            (cs,) = self.cluster_stages
            losses = local_step(cs, tokens, self.m)
        else:
            args = (tokens,) if leader else ()
            kwargs: dict[str, Any] = {"target": labels, "losses": losses} if self.is_loss_rank else {}
            kwargs["return_outputs"] = False  # the loss head outputs the loss: nothing to merge
            self.schedule.step(*args, **kwargs)
        if link.members:
            link.header(END, 0, 0)
        loss = float(torch.stack(losses).mean()) if losses else None
        if linear and self.is_loss_rank:
            self._send_loss(loss)
        elif linear and leader:
            loss = self._receive_loss()
        return loss if leader else None

    # Linear replicas: the leader hands the labels to the last cluster (cleared too) and gets the
    # loss back; U-shaped and single replicas compute the loss on the leader itself.

    @property
    def _loss_head(self) -> str:
        return self.spec.clusters[self.spec.loss_cluster].head

    def _send_labels(self, tokens: torch.Tensor) -> None:
        wait(p2p.isend(tokens, self.place.ranks[self._loss_head]), self._loss_head, "send labels to")

    def _receive_labels(self) -> torch.Tensor:
        shape = (self.m * self.spec.micro_batch, self.link.seq_len)
        out = torch.empty(shape, dtype=torch.long, device=self.place.torch_device)
        wait(p2p.irecv(out, self.leader), self.spec.leader, "receive labels from")
        return out

    def _send_loss(self, loss: float | None) -> None:
        wait(
            p2p.isend(torch.tensor(loss, dtype=torch.float64, device=self.place.torch_device), self.leader),
            self.spec.leader,
            "send the loss to",
        )

    def _receive_loss(self) -> float:
        out = torch.zeros((), dtype=torch.float64, device=self.place.torch_device)
        wait(p2p.irecv(out, self.place.ranks[self._loss_head]), self._loss_head, "receive the loss from")
        return float(out)

    @torch.no_grad()
    def _optimizer_step(self) -> None:
        """Mean over micro-batches, the proximal gradient, then AdamW (as the device plane's trainer)."""
        params = [p for p in self.params.values() if p.grad is not None]
        if params:
            grads = [p.grad for p in params]
            torch._foreach_div_(grads, self.m)
            if self.opt.mu > 0 and self.anchor:
                # mu * (theta - anchor), exactly 0 at the anchor (mu*theta - mu*anchor would round).
                names = [n for n, p in self.params.items() if p.grad is not None]
                distance = torch._foreach_sub(params, [self.anchor[n] for n in names])
                torch._foreach_add_(grads, distance, alpha=self.opt.mu)
        for slot in self.slots:
            if slot.optimizer is not None:
                slot.optimizer.step()
                slot.optimizer.zero_grad(set_to_none=True)

    # -- the trainable state (the vector the planes exchange) ------------------------------------

    @torch.no_grad()
    def set_state(self, theta: torch.Tensor, anchor: torch.Tensor | None = None) -> None:
        """Copy the flat trainable vector into this rank's parameters; `anchor` pulls the proximal term."""
        for name, p in self.params.items():
            p.copy_(self._local(theta, name, p))
        self.anchor = {}
        if anchor is not None:
            self.anchor = {name: self._local(anchor, name, p).clone() for name, p in self.params.items()}

    def _local(self, vector: torch.Tensor, name: str, p: torch.Tensor) -> torch.Tensor:
        start, numel, shape = self.offsets[name]
        full = vector[start : start + numel].view(shape).to(device=p.device, dtype=p.dtype)
        if isinstance(p, DTensor):
            return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        return full

    @torch.no_grad()
    def collect_state(self) -> dict[str, torch.Tensor]:
        """The full trainable tensors this rank's cluster holds, returned on the cluster head."""
        out = {}
        for name, p in self.params.items():
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            if self.link.is_head:
                out[name] = full.float().cpu()
        return out

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write this replica's checkpoint (a collective over the replica's ranks)."""
        dcp.save({"rank": _RankState(self)}, checkpoint_id=str(directory), process_group=self.group)

    def load(self, directory: Path) -> None:
        dcp.load({"rank": _RankState(self)}, checkpoint_id=str(directory), process_group=self.group)


class _RankState(Stateful):
    """A rank's trainable parameters and AdamW state under the whole model's names, plus the step."""

    def __init__(self, rank: ReplicaRank) -> None:
        self.rank = rank

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": torch.tensor(self.rank.steps)}
        options = StateDictOptions(ignore_frozen_params=True)
        for slot in self.rank.slots:
            if slot.optimizer is None:
                continue
            model = get_model_state_dict(slot.module, options=options)
            out.update({f"model.{k}": v for k, v in model.items() if k in slot.params})
            state = get_optimizer_state_dict(slot.module, slot.optimizer, options=options)["state"]
            for name, values in state.items():
                out.update({f"optim.{name}.{key}": v for key, v in values.items()})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rank.steps = int(state["steps"])
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        for slot in self.rank.slots:
            if slot.optimizer is None:
                continue
            model = {k: state[f"model.{k}"] for k in slot.params}
            set_model_state_dict(slot.module, model, options=options)
            current = get_optimizer_state_dict(slot.module, slot.optimizer, options=options)
            for name, values in current["state"].items():
                for key in values:
                    values[key] = state[f"optim.{name}.{key}"]
            set_optimizer_state_dict(slot.module, slot.optimizer, current, options=options)


def _offsets(bundle: ModelBundle) -> dict[str, tuple[int, int, torch.Size]]:
    """Canonical name -> (offset, numel, shape) of each trainable parameter in the flat vector."""
    out, offset = {}, 0
    for name, p in zip(bundle.names, bundle.trainable, strict=True):
        out[canonical_name(name)] = (offset, p.numel(), p.shape)
        offset += p.numel()
    return out


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def prune(directory: Path, keep: set[str]) -> None:
    """Remove checkpoint directories under `directory` not named in `keep`."""
    for child in directory.iterdir():
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
