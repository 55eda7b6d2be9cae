"""`echelon execute PLAN.json`: run a plan on this machine, every device a local process.

The processes are started by torch.distributed's elastic agent (gloo on CPU, NCCL with one GPU
per process when CUDA is present), train every replica for --steps optimizer steps, checkpoint
with torch.distributed.checkpoint, and survive a killed process by applying the plan's backup for
its device. Prints, per replica, the measured step time and memory beside the plan's prediction.
`--print-commands` prints the `torchrun` line each host of a real fleet runs instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from echelon.cliargs import MAX_SEED, MAX_THREADS, count, out_path, real, whole
from echelon.errors import UserError
from echelon.rundir import RunDirectory
from echelon.yellowstone.execute.job import FAILURES, model_config, safe_name
from echelon.yellowstone.execute.topology import check_executable, plan_devices, plan_digest
from echelon.yellowstone.plan import Plan, read_plan

GIB = 1024**3
# Bounds past which a value describes no real job: an AdamW step this large diverges at once, a
# job this unreliable should be fixed rather than restarted, and a rank waiting a day is hung.
MAX_LR = 10.0
MAX_RESTARTS = 1000
MAX_TIMEOUT_S = 86_400.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", type=Path, help="plan.json written by `echelon plan`")
    parser.add_argument("--steps", type=count(), default=30, help="optimizer steps per replica")
    parser.add_argument(
        "--out", type=out_path(), default=None, help="run directory (default runs/exec-<fleet>)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing run directory")
    parser.add_argument(
        "--resume", action="store_true", help="continue the interrupted run left in <out>.partial"
    )
    parser.add_argument(
        "--seed", type=whole(0, MAX_SEED), default=0, help="model initialisation and batch order"
    )
    parser.add_argument("--lr", type=real(0, MAX_LR), default=1e-3, help="AdamW learning rate")
    parser.add_argument("--checkpoint-every", type=count(), default=1, help="steps between checkpoints")
    parser.add_argument(
        "--max-restarts", type=whole(0, MAX_RESTARTS), default=3, help="failures the job survives"
    )
    parser.add_argument("--threads", type=count(MAX_THREADS), default=None, help="torch threads per process")
    parser.add_argument(
        "--timeout", type=real(0, MAX_TIMEOUT_S), default=120.0, help="seconds a rank waits for a peer"
    )
    parser.add_argument("--documents", type=count(), default=200, help="built-in corpus documents to load")
    parser.add_argument(
        "--print-commands",
        action="store_true",
        help="print each host's torchrun line for a real fleet and exit",
    )
    parser.add_argument(
        "--endpoint", default="HEAD_HOST:29400", help="rendezvous host:port in the printed torchrun lines"
    )


def _worker_args(args: argparse.Namespace) -> list[str]:
    return [
        "--steps", str(args.steps), "--seed", str(args.seed), "--lr", str(args.lr),
        "--checkpoint-every", str(args.checkpoint_every), "--timeout", str(args.timeout),
        "--documents", str(args.documents),
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from echelon.yellowstone.execute.launch import LocalJob, run_local, torchrun_commands

    plan = read_plan(args.plan)
    check_executable(plan, args.plan)
    out = args.out or Path("runs") / f"exec-{plan.fleet}"
    if args.print_commands:
        for line in torchrun_commands(plan, str(args.plan), str(out), _worker_args(args), args.endpoint):
            print(line)
        return 0
    model_config(plan, dropout=0.0)  # the model must be buildable here before any process starts
    devices = plan_devices(plan)
    run_dir = _run_directory(out, plan, args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(devices))
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    console.print(
        f"executing {args.plan}: {len(devices)} processes ({threads} thread(s) each), "
        f"{sum(len(b.replicas) for b in plan.boundaries)} replica(s), {args.steps} steps; logs in "
        f"{run_dir.staging / 'logs'}"
    )
    job = LocalJob(
        args.plan.resolve(),
        run_dir.staging.resolve(),
        devices,
        _worker_args(args),
        args.max_restarts,
        threads,
    )
    result = run_local(job)
    if result.is_failed():
        failed = ", ".join(f"{devices[r]} (exit {f.exitcode})" for r, f in sorted(result.failures.items()))
        raise UserError(
            f"the job failed after {args.max_restarts} restart(s): {failed}; see {run_dir.staging / 'logs'}; "
            f"`echelon execute {args.plan} --resume --out {out}` continues from the last checkpoint"
        )
    summary = summarise(plan, run_dir.staging, args.steps)
    stopped = [r["replica"] for r in summary["replicas"] if r["steps"] < args.steps]
    if len(stopped) == len(summary["replicas"]):
        raise UserError(
            f"every replica stopped before {args.steps} steps: "
            f"{'; '.join(summary['backups_applied']) or 'see the logs'} ({run_dir.staging / 'logs'})"
        )
    run_dir.write_json("summary.json", summary)
    run_dir.commit()
    render(summary, console)
    console.print(f"wrote {out}")
    return 0


def _run_directory(out: Path, plan: Plan, args: argparse.Namespace) -> RunDirectory:
    """A fresh staging directory, or with --resume the interrupted one (checked to be this plan's)."""
    staging = out.with_name(out.name + ".partial")
    if not args.resume:
        return RunDirectory(out, force=args.force)
    if not staging.is_dir():
        raise UserError(f"--resume: {staging} does not exist; nothing to resume (run without --resume)")
    digest = plan_digest(plan)
    for latest in sorted(staging.glob("checkpoints/*/latest.json")):
        meta = json.loads(latest.read_text())
        if meta.get("plan") != digest:
            raise UserError(
                f"{latest}: this checkpoint was written for another plan (plan {meta.get('plan')}, "
                f"{args.plan} is {digest}); resume with the plan that wrote it, or start a fresh --out"
            )
    return RunDirectory.resume(out)


def summarise(plan: Plan, staging: Path, steps: int) -> dict:
    """Measured against predicted, per replica, from the records the leaders wrote."""
    failures = (
        [json.loads(x) for x in (staging / FAILURES).read_text().splitlines()]
        if (staging / FAILURES).exists()
        else []
    )
    topo = json.loads((staging / "topology.json").read_text())
    replicas = []
    for b in plan.boundaries:
        for r in b.replicas:
            directory = staging / "replicas" / safe_name(r.id)
            records = _records(directory / "metrics.jsonl")
            info = (
                json.loads((directory / "summary.json").read_text())
                if (directory / "summary.json").exists()
                else {}
            )
            planned = {d: c.memory_bytes[d] for c in r.clusters for d in c.devices}
            steady = [x["step_s"] for x in records[1:]] or [x["step_s"] for x in records]
            step_s = sorted(steady)[len(steady) // 2] if steady else None
            replicas.append(
                {
                    "replica": r.id,
                    "devices": info.get("devices", []),
                    "steps": len(records),
                    "loss_first": records[0]["loss"] if records else None,
                    "loss_last": records[-1]["loss"] if records else None,
                    "step_s_measured": step_s,
                    "step_s_predicted": r.predicted.step_s,
                    "tokens_per_s_measured": r.predicted.tokens_per_step / step_s if step_s else None,
                    "tokens_per_s_predicted": r.predicted.tokens_per_s,
                    "peak_memory_bytes": info.get("peak_memory_bytes", {}),
                    "planned_memory_bytes": planned,
                    "recovery_s": _recoveries(records, failures),
                }
            )
    return {
        "plan": plan_digest(plan),
        "steps": steps,
        "failures": failures,
        "backups_applied": topo["applied"],
        "replicas": replicas,
    }


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _recoveries(records: list[dict], failures: list[dict]) -> list[float]:
    """Seconds from each failure until this replica's first step after it began."""
    out = []
    for f in failures:
        after = [x for x in records if x["time"] > f["time"]]
        if after:
            first = min(after, key=lambda x: x["time"])
            out.append(round(first["time"] - first["step_s"] - f["time"], 2))
    return out


def render(summary: dict, console: Console) -> None:
    table = Table(title="execution vs plan")
    for col in ("replica", "steps", "loss", "step s (measured / predicted)", "tokens/s", "peak memory"):
        table.add_column(col)
    for r in summary["replicas"]:
        measured, predicted = r["step_s_measured"], r["step_s_predicted"]
        ratio = f" ({predicted / measured:.2f}x)" if measured else ""
        memory = ", ".join(
            f"{d} {v / GIB:.2f}/{r['planned_memory_bytes'].get(d, 0) / GIB:.2f} GiB"
            for d, v in sorted(r["peak_memory_bytes"].items())
        )
        loss = f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}" if r["loss_last"] is not None else "-"
        tokens = f"{r['tokens_per_s_measured']:,.0f}" if r["tokens_per_s_measured"] else "-"
        step = f"{measured:.3f} / {predicted:.3f}{ratio}" if measured else "-"
        table.add_row(r["replica"], str(r["steps"]), loss, step, tokens, memory)
    console.print(table)
    for line in summary["backups_applied"]:
        console.print(f"backup applied: {line}")
    for r in summary["replicas"]:
        if r["steps"] < summary["steps"]:
            console.print(f"replica {r['replica']} stopped after {r['steps']} steps (its backup dropped it)")
    for replica in summary["replicas"]:
        for seconds in replica["recovery_s"]:
            console.print(
                f"recovery of {replica['replica']}: {seconds:.1f} s from the failure to the next step"
            )
