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
  weight an FSDP cluster holds (`cost.fsdp_rates`).
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


def _fsdp_overhead(stage: torch.nn.Module, group: dist.ProcessGroup, probe: StepProbe) -> float:
    """Seconds FSDP2 over `group` adds to a micro-batch's forward and backward of `stage` on this
    rank, which runs its share of the micro-batch: the median sharded less the median unsharded.
    `stage`'s parameters are then shards."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    size = group.size()
    rows = max(1, probe.micro_batch // size)
    x = torch.randn(
        rows, probe.seq_len, stage.config.hidden_size, generator=torch.Generator().manual_seed(size)
    )
    x.requires_grad_(True)  # a stage input, as a middle stage's is

    def median_s() -> float:
        stage(x).sum().backward()  # warm up (and, sharded, lay out FSDP's buffers)
        dist.barrier(group=group)
        times = []
        for _ in range(probe.steps):
            t0 = time.perf_counter()
            stage(x).sum().backward()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    plain = median_s()
    mesh = DeviceMesh.from_group(group, "cpu")
    for layer in stage.model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(stage, mesh=mesh)
    return max(median_s() - plain, 0.0)


def _fsdp_layer_s(
    rank: int, ranks: int, port: int, lm: torch.nn.Module, probe: StepProbe
) -> dict[int, float]:
    """Seconds FSDP2 adds to a micro-batch of one decoder layer on this rank, by ring size: sharded
    over ranks 0 and 1, and over all `ranks` (gloo), as the executor shards a cluster's stage. A
    stage of the first two layers (a layer's gathers may overlap its neighbour's compute, as in a
    deeper stage), per layer. A ring size this rank is not part of waits for the others."""
    import copy

    from echelon.yellowstone.execute.stages import UnitRange, causal_lm_of

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    try:
        causal = causal_lm_of(lm)
        layers = min(2, len(causal.model.layers))
        stage = UnitRange(causal, 1, 1 + layers)
        out = {}
        for size in sorted({2, ranks}):
            group = dist.new_group(list(range(size)))  # every rank takes part in making a group
            if rank < size:
                out[size] = _fsdp_overhead(copy.deepcopy(stage), group, probe) / layers
            dist.barrier()
        return out
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
    fsdp = _fsdp_layer_s(rank, ranks, port, bundle.model, probe) if ranks > 1 else None
    results.put(
        (rank, Timed(statistics.median(t for t, _ in times), statistics.median(u for _, u in times), fsdp))
    )


@dataclass(frozen=True)
class Timed:
    """Median seconds of a training step, and of its optimizer update (part of the step); on two
    or more ranks, what FSDP2 adds to a micro-batch of one decoder layer, by ring size."""

    step_s: float
    update_s: float
    fsdp_s: dict[int, float] | None = None


def measure_model_steps(probe: StepProbe, ranks: int) -> list[Timed]:
    """A training step timed on each of `ranks` processes running together, and on two or more
    FSDP's cost by ring size. The processes are alike, so a ring size only some of them were
    part of (two, of three or more) is given to the others as their mean."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(ranks), ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_time_steps, args=(r, ranks, port, probe, start, results)) for r in range(ranks)
    ]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=900) for _ in procs)
    for p in procs:
        p.join()
    timed = [out[r] for r in range(ranks)]
    if ranks < 2:
        return timed
    fsdp = [t.fsdp_s or {} for t in timed]
    sizes = sorted({n for f in fsdp for n in f})
    shared = {n: statistics.mean(f[n] for f in fsdp if n in f) for n in sizes}
    return [
        dataclasses.replace(t, fsdp_s={n: f.get(n, shared[n]) for n in sizes})
        for t, f in zip(timed, fsdp, strict=True)
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
    times = results.get(timeout=300)
    for p in procs:
        p.join()
    latency = times[small]
    bandwidth = (large - small) / max(times[large] - latency, 1e-9)
    return bandwidth * 8 / 1e9, latency * 1e3
