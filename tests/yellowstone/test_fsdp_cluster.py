"""An FSDP cluster holds what the plan prices it: shards between micro-batches, not whole layers."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, port: int, results) -> None:
    from torch.distributed.tensor import DTensor

    from echelon.config import ModelConfig
    from echelon.train.model import build_model
    from echelon.yellowstone.execute.cluster import DataParallel
    from echelon.yellowstone.execute.stages import UnitRange, causal_lm_of

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        lm = causal_lm_of(build_model(ModelConfig(preset="tiny", trainable="full"), 0).model)
        stage = UnitRange(lm, 1, 3)
        whole = {n: p.numel() for n, p in stage.named_parameters()}
        dp = DataParallel(stage, "FSDP", dist.group.WORLD, torch.device("cpu"))
        x = torch.randn(2, 16, lm.config.hidden_size, requires_grad=True)
        out = dp(x)
        dp.before_backward(out, last=False)  # the first of the step's micro-batches
        out.sum().backward()
        held = {}
        for n, p in stage.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            held[n] = (local.numel(), None if grad is None else grad.numel())
        results.put((rank, whole, held))
    finally:
        dist.destroy_process_group()


def test_between_micro_batches_an_fsdp_rank_holds_shards_of_weights_and_gradients():
    """After a micro-batch that is not the step's last, every parameter and its gradient are
    this rank's shard (half of a 2-rank cluster's, rounded up), as the cost model's FSDP memory
    (state / n + the largest unsharded unit) assumes, not whole layers kept for the next one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    for _rank_id, whole, held in got:
        assert held.keys() == whole.keys() and whole
        for name, (weights, grads) in held.items():
            shard = -(-whole[name] // 2) if whole[name] >= 2 else whole[name]
            assert weights <= shard, (name, weights, whole[name])
            assert grads is not None and grads <= shard, (name, grads, whole[name])
