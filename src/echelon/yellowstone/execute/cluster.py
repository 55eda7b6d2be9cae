"""A cluster runs its stages data-parallel over uneven shares of each micro-batch.

torch.distributed.pipelining wants one rank per stage, while a plan's cluster is several devices
splitting each micro-batch of B sequences by `shares` (ARCHITECTURE.md §5). The bridge: the
cluster's head rank is the pipeline stage (`ClusterStage`, what `PipelineStage` wraps); for every
micro-batch it sends each member its share of the stage input (and, on a loss stage, of the
labels), computes its own share, and gathers the members' outputs; the backward pass returns each
member its share of the output gradient and gathers their input gradients. The transfers are
torch.distributed point-to-point operations inside autograd functions, so the pipeline schedule
drives the members without knowing them. Members run `serve_member`, which follows the head's
headers (FORWARD / BACKWARD / END). A cluster that runs the whole model (a single-stage replica:
token ids in, the loss out) needs none of that per micro-batch: each member gets its rows of the
step's micro-batches at once and runs them on its own (`local_step`, header STEP), and only its
loss sums come back, so the devices are not held in lockstep four times a micro-batch.

Gradients inside a cluster are reduced by DDP (a SUM communication hook) or FSDP2 (sum reduction)
on the last backward of a step only; every micro-batch before it accumulates locally. Each rank's
gradient is the partial sum over the sequences it computed, so summing (not averaging) over the
cluster is what makes uneven shares exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from echelon.yellowstone.execute import p2p
from echelon.yellowstone.execute.stages import UnitRange, predicted_tokens, token_loss_sum

FORWARD, BACKWARD, END, STEP = 1, 2, 3, 4
HEADER_DTYPE = torch.int32  # headers are (op, slot, micro-batch, last); never token ids (int64)


class PeerTimeout(RuntimeError):
    """A point-to-point transfer with a named peer did not complete in time."""


@dataclass
class Link:
    """One cluster as a rank of it sees it: global ranks and device ids in plan order, shares."""

    ranks: tuple[int, ...]
    devices: tuple[str, ...]
    shares: tuple[int, ...]
    head: int  # index of the head in `ranks`
    me: int  # index of this rank in `ranks`
    seq_len: int
    hidden: int
    dtype: torch.dtype
    device: torch.device

    @property
    def is_head(self) -> bool:
        return self.me == self.head

    @property
    def members(self) -> list[int]:
        return [i for i in range(len(self.ranks)) if i != self.head]

    def rows(self, i: int) -> slice:
        """The rows of a micro-batch that device i computes."""
        start = sum(self.shares[:i])
        return slice(start, start + self.shares[i])

    def send(self, tensor: torch.Tensor, to: int) -> dist.Work:
        return p2p.isend(tensor, self.ranks[to])

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, frm: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        wait(p2p.irecv(out, self.ranks[frm]), self.devices[frm], "receive from")
        return out

    def header(self, op: int, slot: int, micro_batch: int, last: bool = False) -> None:
        msg = torch.tensor([op, slot, micro_batch, int(last)], dtype=HEADER_DTYPE, device=self.device)
        wait_all([(self.send(msg, i), self.devices[i]) for i in self.members], "send a header to")

    def read_header(self) -> tuple[int, int, int, bool]:
        op, slot, mb, last = self.recv((4,), HEADER_DTYPE, self.head).tolist()
        return op, slot, mb, bool(last)


def wait(work: dist.Work, peer: str, what: str) -> None:
    """Wait for a transfer; a failure or timeout names the peer device."""
    try:
        work.wait()
    except RuntimeError as e:
        raise PeerTimeout(f"could not {what} device {peer}: {e}") from e


def wait_all(works: list[tuple[dist.Work, str]], what: str) -> None:
    for work, peer in works:
        wait(work, peer, what)


# -- data parallelism inside a cluster ----------------------------------------------------------


def _sum_hook(group, bucket):  # unannotated: DDP checks real annotations, these would be strings
    """DDP communication hook: all-reduce SUM (DDP's default divides by the group size)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DataParallel:
    """One stage module of a cluster under DDP or FSDP2 (or alone on a one-device cluster)."""

    def __init__(
        self, module: UnitRange, mode: str, group: dist.ProcessGroup | None, device: torch.device
    ) -> None:
        self.module, self.mode = module, mode.split("+")[0]
        self.wrapped: nn.Module = module
        trainable = any(p.requires_grad for p in module.parameters())
        if group is None or group.size() == 1:
            self.mode = "single"
        elif self.mode == "DDP" and trainable:
            ddp = DistributedDataParallel(
                module,
                process_group=group,
                forward_sync_buffers=False,
                device_ids=[device.index] if device.type == "cuda" else None,
            )
            ddp.register_comm_hook(group, _sum_hook)
            self.wrapped = ddp
        elif self.mode == "FSDP":
            from torch.distributed.device_mesh import DeviceMesh

            mesh = DeviceMesh.from_group(group, device.type)
            for layer in module.model.layers.values():
                fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)
            for m in module.modules():
                if isinstance(m, FSDPModule):
                    m.set_gradient_divide_factor(1.0)
                    m.set_force_sum_reduction_for_comms(True)
        else:
            self.mode = "single"  # DDP over frozen weights only: nothing to reduce

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "DDP":
            with self.wrapped.no_sync():
                return self.wrapped(x)
        return self.wrapped(x)

    def before_backward(self, outputs: torch.Tensor, last: bool) -> None:
        """DDP: all-reduce gradients in this backward only when it is the step's last one. FSDP
        reduce-scatters every micro-batch's gradients and reshards after every forward and
        backward (FSDP2's defaults), so a rank holds no more than the plan prices it: its shard of
        the stage, the one layer being computed, and its shard of the accumulated gradients.
        Deferring the reduction to the last backward (as `torch.distributed.pipelining` does for
        an FSDP stage) would hold every layer's whole weights and gradients through the step."""
        if self.mode == "DDP" and last:
            self.wrapped.reducer.prepare_for_backward([outputs])


# -- the head's autograd functions --------------------------------------------------------------


class _Scatter(torch.autograd.Function):
    """Head: keep its own rows of a micro-batch, send the members theirs; backward gathers the
    members' input gradients into the gradient of the whole micro-batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, link: Link) -> torch.Tensor:
        ctx.link, ctx.shape = link, x.shape
        wait_all([(link.send(x[link.rows(i)], i), link.devices[i]) for i in link.members], "send to")
        return x[link.rows(link.head)].clone()

    @staticmethod
    def backward(ctx, grad_own: torch.Tensor):
        link = ctx.link
        grad = torch.empty(ctx.shape, dtype=grad_own.dtype, device=grad_own.device)
        grad[link.rows(link.head)] = grad_own
        for i in link.members:
            rows = link.rows(i)
            grad[rows] = link.recv(grad[rows].shape, grad_own.dtype, i)
        return grad, None


class _Gather(torch.autograd.Function):
    """Head: combine its output with the members' (rows concatenated, or loss sums added); the
    backward sends each member its part of the output gradient after telling it to go back."""

    @staticmethod
    def forward(ctx, own: torch.Tensor, link: Link, slot: int, mb: int, before: Callable) -> torch.Tensor:
        ctx.link, ctx.slot, ctx.mb, ctx.before = link, slot, mb, before
        parts = {link.head: own}
        for i in link.members:
            shape = own.shape if own.dim() == 0 else (link.shares[i], *own.shape[1:])
            parts[i] = link.recv(shape, own.dtype, i)
        if own.dim() == 0:
            return sum(parts[i] for i in range(len(link.ranks)))
        return torch.cat([parts[i] for i in range(len(link.ranks))])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        link, last = ctx.link, ctx.before()
        link.header(BACKWARD, ctx.slot, ctx.mb, last)
        scalar = grad.dim() == 0
        works = [
            (link.send(grad if scalar else grad[link.rows(i)], i), link.devices[i]) for i in link.members
        ]
        wait_all(works, "send a gradient to")
        return (grad if scalar else grad[link.rows(link.head)]), None, None, None, None


# -- a stage as its cluster runs it --------------------------------------------------------------


class Labels:
    """The labels of the current step on a rank cleared for them, one tensor per micro-batch."""

    def __init__(self) -> None:
        self.micro_batches: list[torch.Tensor] = []


class ClusterStage(nn.Module):
    """A stage run by a cluster, as its head sees it: the module `PipelineStage` wraps.

    `slot` numbers the cluster's stages (0, and 1 for the loss head of a U-shaped cluster 0).
    A loss stage returns the micro-batch's mean next-token loss instead of logits.
    """

    def __init__(
        self,
        slot: int,
        dp: DataParallel,
        link: Link,
        micro_batches: int,
        labels: Labels | None,
    ) -> None:
        super().__init__()
        self.slot, self.dp, self.link, self.micro_batches, self.labels = slot, dp, link, micro_batches, labels
        self.inner = dp.module  # registered so the pipeline schedule sees the stage's parameters
        self.forwards = 0
        self.backwards = 0

    def reset(self) -> None:
        self.forwards = self.backwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mb = self.forwards
        self.forwards += 1
        link = self.link
        labels = self.labels.micro_batches[mb] if self.labels is not None else None
        if not link.members:
            out = self.dp(x)
            if labels is not None:
                out = token_loss_sum(out, labels) / predicted_tokens(*labels.shape)
            return out
        link.header(FORWARD, self.slot, mb)
        if x.is_floating_point():
            own_x = _Scatter.apply(x, link)
        else:
            wait_all([(link.send(x[link.rows(i)], i), link.devices[i]) for i in link.members], "send to")
            own_x = x[link.rows(link.head)]
        if labels is not None:
            wait_all(
                [(link.send(labels[link.rows(i)], i), link.devices[i]) for i in link.members],
                "send labels to",
            )
        out = self.dp(own_x)
        if labels is not None:
            out = token_loss_sum(out, labels[link.rows(link.head)])
        out = _Gather.apply(out, link, self.slot, mb, self._before_backward(out))
        if labels is not None:
            out = out / predicted_tokens(*labels.shape)
        return out

    def _before_backward(self, own: torch.Tensor) -> Callable[[], bool]:
        """Called by the backward of this micro-batch: the step's last one reduces gradients
        (1F1B runs a stage's backwards in micro-batch order)."""

        def before() -> bool:
            self.backwards += 1
            last = self.backwards == self.micro_batches
            self.dp.before_backward(own, last)
            return last

        return before


@dataclass
class MemberSlot:
    """What a member computes for one of its cluster's stages."""

    dp: DataParallel
    first: bool  # input is token ids
    loss: bool  # computes the loss from labels
    stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _run_rows(dp: DataParallel, rows: list[torch.Tensor], sequences: int) -> torch.Tensor:
    """Forward, loss and backward of one rank's rows of each micro-batch of a whole-model stage
    (`sequences` sequences in a whole micro-batch, the loss divisor's); its loss sums, in order.
    Gradients are reduced in the last backward only, as on the per-micro-batch route."""
    sums = []
    for k, x in enumerate(rows):
        out = token_loss_sum(dp(x), x)
        dp.before_backward(out, last=k == len(rows) - 1)
        (out / predicted_tokens(sequences, x.shape[1])).backward()
        sums.append(out.detach())
    return torch.stack(sums)


def local_step(stage: ClusterStage, tokens: torch.Tensor, m: int) -> list[torch.Tensor]:
    """The head's part of a whole-model cluster's step over `tokens` (m micro-batches, labels the
    same rows): each member gets its rows of every micro-batch in one transfer and runs them on its
    own; the mean loss of each micro-batch, from every rank's loss sums."""
    link = stage.link
    chunks = tokens.tensor_split(m)
    link.header(STEP, stage.slot, m)
    works = [
        (link.send(torch.cat([c[link.rows(i)] for c in chunks]), i), link.devices[i]) for i in link.members
    ]
    wait_all(works, "send to")
    sums = _run_rows(stage.dp, [c[link.rows(link.head)] for c in chunks], chunks[0].shape[0])
    for i in link.members:
        sums = sums + link.recv((m,), sums.dtype, i)
    return list(sums / predicted_tokens(chunks[0].shape[0], tokens.shape[1]))


def serve_member(link: Link, slots: dict[int, MemberSlot]) -> None:
    """A member's part of one step: follow the head's headers until END."""
    share = link.shares[link.me]
    hidden = (share, link.seq_len, link.hidden)
    tokens = (share, link.seq_len)
    while True:
        op, slot, mb, last = link.read_header()
        if op == END:
            return
        s = slots[slot]
        if op == STEP:  # `mb` is the step's micro-batch count
            rows = link.recv((mb * share, link.seq_len), torch.long, link.head).tensor_split(mb)
            sums = _run_rows(s.dp, list(rows), sum(link.shares))
            wait(link.send(sums, link.head), link.devices[link.head], "send to")
        elif op == FORWARD:
            x = link.recv(tokens if s.first else hidden, torch.long if s.first else link.dtype, link.head)
            labels = link.recv(tokens, torch.long, link.head) if s.loss else None
            if not s.first:
                x.requires_grad_(True)
            out = s.dp(x)
            if labels is not None:
                out = token_loss_sum(out, labels)
            wait(link.send(out.detach(), link.head), link.devices[link.head], "send to")
            s.stash[mb] = (x, out)
        elif op == BACKWARD:
            x, out = s.stash.pop(mb)
            grad = link.recv(tuple(out.shape), out.dtype, link.head)
            s.dp.before_backward(out, last)
            out.backward(grad)
            if not s.first:
                wait(link.send(x.grad, link.head), link.devices[link.head], "send a gradient to")
        else:
            raise RuntimeError(f"unknown header op {op} from the cluster head")
