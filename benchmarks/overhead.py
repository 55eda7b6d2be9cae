"""Device-plane overhead: tokens/s of Echelon's device plane over a plain PyTorch loop.

Same model, same batches, same process. The device plane does everything a device does per local
round: parse the boundary reference from its wire bytes, load it, K inner AdamW steps on the proximal objective,
read theta back, clip the delta, and serialise its aggregation input. The plain loop does K
forward/backward/AdamW steps. Repetitions alternate (plain, device, plain, ...) and the median
ratio is reported, so machine noise hits both alike. Target: ratio >= 0.95.

    .venv/bin/python benchmarks/overhead.py [--rounds 6] [--inner-steps 8] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from echelon.assembly import prepare
from echelon.config import RunConfig
from echelon.planes.aggregation import PlainAggregator
from echelon.planes.device import DevicePlane
from echelon.sansio import Send
from echelon.tensors import payload
from echelon.v1 import device_pb2, tensor_pb2


def _config(trainable: str, inner_steps: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "overhead",
            "model": {"preset": "tiny", "trainable": trainable, "lora": {"dropout": 0.0}},
            "data": {"max_documents": 80, "seq_len": 128},
            "train": {"inner_steps": inner_steps, "micro_batch": 8},
            # Two devices: a boundary aggregate needs min_quorum (2) contributors. Only "d" is measured.
            "boundaries": [
                {"id": "b", "devices": [{"id": "d", "tokens_per_s": 1}, {"id": "e", "tokens_per_s": 1}]}
            ],
            "budget": {"outer_steps": 1},
        }
    )


def measure(trainable: str, rounds: int, inner_steps: int) -> dict:
    cfg = _config(trainable, inner_steps)
    prep = prepare(cfg)
    bundle, trainer, corpus = prep.bundle, prep.trainer, prep.corpus
    device = DevicePlane("d", "boundary", PlainAggregator(), cfg.echelon.clip, None)
    plain_opt = torch.optim.AdamW(bundle.trainable, lr=cfg.train.lr, foreach=True)
    rng = np.random.default_rng(0)
    tokens = trainer.tokens_per_round
    theta = bundle.get_vector()

    def plain_round() -> None:
        for _ in range(inner_steps):
            batch = torch.from_numpy(
                corpus.train[rng.choice(len(corpus.train), cfg.train.micro_batch)]
            ).long()
            bundle.model(input_ids=batch, labels=batch).loss.backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

    # The boundary's work (building the reference) is not the device's: serialise it once.
    reference_bytes = device_pb2.BoundaryReference(
        version=1, parameters=payload(theta.numpy(), tensor_pb2.BOUNDARY_AGGREGATE)
    ).SerializeToString()

    def device_round(version: int) -> None:
        (start,) = device.receive(0.0, "boundary", device_pb2.BoundaryReference.FromString(reference_bytes))
        result = trainer.local_round("d", start.reference, start.anchor)
        device.local_round_finished(0.0, result)
        (send,) = device.receive(0.0, "boundary", device_pb2.AggregationRequest(round_id=version, weight=1.0))
        assert isinstance(send, Send)
        send.message.SerializeToString()

    plain_round(), device_round(0)  # warm up both paths
    ratios, plain_tps, device_tps = [], [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        plain_round()
        t1 = time.perf_counter()
        device_round(r + 1)
        t2 = time.perf_counter()
        plain_tps.append(tokens / (t1 - t0))
        device_tps.append(tokens / (t2 - t1))
        ratios.append(device_tps[-1] / plain_tps[-1])
    return {
        "trainable": trainable,
        "parameters": bundle.dim,
        "plain": statistics.median(plain_tps),
        "device": statistics.median(device_tps),
        "ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--inner-steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="LoRA only, 2 rounds of 4 steps")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.inner_steps = 2, 4
    torch.manual_seed(0)
    table = Table(
        title=f"device plane vs plain PyTorch loop (K = {args.inner_steps}, micro-batch 8 x 128 tokens)"
    )
    for col in ("trainable", "parameters", "plain tok/s", "device plane tok/s", "ratio (target >= 0.95)"):
        table.add_column(col, justify="right")
    for trainable in ("lora",) if args.quick else ("full", "lora"):
        m = measure(trainable, args.rounds, args.inner_steps)
        table.add_row(
            m["trainable"],
            f"{m['parameters']:,}",
            f"{m['plain']:,.0f}",
            f"{m['device']:,.0f}",
            f"{m['ratio']:.3f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
