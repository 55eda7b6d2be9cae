"""Measurements `echelon profile` turns into fleet entries: model steps and the local link.

- `measure_model_steps`: the seconds one training step of the model (forward and backward over
  `micro_batches` micro-batches, then one AdamW update, as a plan's step runs) takes on each of
  `ranks` processes running at once on this machine, each with `threads` torch threads. Processes that share a CPU slow each other down; measuring them
  together is what makes the figure the one a plan's ranks on this machine see. The result goes
  into the fleet file as `measured_steps`, from which the cost model calibrates each device
  (`cost.calibrate`: achieved FLOP/s = the step's FLOPs / its time). On two or more ranks the
  processes then shard two decoder layers of the model with FSDP2 over gloo, as the executor shards
  a cluster's stage, and time what that adds to a micro-batch's forward and backward per layer
  (its all-gathers, gradient reduce-scatter and FSDP's copies), over two ranks and over all of
  them: `fsdp_s` by ring size, which the cost model charges per micro-batch in proportion to the
  weight an FSDP cluster holds (`cost.fsdp_rates`). Ranks 0 and 1 then run a two-stage
  `Schedule1F1B` of stages that compute next to nothing and time what the pipelining runtime
  adds to a stage's forward and backward of a micro-batch beyond its hand-offs (`stage_s`, which
  the cost model charges to every pipeline stage per micro-batch: `cost.stage_rates`). DDP is
  timed beside FSDP: what reducing a step's gradients adds to its last backward (`ddp_s`, charged
  once per step in proportion to the gradient bytes a DDP cluster reduces: `cost.ddp_rates`).
- `measure_local_link`: latency and bandwidth of point-to-point transfers between two processes
  of this machine over gloo, the engine that carries a plan's activations here.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class StepProbe:
    """What to time: the built-in preset or a checkpoint (`source`), training mode and shape."""

    source: str
    trainable: str
    lora_rank: int
    seq_len: int
    micro_batch: int
    micro_batches: int = 1
    steps: int = 8
    threads: int = 1


def _model(probe: StepProbe, seed: int = 0):
    from pathlib import Path

    from echelon.config import LoraSettings, ModelConfig
    from echelon.train.model import build_model

    preset = probe.source if probe.source == "tiny" else None
    lora = LoraSettings(r=probe.lora_rank, alpha=2.0 * probe.lora_rank, dropout=0.0)
    path = None if preset else Path(probe.source)
    return build_model(ModelConfig(preset=preset, path=path, trainable=probe.trainable, lora=lora), seed)


def _stage_input(stage: torch.nn.Module, group: dist.ProcessGroup, probe: StepProbe) -> torch.Tensor:
    """A stage input (hidden states that need their gradient, as a middle stage's do) of this
    rank's share of a micro-batch split over `group`."""
    size = group.size()
    rows = max(1, probe.micro_batch // size)
    x = torch.randn(
        rows, probe.seq_len, stage.config.hidden_size, generator=torch.Generator().manual_seed(size)
    )
    return x.requires_grad_(True)


def _median_s(run, group: dist.ProcessGroup, steps: int) -> float:
    """Median seconds of `run()` over `steps` calls, after one to warm up (DDP builds its buckets
    there, FSDP lays out its buffers) and a barrier, so the ranks of `group` time it together."""
    run()
    dist.barrier(group=group)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fsdp_overhead(stage: torch.nn.Module, group: dist.ProcessGroup, probe: StepProbe) -> float:
    """Seconds FSDP2 over `group` adds to a micro-batch's forward and backward of `stage` on this
    rank, which runs its share of the micro-batch: the median sharded less the median unsharded.
    `stage`'s parameters are then shards."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    x = _stage_input(stage, group, probe)
    plain = _median_s(lambda: stage(x).sum().backward(), group, probe.steps)
    mesh = DeviceMesh.from_group(group, "cpu")
    for layer in stage.model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(stage, mesh=mesh)
    return max(_median_s(lambda: stage(x).sum().backward(), group, probe.steps) - plain, 0.0)


def _ddp_overhead(stage: torch.nn.Module, group: dist.ProcessGroup, probe: StepProbe) -> float:
    """Seconds DDP over `group` adds to the backward that reduces a step's gradients (the step's
    last; the executor runs the others under `no_sync`) of `stage` on this rank, which runs its
    share of the micro-batch: the median reducing less the median under `no_sync`. What it adds
    is the gradient all-reduce, DDP's bucket copies and the wait for the slower rank."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    x = _stage_input(stage, group, probe)
    ddp = DistributedDataParallel(stage, process_group=group, forward_sync_buffers=False)

    def backward(reduce: bool) -> None:
        with contextlib.nullcontext() if reduce else ddp.no_sync():
            ddp(x).sum().backward()

    quiet = _median_s(lambda: backward(False), group, probe.steps)
    return max(_median_s(lambda: backward(True), group, probe.steps) - quiet, 0.0)


def _stage_overhead(group: dist.ProcessGroup, probe: StepProbe) -> float:
    """Seconds `torch.distributed.pipelining` adds to a stage's forward and backward of one
    micro-batch beyond its hand-offs, on this rank of a two-rank `group`: a `Schedule1F1B` of two
    stages that compute next to nothing takes, by the cost model's formula, (m + 1) x (that + one
    hand-off), the hand-off being the latency of a 4-byte message timed on the same pair."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    me, peer = group.rank(), 1 - group.rank()
    m = max(probe.micro_batches, 2)
    width = 8
    stage = PipelineStage(
        torch.nn.Linear(width, width),
        me,
        2,
        torch.device("cpu"),
        input_args=torch.empty(1, width, device="meta", requires_grad=me == 1),  # a hidden state
        output_args=torch.empty(1, width, device="meta", requires_grad=True),
        group=group,
    )
    schedule = Schedule1F1B(stage, m, loss_fn=lambda out, _target: out.sum())
    x, target = torch.zeros(m, width), torch.zeros(m, width)

    def step() -> float:
        t0 = time.perf_counter()
        if me == 0:
            schedule.step(x)
        else:
            schedule.step(target=target, losses=[])
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    pipelined = statistics.median(step() for _ in range(max(probe.steps, 10)))
    message, peer_rank = torch.zeros(1), dist.get_global_rank(group, peer)

    def round_trip() -> float:
        t0 = time.perf_counter()
        if me == 0:
            dist.send(message, peer_rank, group=group)
            dist.recv(message, peer_rank, group=group)
        else:
            dist.recv(message, peer_rank, group=group)
            dist.send(message, peer_rank, group=group)
        return time.perf_counter() - t0

    dist.barrier(group=group)
    hand_off = statistics.median(round_trip() for _ in range(50)) / 2
    return max(pipelined / (m + 1) - hand_off, 0.0)


def _distributed_costs(
    rank: int, ranks: int, port: int, lm: torch.nn.Module, probe: StepProbe
) -> tuple[dict[int, float], dict[int, float], float | None]:
    """On this rank, (seconds FSDP2 adds to a micro-batch of one decoder layer by ring size,
    seconds DDP adds to a step's reducing backward per decoder layer by ring size, the pipelining
    runtime's seconds per stage and micro-batch or None on ranks past 1).

    FSDP and DDP: over ranks 0 and 1, and over all `ranks` (gloo), as the executor runs a
    cluster's stage; a stage of the first two layers (a layer's gathers may overlap its
    neighbour's compute, as in a deeper stage), per layer. The pipeline: ranks 0 and 1. A ring
    this rank is not part of waits for the others."""
    import copy

    from echelon.yellowstone.execute.stages import UnitRange, causal_lm_of

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    try:
        causal = causal_lm_of(lm)
        layers = min(2, len(causal.model.layers))
        stage = UnitRange(causal, 1, 1 + layers)
        fsdp, ddp, groups = {}, {}, {}
        for size in sorted({2, ranks}):
            groups[size] = group = dist.new_group(list(range(size)))  # every rank takes part
            if rank < size:
                ddp[size] = _ddp_overhead(copy.deepcopy(stage), group, probe) / layers
                fsdp[size] = _fsdp_overhead(copy.deepcopy(stage), group, probe) / layers
            dist.barrier()
        stage_s = _stage_overhead(groups[2], probe) if rank < 2 else None
        dist.barrier()
        return fsdp, ddp, stage_s
    finally:
        dist.destroy_process_group()


def _time_steps(rank: int, ranks: int, port: int, probe: StepProbe, start, results) -> None:
    torch.set_num_threads(probe.threads)
    bundle = _model(probe)
    optimizer = torch.optim.AdamW(bundle.trainable, lr=1e-4, foreach=True)
    vocab = bundle.model.config.vocab_size
    tokens = torch.randint(
        0, vocab, (probe.micro_batch, probe.seq_len), generator=torch.Generator().manual_seed(rank)
    )

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        for _ in range(probe.micro_batches):
            bundle.model(input_ids=tokens, labels=tokens).loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    step()
    start.wait()  # every process times its steps while the others run theirs
    times = [step() for _ in range(probe.steps)]
    costs = _distributed_costs(rank, ranks, port, bundle.model, probe) if ranks > 1 else (None, None, None)
    step_s, update_s = statistics.median(t for t, _ in times), statistics.median(u for _, u in times)
    results.put((rank, Timed(step_s, update_s, *costs)))


@dataclass(frozen=True)
class Timed:
    """Median seconds of a training step, and of its optimizer update (part of the step); on two
    or more ranks, what FSDP2 adds to a micro-batch of one decoder layer and what DDP adds to a
    step's reducing backward per decoder layer, by ring size, and what the pipelining runtime adds
    to a stage's forward and backward of a micro-batch."""

    step_s: float
    update_s: float
    fsdp_s: dict[int, float] | None = None
    ddp_s: dict[int, float] | None = None
    stage_s: float | None = None


def measure_model_steps(probe: StepProbe, ranks: int) -> list[Timed]:
    """A training step timed on each of `ranks` processes running together, and on two or more
    FSDP's and DDP's costs by ring size and the pipelining runtime's per stage. The processes are alike, so
    what only some of them took part in (a ring of two, of three or more; the pipeline of ranks 0
    and 1) is given to the others as their mean."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(ranks), ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_time_steps, args=(r, ranks, port, probe, start, results)) for r in range(ranks)
    ]
    for p in procs:
        p.start()
    out = dict(_collect(procs, results, len(procs), 900))
    timed = [out[r] for r in range(ranks)]
    if ranks < 2:
        return timed

    def by_size(field: str) -> list[dict[int, float]]:
        """Each rank's figures by ring size, a size it was not part of filled with the mean."""
        own = [getattr(t, field) or {} for t in timed]
        sizes = sorted({n for f in own for n in f})
        shared = {n: statistics.mean(f[n] for f in own if n in f) for n in sizes}
        return [{n: f.get(n, shared[n]) for n in sizes} for f in own]

    stage_s = statistics.mean(t.stage_s for t in timed if t.stage_s is not None)
    return [
        dataclasses.replace(t, fsdp_s=f, ddp_s=d, stage_s=stage_s if t.stage_s is None else t.stage_s)
        for t, f, d in zip(timed, by_size("fsdp_s"), by_size("ddp_s"), strict=True)
    ]


def _ping(rank: int, port: int, sizes: list[int], rounds: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    times = {}
    for size in sizes:
        buffer = torch.zeros(size // 4)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(rounds):
            if rank == 0:
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
            else:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)
        times[size] = (time.perf_counter() - t0) / (2 * rounds)
    if rank == 0:
        results.put(times)
    dist.destroy_process_group()


def _collect(procs: list, results, n: int, timeout_s: float) -> list:
    """`n` results of the timing processes `procs`, then their exit; a process that dies first
    (its traceback on stderr) stops the others and raises instead of leaving the caller waiting."""
    import queue

    out, deadline = [], time.monotonic() + timeout_s
    try:
        while len(out) < n:
            try:
                out.append(results.get(timeout=1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    why = f"exit code {dead[0].exitcode}" if dead else f"no result in {timeout_s:.0f} s"
                    raise RuntimeError(f"a timing process failed ({why}); its error is above") from None
        for p in procs:
            p.join()
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_local_link(rounds: int = 50) -> tuple[float, float]:
    """(bandwidth in Gbit/s, one-way latency in ms) of gloo transfers between two local processes:
    latency from 4-byte messages, bandwidth from the extra time of 8 MiB ones."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    small, large = 4, 8 << 20
    procs = [ctx.Process(target=_ping, args=(r, port, [small, large], rounds, results)) for r in range(2)]
    for p in procs:
        p.start()
    (times,) = _collect(procs, results, 1, 300)
    latency = times[small]
    bandwidth = (large - small) / max(times[large] - latency, 1e-9)
    return bandwidth * 8 / 1e9, latency * 1e3
