"""Start a plan's job on this machine with torch.distributed's elastic agent, one process per device.

`run_local` builds what `torchrun --standalone` builds (a c10d rendezvous on localhost, a
`WorkerSpec` running `python -m echelon.yellowstone.worker`, the `LocalElasticAgent`) with one
addition: before the agent restarts a failed worker group it writes which device's worker died to
`failures.jsonl` (`PlanAgent`), so the restarted workers apply that device's backup. A device is
lost when its worker died by a signal other than the agent's own SIGTERM (kill -9, a segfault);
a worker that raised is restarted without losing its device, and one that refused its input
(exit 2) stops the job at once. `torchrun_commands` prints the line each host of a real fleet runs instead.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import registry as rendezvous

from echelon.yellowstone.execute.job import FAILURES
from echelon.yellowstone.plan import Plan

WORKER = "echelon.yellowstone.worker"
USER_ERROR = 2  # a worker's exit status for bad input (`echelon.errors.UserError`)


class PlanAgent(LocalElasticAgent):
    """The local elastic agent, recording failed devices in `failures.jsonl` before each restart."""

    def __init__(self, *args, devices: list[str], out: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.devices, self.out = devices, out

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and result.failures:
            if any(f.exitcode == USER_ERROR for f in result.failures.values()):
                self._remaining_restarts = 0  # bad input fails the same way every time
            else:
                self._record(result)
        return result

    def _record(self, result: RunResult) -> None:
        # A device is lost when its process dies by a signal: kill -9, a crash of the process.
        # SIGTERM is how the agent stops the other workers once one has failed, never a cause;
        # an exception (a peer's broken connection, a bug) restarts the job without blaming anyone.
        lost = {r: f for r, f in result.failures.items() if f.exitcode < 0 and f.exitcode != -signal.SIGTERM}
        with (self.out / FAILURES).open("a") as log:
            for rank, f in sorted(lost.items()):
                entry = {
                    "device": self.devices[rank],
                    "rank": rank,
                    "exitcode": f.exitcode,
                    "signal": f.signal_name(),
                    "time": time.time(),
                    "restarts_left": self._remaining_restarts,
                }
                log.write(json.dumps(entry) + "\n")


@dataclass(frozen=True)
class LocalJob:
    """What `run_local` needs: the plan file, the run directory and the worker's flags."""

    plan: Path
    out: Path
    devices: list[str]
    worker_args: list[str]
    max_restarts: int = 3
    threads: int = 1


def run_local(job: LocalJob) -> RunResult:
    """Run every device of the plan as a local process until all finish (or restarts run out)."""
    params = RendezvousParameters(
        backend="c10d", endpoint="localhost:0", run_id=uuid.uuid4().hex, min_nodes=1, max_nodes=1
    )
    args = [
        "-m", WORKER, "--plan", str(job.plan), "--out", str(job.out), "--device-id", ",".join(job.devices),
        "--threads", str(job.threads), *job.worker_args,
    ]  # fmt: skip
    spec = WorkerSpec(
        role="echelon",
        local_world_size=len(job.devices),
        entrypoint=sys.executable,
        args=tuple(args),
        rdzv_handler=rendezvous.get_rendezvous_handler(params),
        max_restarts=job.max_restarts,
        monitor_interval=0.2,
    )
    logs = DefaultLogsSpecs(log_dir=str(job.out / "logs"), redirects=Std.ALL)
    agent = PlanAgent(spec=spec, logs_specs=logs, devices=job.devices, out=job.out)
    try:
        return agent.run()
    finally:
        spec.rdzv_handler.shutdown()


def torchrun_commands(
    plan: Plan, plan_path: str, out: str, worker_args: list[str], endpoint: str
) -> list[str]:
    """The `torchrun` line each device's host runs (one process per device; any host may be the
    rendezvous endpoint). The elastic range lets the job continue when a device is lost for good."""
    from echelon.yellowstone.execute.topology import plan_devices

    devices = plan_devices(plan)
    lines = []
    for device in devices:
        cmd = [
            "torchrun", f"--nnodes=1:{len(devices)}", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", f"--rdzv-id={plan.fleet}", "--max-restarts=3",
            "-m", WORKER, "--plan", plan_path, "--device-id", device, "--out", out, *worker_args,
        ]  # fmt: skip
        lines.append(shlex.join(cmd))
    return lines


def _watch_parent(parent: int) -> None:
    """Stop the job (SIGTERM to this agent, which stops its workers) when the process that started
    it is gone, so a killed Echelon device never leaves its replicas' workers behind."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """`python -m echelon.yellowstone.execute.launch --plan P --out DIR [...] -- WORKER ARGS`: the
    job of a plan's replicas serving an Echelon device (see `echelon.yellowstone.execute.devices`)."""
    import argparse

    from echelon.yellowstone.execute.topology import plan_devices
    from echelon.yellowstone.plan import read_plan

    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m echelon.yellowstone.execute.launch")
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-restarts", type=int, default=3)
    args = parser.parse_args(argv[:split])
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    args.out.mkdir(parents=True, exist_ok=True)
    job = LocalJob(
        args.plan,
        args.out,
        plan_devices(read_plan(args.plan)),
        argv[split + 1 :],
        args.max_restarts,
        args.threads,
    )
    return 1 if run_local(job).is_failed() else 0


if __name__ == "__main__":
    sys.exit(main())
