"""One worker process of a plan's job: set up, find its role, train or follow, checkpoint.

Started by torch.distributed's elastic agent (`echelon execute` on one machine, or `torchrun` on
each host of a fleet), one process per device. Reading order: `main` parses the arguments and
reports user errors; `Worker.setup` joins the process group, maps device ids to ranks, works out
which devices have failed (recorded by the launcher's agent, or absent from the rendezvous) and
the topology the plan's backups leave; `Worker.run` builds this device's part of its replica and
either leads it (the head of cluster 0: data, commands, checkpoints, metrics) or follows the
leader's commands. Devices without a role (standby, failed) exit at once.

Run directory (`--out`, shared by the processes of one machine): `failures.jsonl` (the agent's
record of dead ranks), `checkpoints/<replica>/step-N/` (torch.distributed.checkpoint) with
`latest.json` naming the last complete one, `replicas/<replica>/metrics.jsonl` (one record per
optimizer step, written only once its checkpoint is complete, so a step is recorded exactly once
however often the job restarts), `replicas/<replica>/summary.json`, `topology.json`.
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from echelon.errors import UserError
from echelon.yellowstone.execute import p2p
from echelon.yellowstone.execute.replica import Optimisation, Placement, ReplicaRank, make_groups
from echelon.yellowstone.execute.stages import canonical_name
from echelon.yellowstone.execute.topology import (
    ReplicaSpec,
    Topology,
    check_executable,
    plan_devices,
    plan_digest,
    topology,
)
from echelon.yellowstone.plan import Plan, read_plan

FAILURES = "failures.jsonl"


def safe_name(replica_id: str) -> str:
    """A replica id as a directory name (`acme/r0` -> `acme-r0`)."""
    return replica_id.replace("/", "-")


def read_failures(out: Path) -> list[str]:
    """Devices the agent recorded as failed, in the order they failed."""
    path = out / FAILURES
    if not path.exists():
        return []
    return [json.loads(line)["device"] for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class JobOptions:
    """What every worker of a job is told (the same on every host).

    Standalone (`echelon execute`), each replica trains `steps` optimizer steps on the built-in
    corpus. With `control` (the host:port of an Echelon device's TCPStore), each replica is an
    Echelon device instead: it trains the local rounds that device sends it (`serve_rounds`), and
    `model` (a run file's model section as JSON) builds the run's model exactly.
    """

    plan: Path
    out: Path
    steps: int = 30
    seed: int = 0
    checkpoint_every: int = 1
    optimisation: Optimisation = field(default_factory=Optimisation)
    timeout_s: float = 120.0
    documents: int = 200
    lora_dropout: float = 0.0
    control: str | None = None
    model: Path | None = None


def model_config(plan: Plan, dropout: float, given: Path | None = None):
    """The run-file model section that builds exactly the planned model (`given`: a JSON file of
    the run's own model section, whose LoRA settings the plan does not record)."""
    from echelon.config import LoraSettings, ModelConfig

    source = plan.model.source
    preset = source if source == "tiny" else None
    if preset is None and not (Path(source) / "config.json").is_file():
        raise UserError(
            f"plan model.source: {source!r} is neither the built-in `tiny` preset nor a checkpoint directory "
            "on this host; shape presets (llama-8b, ...) plan, but only a real checkpoint or `tiny` executes"
        )
    tied = preset is None and json.loads((Path(source) / "config.json").read_text()).get(
        "tie_word_embeddings"
    )
    if tied and any(r.structure != "single" for b in plan.boundaries for r in b.replicas):
        raise UserError(
            f"{source}: the checkpoint ties its embedding and LM head (tie_word_embeddings), which a pipeline "
            "would split over two stages; plan it so each replica holds the whole model (one cluster), or "
            "train a checkpoint saved with untied weights"
        )
    if given is not None:
        return ModelConfig.model_validate_json(given.read_text())
    lora = LoraSettings(r=plan.model.lora_rank, alpha=2.0 * plan.model.lora_rank, dropout=dropout)
    return ModelConfig(
        preset=preset, path=None if preset else Path(source), trainable=plan.model.trainable, lora=lora
    )


class StepBatches:
    """Token ids of step n of a replica: rows of the training corpus drawn by (seed, replica, n),
    so a resumed job trains on exactly the batches it would have."""

    def __init__(self, train: np.ndarray, sequences: int, seed: int, replica: int) -> None:
        if len(train) < sequences:
            raise UserError(
                f"the corpus has {len(train)} training sequences, fewer than one step's {sequences}; "
                "raise --documents or plan a smaller micro-batch"
            )
        self.train, self.sequences, self.seed, self.replica = train, sequences, seed, replica

    def __call__(self, step: int) -> torch.Tensor:
        from echelon.train.trainer import derived_seed

        rng = np.random.default_rng(derived_seed(self.seed, 7, self.replica, step))
        rows = np.sort(rng.choice(len(self.train), self.sequences, replace=False))
        return torch.from_numpy(self.train[rows].astype(np.int64))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocations on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class ReplicaDriver:
    """The leader's commands to its replica's ranks (broadcast over the replica group), and every
    other rank's loop carrying them out."""

    def __init__(self, rank: ReplicaRank, dim: int) -> None:
        self.rank, self.dim = rank, dim
        self.is_leader = rank.place.rank == rank.leader

    def _command(self, *cmd: object) -> tuple:
        box = [cmd if self.is_leader else None]
        dist.broadcast_object_list(box, src=self.rank.leader, group=self.rank.group)
        return box[0]

    def _vector(self, value: torch.Tensor | None) -> torch.Tensor:
        device = self.rank.place.torch_device  # NCCL moves only GPU tensors
        out = (
            value.float().to(device).contiguous() if self.is_leader else torch.empty(self.dim, device=device)
        )
        dist.broadcast(out, src=self.rank.leader, group=self.rank.group)
        return out

    # leader side
    def step(self, tokens: torch.Tensor) -> float:
        self._command("step")
        p2p.data_loaded("tokens")
        return self.rank.train_step(tokens)

    def set_state(self, theta: torch.Tensor, anchor: torch.Tensor | None, seed: int = 0) -> None:
        """The trainable state (and the proximal anchor) on every rank; `seed` seeds each rank's
        dropout for the round, so a repeated round draws the same masks."""
        self._command("set", anchor is not None, seed)
        self._set(theta, anchor, anchor is not None, seed)

    def collect(self, names: list[str]) -> torch.Tensor:
        self._command("collect")
        parts = self._collect()
        return torch.cat([parts[n].reshape(-1) for n in names])

    def save(self, directory: Path) -> None:
        self._command("save", str(directory))
        self.rank.save(directory)

    def load(self, directory: Path) -> None:
        self._command("load", str(directory))
        self.rank.load(directory)

    def report(self) -> dict[str, int]:
        self._command("report")
        return self._report()

    def stop(self) -> None:
        self._command("stop")

    # both sides
    def _set(
        self, theta: torch.Tensor | None, anchor: torch.Tensor | None, with_anchor: bool, seed: int
    ) -> None:
        from echelon.train.trainer import derived_seed

        theta = self._vector(theta)
        self.rank.set_state(theta, self._vector(anchor) if with_anchor else None)
        torch.manual_seed(derived_seed(seed, self.rank.place.rank))

    def _collect(self) -> dict[str, torch.Tensor]:
        mine = self.rank.collect_state()
        gathered: list[dict] | None = [{} for _ in range(self.rank.group.size())] if self.is_leader else None
        dist.gather_object(mine, gathered, dst=self.rank.leader, group=self.rank.group)
        return {k: v for part in gathered or [] for k, v in part.items()}

    def _report(self) -> dict[str, int]:
        mine = (self.rank.place.device, peak_memory_bytes(self.rank.place.torch_device))
        gathered: list | None = [None] * self.rank.group.size() if self.is_leader else None
        dist.gather_object(mine, gathered, dst=self.rank.leader, group=self.rank.group)
        return dict(gathered or [])

    def follow(self) -> None:
        """A non-leader rank: carry out the leader's commands until `stop`."""
        while True:
            op, *args = self._command()
            if op == "step":
                self.rank.train_step(None)
            elif op == "set":
                self._set(None, None, bool(args[0]), int(args[1]))
            elif op == "collect":
                self._collect()
            elif op == "save":
                self.rank.save(Path(args[0]))
            elif op == "load":
                self.rank.load(Path(args[0]))
            elif op == "report":
                self._report()
            elif op == "stop":
                return
            else:
                raise RuntimeError(f"unknown command {op!r} from the replica leader")


class Checkpoints:
    """A replica's checkpoints: step-N directories and `latest.json`, written by the leader last."""

    def __init__(self, out: Path, replica: ReplicaSpec, digest: str) -> None:
        self.dir = out / "checkpoints" / safe_name(replica.id)
        self.replica, self.digest = replica, digest
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def latest(self) -> dict | None:
        path = self.dir / "latest.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, driver: ReplicaDriver, step: int) -> None:
        target = self.dir / f"step-{step:06d}"
        driver.save(target)
        meta = {
            "plan": self.digest,
            "replica": self.replica.id,
            "step": step,
            "devices": list(self.replica.devices),
        }
        (target / "echelon.json").write_text(json.dumps(meta, indent=2) + "\n")
        tmp = self.dir / ".latest.json.tmp"
        tmp.write_text(json.dumps(meta | {"path": target.name}, indent=2) + "\n")
        os.replace(tmp, self.dir / "latest.json")
        for old in self.dir.glob("step-*"):
            if old.name != target.name:
                _remove_tree(old)

    def restore(self, driver: ReplicaDriver) -> int:
        """Load the latest checkpoint into every rank of the replica; returns the steps it holds."""
        meta = self.latest
        if meta is None:
            return 0
        if meta.get("plan") != self.digest:
            raise UserError(
                f"{self.dir / 'latest.json'}: this checkpoint belongs to another plan (plan {meta.get('plan')}, "
                f"this plan {self.digest}); run with a fresh --out"
            )
        driver.load(self.dir / meta["path"])
        return int(meta["step"])


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def init_process_group(backend: str, timeout: timedelta) -> None:
    """Join the job's default process group, as env:// does, with the keys of each restart attempt
    under their own prefix: the elastic agent's store outlives a restart, and a restarted worker
    must not read the addresses of the workers it replaced."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"echelon/attempt-{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


class Worker:
    """One process of the job, from joining the group to leaving it."""

    def __init__(self, options: JobOptions, device: str, backend: str) -> None:
        self.options, self.device, self.backend = options, device, backend
        self.plan = read_plan(options.plan)
        check_executable(self.plan, options.plan)
        if device not in plan_devices(self.plan):
            raise UserError(
                f"--device-id {device!r} is not a device of {options.plan} "
                f"(devices: {', '.join(plan_devices(self.plan))})"
            )

    def setup(self) -> tuple[Placement, Topology]:
        p2p.install_trace(self.device)
        pids = self.options.out / "pids"
        pids.mkdir(parents=True, exist_ok=True)
        (pids / f"{self.device}.pid").write_text(f"{os.getpid()}\n")
        init_process_group(self.backend, timedelta(seconds=self.options.timeout_s))
        ids: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(ids, self.device)
        if len(set(ids)) != len(ids):
            raise UserError(
                f"two ranks claim the same device: {sorted(ids)}; give each process its own --device-id"
            )
        ranks = {d: r for r, d in enumerate(ids)}
        present = set(ranks)
        failed = [d for d in read_failures(self.options.out) if d in plan_devices(self.plan)]
        failed += [d for d in plan_devices(self.plan) if d not in present and d not in failed]
        topo = topology(self.plan, failed)
        if torch.cuda.is_available() and self.backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
            torch.cuda.set_device(local)
            torch_device = torch.device("cuda", local)
        else:
            torch_device = torch.device("cpu")
        place = Placement(self.device, ranks, torch_device)
        if dist.get_rank() == 0:
            record = {"applied": list(topo.applied), "idle": list(topo.idle), "ranks": ranks}
            _write_json(self.options.out / "topology.json", record)
        return place, topo

    def run(self) -> None:
        place, topo = self.setup()
        groups = make_groups(topo.replicas, place.ranks)
        spec = topo.replica_of(self.device)
        if spec is None:
            return  # standby or failed: no part in this attempt
        from echelon.train.model import build_model

        opts = self.options
        bundle = build_model(model_config(self.plan, opts.lora_dropout, opts.model), opts.seed)
        rank = ReplicaRank(spec, place, groups[spec.id], bundle, self.plan.model.seq_len, opts.optimisation)
        driver = ReplicaDriver(rank, bundle.dim)
        if not driver.is_leader:
            driver.follow()
        elif opts.control is None:
            self._train_steps(driver, spec, bundle)
        else:
            self._serve_rounds(driver, spec, [canonical_name(n) for n in bundle.names])
        if driver.is_leader:
            memory = driver.report()
            driver.stop()
            _write_json(
                opts.out / "replicas" / safe_name(spec.id) / "summary.json",
                {"replica": spec.id, "devices": list(spec.devices), "peak_memory_bytes": memory},
            )

    def _serve_rounds(self, driver: ReplicaDriver, spec: ReplicaSpec, names: list[str]) -> None:
        """Train the local rounds an Echelon device sends through its store, until it says stop.

        A round's result is published before its checkpoint: after a restart the job repeats at most
        the last round, from the state before it, and republishes the same result."""
        opts = self.options
        host, port = opts.control.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=opts.timeout_s))
        checkpoints = Checkpoints(opts.out, spec, plan_digest(self.plan))
        n = checkpoints.restore(driver) + 1
        while True:
            command = _wait_and_get(store, f"round/{spec.id}/{n}")
            if command.get("stop"):
                return
            driver.set_state(command["reference"], command["anchor"], int(command["seed"]))
            losses = [driver.step(tokens) for tokens in command["tokens"]]
            theta = driver.collect(names)
            buffer = io.BytesIO()
            torch.save({"theta": theta, "loss": float(np.mean(losses))}, buffer)
            store.set(f"result/{spec.id}/{n}", buffer.getvalue())
            checkpoints.save(driver, n)
            n += 1

    def _train_steps(self, driver: ReplicaDriver, spec: ReplicaSpec, bundle) -> None:
        """Standalone: `steps` optimizer steps on the built-in corpus, a record per committed step."""
        opts = self.options
        index = [r.id for b in self.plan.boundaries for r in b.replicas].index(spec.id)
        checkpoints = Checkpoints(opts.out, spec, plan_digest(self.plan))
        start = checkpoints.restore(driver)
        batches = StepBatches(
            corpus_rows(self.plan, bundle.tokenizer, opts),
            spec.micro_batch * spec.micro_batches,
            opts.seed,
            index,
        )
        out = opts.out / "replicas" / safe_name(spec.id)
        out.mkdir(parents=True, exist_ok=True)
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        pending: list[dict] = []
        tokens_per_step = spec.micro_batch * spec.micro_batches * self.plan.model.seq_len
        with (out / "metrics.jsonl").open("a") as metrics:
            for step in range(start, opts.steps):
                t0 = time.perf_counter()
                loss = driver.step(batches(step))
                seconds = time.perf_counter() - t0
                pending.append(
                    {"step": step + 1, "loss": loss, "step_s": seconds, "tokens": tokens_per_step,
                     "attempt": attempt, "time": time.time(), "devices": list(spec.devices)}
                )  # fmt: skip
                if (step + 1) % opts.checkpoint_every == 0 or step + 1 == opts.steps:
                    checkpoints.save(driver, step + 1)
                    for record in pending:
                        metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    pending = []


def _wait_and_get(store: dist.TCPStore, key: str) -> dict:
    """The command stored under `key`, waiting for it as long as it takes (the device decides
    when the next local round starts; if it dies, the store connection breaks and this raises)."""
    while True:
        try:
            store.wait([key], timedelta(hours=1))
            break
        except dist.DistStoreError:
            continue  # an hour without a round: keep waiting
    return torch.load(io.BytesIO(store.get(key)), weights_only=True)


def corpus_rows(plan: Plan, tokenizer, opts: JobOptions) -> np.ndarray:
    """The training sequences of the built-in corpus at the plan's sequence length."""
    from echelon.config import DataConfig, PartitionConfig
    from echelon.train.data import build_corpus, load_documents

    data = DataConfig(
        seq_len=plan.model.seq_len, max_documents=opts.documents, partition=PartitionConfig(kind="iid")
    )
    p2p.data_loaded("corpus")
    return build_corpus(load_documents(data, opts.seed), tokenizer, data, opts.seed).train


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def parse(argv: list[str]) -> tuple[JobOptions, str, str]:
    parser = argparse.ArgumentParser(
        prog="python -m echelon.yellowstone.worker",
        description="one process of a plan's job (start it with torchrun or `echelon execute`)",
    )
    parser.add_argument("--plan", type=Path, required=True, help="plan.json written by `echelon plan`")
    parser.add_argument(
        "--device-id",
        required=True,
        help="this process's device; several ids, comma-separated, by local rank",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="run directory shared by this host's processes"
    )
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per replica")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=1, help="steps between checkpoints")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--mu", type=float, default=0.0, help="proximal weight of the local objective")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a peer")
    parser.add_argument("--documents", type=int, default=200, help="built-in corpus documents to load")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument(
        "--control", default=None, help="host:port of the Echelon device driving the replicas"
    )
    parser.add_argument("--model-config", type=Path, default=None, help="the run's model section (JSON)")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    args = parser.parse_args(argv)
    ids = args.device_id.split(",")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= len(ids):
        raise UserError(f"--device-id names {len(ids)} device(s) but this is local rank {local}")
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.threads:
        torch.set_num_threads(args.threads)
    optimisation = Optimisation(args.lr, tuple(args.betas), args.weight_decay, args.mu)
    options = JobOptions(
        args.plan, args.out, args.steps, args.seed, args.checkpoint_every, optimisation, args.timeout,
        args.documents, args.lora_dropout, args.control, args.model_config,
    )  # fmt: skip
    return options, ids[local], backend


def main(argv: list[str] | None = None) -> int:
    # `kill -USR1 <pid>` (pids/<device>.pid) prints where this worker is, into its log.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        options, device, backend = parse(sys.argv[1:] if argv is None else argv)
        Worker(options, device, backend).run()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
