"""A plan's replicas as Echelon devices: each replica is one device of its boundary.

A run file may name a plan per boundary (`boundaries[].plan`); every replica of that boundary is
then one device of the boundary plane. The device plane stays as it is: it receives references,
clips its delta and joins the boundary's secure aggregation. Only its local round runs elsewhere:
`PlannedTrainer.local_round` hands the round (reference, proximal anchor, the K inner steps' token
ids from the device's own data stream, a dropout seed) to the plan's job, whose replica trains K
steps of the proximal objective as a pipeline and returns its trainable vector. The simulator and
the gRPC device role both call `local_round`, so both runtimes run planned devices the same way.

Transport: a `torch.distributed.TCPStore` the trainer hosts; the job's replica leaders read
`round/<replica>/<n>` and write `result/<replica>/<n>` (tensors serialised with `torch.save` and
read back with `weights_only=True`). The job is `python -m echelon.yellowstone.execute.launch`, the
same elastic agent as `echelon execute`, so a killed rank is replaced by its backup and the round
is repeated from the replica's last checkpoint.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from echelon.config import ModelConfig, TrainConfig
from echelon.sansio import LocalResult
from echelon.train.data import Corpus
from echelon.train.model import ModelBundle
from echelon.train.trainer import LocalTrainer, derived_seed
from echelon.yellowstone.execute.job import model_config
from echelon.yellowstone.execute.topology import restrict
from echelon.yellowstone.plan import read_plan, write_plan

JOB_EXITED = b"job exited"  # what a round's result key holds when the job died before answering


@dataclass(frozen=True)
class PlannedDevice:
    """Device `device` is replica `replica` of the plan at `plan`."""

    device: str
    plan: Path
    replica: str


class PlanJob:
    """The job of `replicas` of one plan on this machine, serving their local rounds."""

    def __init__(
        self,
        plan: Path,
        replicas: set[str],
        workdir: Path,
        model: ModelConfig,
        train: TrainConfig,
        mu: float,
        seed: int,
    ) -> None:
        self.plan, self.workdir = plan, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        write_plan(restrict(read_plan(plan), replicas), workdir / "plan.json")
        (workdir / "model.json").write_text(model.model_dump_json())
        self.store = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
        )
        worker = [
            "--control", f"127.0.0.1:{self.store.port}", "--model-config", str(workdir / "model.json"),
            "--seed", str(seed), "--lr", str(train.lr), "--betas", *map(str, train.betas),
            "--weight-decay", str(train.weight_decay), "--mu", str(mu), "--timeout", "120",
        ]  # fmt: skip
        self.log = (workdir / "job.log").open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "echelon.yellowstone.execute.launch", "--plan", str(workdir / "plan.json"),
             "--out", str(workdir), "--", *worker],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.rounds: dict[str, int] = {}
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """Wake whoever waits for a result when the job exits before giving it."""
        self.process.wait()
        with self._lock:
            for key in self._waiting:
                if not self.store.check([key]):  # an answer given before the exit stands
                    self.store.set(key, JOB_EXITED)

    def local_round(
        self, replica: str, reference: torch.Tensor, anchor: torch.Tensor, tokens: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, float]:
        """Train one local round of `replica`: K steps over `tokens` [K, rows, seq_len]."""
        n = self.rounds.get(replica, 0) + 1
        self.rounds[replica] = n
        self._put(
            f"round/{replica}/{n}", {"reference": reference, "anchor": anchor, "tokens": tokens, "seed": seed}
        )
        result = self._take(f"result/{replica}/{n}")
        return result["theta"], float(result["loss"])

    def _put(self, key: str, value: dict) -> None:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        self.store.set(key, buffer.getvalue())

    def _take(self, key: str) -> dict:
        with self._lock:
            if self.process.poll() is None:
                self._waiting.add(key)
            else:
                self.store.set(key, JOB_EXITED)
        self.store.wait([key], timedelta(days=7))
        with self._lock:
            self._waiting.discard(key)
        data = self.store.get(key)
        self.store.delete_key(key)
        if data == JOB_EXITED:
            raise RuntimeError(
                f"the job of plan {self.plan} exited (status {self.process.returncode}) before answering {key}; "
                f"its log: {self.workdir / 'job.log'}, workers' logs under {self.workdir / 'logs'}"
            )
        return torch.load(io.BytesIO(data), weights_only=True)

    def close(self) -> None:
        """Tell every replica to stop, wait for the job, and release the store."""
        if self.process.poll() is None:
            for replica, n in self.rounds.items():
                self._put(f"round/{replica}/{n + 1}", {"stop": True})
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                self.process.wait(timeout=30)
        self.log.close()


class PlannedTrainer(LocalTrainer):
    """The device plane's compute for a run where some boundaries name a plan: planned devices'
    rounds run on their plan's job, every other device's in this process as `LocalTrainer` does.
    The job of a plan serves the replicas of `planned` only (all of them in a simulation, the one
    device a deployed device process runs)."""

    def __init__(
        self,
        bundle: ModelBundle,
        corpus: Corpus,
        shards: dict[str, np.ndarray],
        cfg: TrainConfig,
        mu: float,
        seed: int,
        planned: list[PlannedDevice],
        workdir: Path,
    ) -> None:
        super().__init__(bundle, corpus, shards, cfg, mu, seed)
        for plan in {p.plan for p in planned}:
            model_config(read_plan(plan), 0.0)  # refuses a model its plan cannot run, before any round
        self.planned = {p.device: p for p in planned}
        self.workdir = workdir
        self._jobs: dict[Path, PlanJob] = {}

    def local_round(
        self, device: str, reference: torch.Tensor, anchor: torch.Tensor | None = None
    ) -> LocalResult:
        spec = self.planned.get(device)
        if spec is None:
            return super().local_round(device, reference, anchor)
        if spec.plan not in self._jobs:
            replicas = {p.replica for p in self.planned.values() if p.plan == spec.plan}
            directory = self.workdir / f"plan-{len(self._jobs)}"
            self._jobs[spec.plan] = PlanJob(
                spec.plan, replicas, directory, self.bundle.config, self.cfg, self.mu, self.seed
            )
        cfg, stream = self.cfg, self._streams[device]
        steps = [
            np.concatenate([stream.next() for _ in range(cfg.grad_accum)]) for _ in range(cfg.inner_steps)
        ]
        tokens = torch.from_numpy(np.stack([self.corpus.train[rows] for rows in steps]).astype(np.int64))
        seed = derived_seed(self.seed, 2, self._index[device], self._rounds[device])
        self._rounds[device] += 1
        theta, loss = self._jobs[spec.plan].local_round(
            spec.replica, reference, reference if anchor is None else anchor, tokens, seed
        )
        return LocalResult(theta, self.tokens_per_round, loss)

    def close(self) -> None:
        """Stop every plan's job (call it however the run ends)."""
        for job in self._jobs.values():
            job.close()
        self._jobs.clear()
