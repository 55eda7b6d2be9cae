"""Peer check (issue 8, item 5): torchft's DiLoCo against Echelon's DiLoCo on the same tiny task.

Both train the built-in tiny Llama (LoRA adapters) on the built-in corpus, with the same data
shards, the same initial weights, the same per-device batch streams and the same knobs:

- N replicas, one per Echelon device (flat topology: each device is its own boundary);
- inner AdamW (lr, betas, weight decay from `train`) for K inner steps per local round;
- an outer step every H local rounds (H * K inner steps) with SGD-Nesterov, lr 0.7, momentum 0.9,
  on the mean pseudo-gradient theta_global - theta_replica;
- no clipping of the updates and plain (unmasked) aggregation on Echelon's side, as torchft.

Echelon runs strategy `diloco` through `echelon.runner.train` (the simulated planes); torchft runs
N replica groups as threads in this process, each with its own `torchft.Manager`, a gloo process
group (`ProcessGroupGloo`) and a `torchft.local_sgd.DiLoCo` wrapper around its inner optimizer,
joined by a `LighthouseServer` (torchft's Rust quorum service) on localhost. Both are evaluated
with Echelon's evaluation (the same validation sequences) after every outer step.

The check: the mean final validation loss over seeds must agree within two standard deviations
of the seed noise. Within one seed both see the same initial model, data and batch order, so the
paired per-seed differences (printed too) should be at float rounding level.

torchft is an optional extra installed only in a separate virtual env (see README.md):

    .venv-peers/bin/python benchmarks/peers/torchft_diloco.py [--seeds 3] [--outer-steps 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

# torchft's Rust side (lighthouse, manager servers) logs every quorum at INFO; keep it quiet.
os.environ.setdefault("RUST_LOG", "warn")

try:
    import torchft  # noqa: F401  (only to fail early and clearly)
    from torch.distributed import TCPStore
    from torchft._torchft import LighthouseServer
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo
except ImportError as e:
    sys.exit(
        f"torchft is not importable ({e}): run it with .venv-peers/bin/python; see benchmarks/peers/README.md"
    )

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from echelon.assembly import prepare
from echelon.config import RunConfig
from echelon.runner import train
from echelon.strategies import effective_config
from echelon.train.trainer import DeviceStream, derived_seed

OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9
# The CPU build of torch has no NCCL: torchft's manager warns at every quorum that it cannot reset
# the NCCL flight recorder. Harmless here (gloo); drop just that message.
logging.getLogger("torchft.manager").addFilter(lambda r: "NCCL flight recorder" not in r.getMessage())
TIMEOUT = timedelta(seconds=120)


def task(seed: int, outer_steps: int, inner_steps: int, interval: int) -> RunConfig:
    """The tiny task (as tests/helpers.py small_run), as Echelon's DiLoCo with nothing extra:
    plain aggregation, no clipping, outer SGD-Nesterov lr 0.7 momentum 0.9."""
    return RunConfig.model_validate(
        {
            "name": "peer-diloco",
            "seed": seed,
            "strategy": "diloco",
            "model": {"preset": "tiny", "trainable": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "data": {
                "source": "stdlib",
                "seq_len": 32,
                "max_documents": 40,
                "partition": {"kind": "dirichlet", "alpha": 0.5},
            },
            "train": {"inner_steps": inner_steps, "micro_batch": 4, "lr": 0.003},
            "echelon": {
                "aggregation": "plain",
                "clip": None,
                "buffer_size": 2,
                "buffer_timeout_s": 5,
                "outer": {"lr": OUTER_LR, "momentum": OUTER_MOMENTUM, "nesterov": True},
                "sync": {"interval": interval},
            },
            "boundaries": [
                {
                    "id": "b0",
                    "devices": [{"id": "d0", "tokens_per_s": 2000}, {"id": "d1", "tokens_per_s": 1000}],
                },
                {
                    "id": "b1",
                    "devices": [{"id": "d2", "tokens_per_s": 1500}, {"id": "d3", "tokens_per_s": 800}],
                },
            ],
            "budget": {"outer_steps": outer_steps},
            "eval": {"sequences": 32, "batch": 16},
        }
    )


def run_echelon(cfg: RunConfig) -> list[float]:
    """Echelon's DiLoCo in simulation: the validation loss at outer steps 0..N (metrics.jsonl)."""
    with tempfile.TemporaryDirectory(prefix="peer-echelon-") as tmp:
        run_dir = Path(tmp) / "run"
        train(cfg, run_dir, progress=False)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = sorted((r["outer_step"], r["val_loss"]) for r in records if r.get("kind") == "outer_step")
    return [loss for _, loss in steps]


class _Trainable(torch.nn.Module):
    """The replica's trainable parameters (the LoRA adapters) as one module: torchft's DiLoCo
    fragment. The frozen base weights never change, so they need no pseudo-gradient."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def run_torchft(cfg: RunConfig) -> list[float]:
    """torchft's DiLoCo, one replica group per device (threads): the validation loss at outer
    steps 0..N, evaluated on replica 0's model after each outer step."""
    eff = effective_config(cfg)  # the same model, corpus and shards as Echelon's run
    prep = prepare(eff)
    t = eff.train
    devices = list(prep.shards)
    n = len(devices)
    sync_every = eff.echelon.sync.interval * t.inner_steps
    total_steps = cfg.budget.outer_steps * sync_every
    evaluate = prep.trainer.evaluate
    curve = [evaluate(prep.trainer.initial_state(), eff.eval.sequences, eff.eval.batch)]
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=n)
    failed = threading.Event()
    finals: dict[int, torch.Tensor] = {}  # each replica's trainable vector at the end

    def replica(i: int, device: str) -> None:
        model = copy.deepcopy(prep.bundle.model)
        params = [p for name, p in model.named_parameters() if p.requires_grad]
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        assert names == prep.bundle.names, "replica's trainable parameters differ from Echelon's"
        fragment = _Trainable(params)
        inner = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, foreach=True)
        outer = torch.optim.SGD(params, lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True)
        store = TCPStore(host_name="localhost", port=0, is_master=True, wait_for_workers=False)

        def state_dict() -> dict:
            return {"trainable": fragment.state_dict(), "inner": inner.state_dict()}

        def load_state_dict(state: dict) -> None:  # recovery only: never used in a healthy run
            fragment.load_state_dict(state["trainable"])
            inner.load_state_dict(state["inner"])

        manager = Manager(
            pg=ProcessGroupGloo(timeout=TIMEOUT),
            load_state_dict=load_state_dict,
            state_dict=state_dict,
            min_replica_size=n,
            use_async_quorum=False,  # DiLoCo requires it
            replica_id=f"peer{i}",
            store_addr="localhost",
            store_port=store.port,
            rank=0,
            world_size=1,
            lighthouse_addr=lighthouse.address(),
            init_sync=False,  # every replica starts from the same weights
            timeout=TIMEOUT,
            quorum_timeout=TIMEOUT,
            connect_timeout=TIMEOUT,
        )
        # The same batch stream as Echelon's device i (LocalTrainer's seeding).
        stream = DeviceStream(
            prep.shards[device], t.micro_batch, np.random.default_rng(derived_seed(cfg.seed, 1, i))
        )
        try:
            with DiLoCo(manager, [fragment], inner, outer, sync_every=sync_every):
                for step in range(1, total_steps + 1):
                    if failed.is_set():
                        return
                    batch = torch.from_numpy(prep.corpus.train[stream.next()]).long()
                    loss = model(input_ids=batch, labels=batch).loss
                    loss.backward()
                    inner.step()  # DiLoCo's post-step hook runs the outer step every sync_every
                    inner.zero_grad(set_to_none=True)
                    if step % sync_every == 0:
                        if manager.errored() is not None:
                            raise RuntimeError(f"replica {i}: torchft error: {manager.errored()}")
                        if i == 0:
                            theta = torch.cat([p.detach().reshape(-1) for p in params])
                            curve.append(evaluate(theta, eff.eval.sequences, eff.eval.batch))
            finals[i] = torch.cat([p.detach().reshape(-1) for p in params])
            if manager.current_step() != cfg.budget.outer_steps:
                raise RuntimeError(
                    f"replica {i}: {manager.current_step()} outer steps committed, "
                    f"expected {cfg.budget.outer_steps}"
                )
        except BaseException:
            failed.set()
            raise
        finally:
            manager.shutdown(wait=False)

    try:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="torchft-replica") as pool:
            futures = [pool.submit(replica, i, d) for i, d in enumerate(devices)]
            for f in futures:
                f.result()
    finally:
        lighthouse.shutdown()
    # After the last outer step every replica holds the same global model.
    for i, theta in finals.items():
        if not torch.allclose(theta, finals[0], rtol=0, atol=1e-6):
            raise RuntimeError(f"torchft replica {i} ended on another model than replica 0")
    return curve


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--outer-steps", type=int, default=10)
    ap.add_argument("--inner-steps", type=int, default=2, help="K, AdamW steps per local round")
    ap.add_argument("--interval", type=int, default=2, help="H, local rounds between outer steps")
    args = ap.parse_args()
    console = Console()
    if not console.is_terminal:
        console = Console(width=130)  # a piped or logged table keeps one line per row
    finals: dict[str, list[float]] = {"Echelon DiLoCo": [], "torchft DiLoCo": []}
    curves: dict[str, list[list[float]]] = {k: [] for k in finals}
    wall: dict[str, float] = dict.fromkeys(finals, 0.0)
    for seed in range(args.seeds):
        cfg = task(seed, args.outer_steps, args.inner_steps, args.interval)
        for label, fn in (("Echelon DiLoCo", run_echelon), ("torchft DiLoCo", run_torchft)):
            t0 = time.perf_counter()
            curve = fn(cfg)
            wall[label] += time.perf_counter() - t0
            if len(curve) != args.outer_steps + 1:
                raise RuntimeError(f"{label} seed {seed}: {len(curve) - 1} outer steps evaluated")
            curves[label].append(curve)
            finals[label].append(curve[-1])
            console.print(
                f"seed {seed} {label}: val loss {curve[0]:.4f} -> {curve[-1]:.4f} "
                f"({len(curve) - 1} outer steps)"
            )

    (ech_mean, ech_std), (tft_mean, tft_std) = (_mean_std(finals[k]) for k in finals)
    noise = math.sqrt((ech_std**2 + tft_std**2) / 2)  # pooled seed standard deviation
    gap = abs(tft_mean - ech_mean)
    agree = args.seeds > 1 and gap <= 2 * noise
    paired = [abs(a - b) for a, b in zip(finals["Echelon DiLoCo"], finals["torchft DiLoCo"], strict=True)]
    curve_gap = max(
        abs(a - b)
        for ca, cb in zip(curves["Echelon DiLoCo"], curves["torchft DiLoCo"], strict=True)
        for a, b in zip(ca, cb, strict=True)
    )

    table = Table(
        title=(
            f"DiLoCo peer check: tiny LoRA model, 4 replicas, K={args.inner_steps} inner AdamW steps x "
            f"H={args.interval} rounds per outer step, {args.outer_steps} outer steps "
            f"(outer SGD-Nesterov lr {OUTER_LR}, momentum {OUTER_MOMENTUM})"
        )
    )
    for col in ("method", "seeds", "final val loss (mean ± std)", "per seed", "wall s (sum)", "agrees"):
        table.add_column(col, justify="left" if col in ("method", "agrees") else "right")
    verdict = (
        f"{'yes' if agree else 'NO'}: |Δmean| {gap:.2e} vs 2σ {2 * noise:.2e}"
        if args.seeds > 1
        else "n/a (one seed: no seed noise)"
    )
    for label, (mean, std) in (
        ("Echelon DiLoCo", (ech_mean, ech_std)),
        ("torchft DiLoCo", (tft_mean, tft_std)),
    ):
        table.add_row(
            label,
            str(args.seeds),
            f"{mean:.4f} ± {std:.4f}",
            ", ".join(f"{x:.4f}" for x in finals[label]),
            f"{wall[label]:.1f}",
            verdict if label == "torchft DiLoCo" else "",
        )
    console.print(table)
    console.print(
        f"paired (same seed) |Δ final val loss|: max {max(paired):.2e}; "
        f"largest |Δ| anywhere on the curves: {curve_gap:.2e}"
    )
    return 0 if agree or args.seeds == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
