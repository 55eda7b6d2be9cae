"""`echelon serve global|boundary|device --config RUN.yaml`: run one party of a deployment over gRPC.

Every party reads the same run file and the deployment's certificates (`echelon certs init`).
Boundaries dial the global plane; devices dial their boundary. `echelon launch` starts them all
on loopback; on real machines, start each with its own addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from echelon.config import load_run


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=["global", "boundary", "device"])
    parser.add_argument("--config", type=Path, required=True, help="the run file (YAML)")
    parser.add_argument("--certs", type=Path, required=True, help="directory made by `echelon certs init`")
    parser.add_argument("--id", help="the boundary or device id (boundary and device roles)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve on (global, boundary)")
    parser.add_argument("--global", dest="global_target", help="host:port of the global plane (boundary)")
    parser.add_argument(
        "--boundary", dest="boundary_target", help="host:port of the device's boundary (device)"
    )
    parser.add_argument("--run-dir", type=Path, help="where metrics, summary, weights and audit logs go")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (device)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR's checkpoint (global)")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)


def _need(args: argparse.Namespace, *names: str) -> None:
    from echelon.errors import UserError

    missing = [f"--{n.replace('_target', '').replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise UserError(f"`echelon serve {args.role}` needs {', '.join(missing)}")


async def _watch_parent(parent: int) -> None:
    # Launched children must not outlive `echelon launch`, even after kill -9 of it.
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    raise SystemExit(f"parent process {parent} is gone")


async def _serve(args: argparse.Namespace) -> int:
    from echelon.runtime.grpc import roles
    from echelon.runtime.grpc.tls import load_credentials

    cfg = load_run(args.config)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    if args.role == "global":
        _need(args, "run_dir")
        args.run_dir.mkdir(parents=True, exist_ok=True)
        creds = load_credentials(args.certs, "global")
        job = roles.run_global(cfg, creds, args.listen, args.run_dir, resume=args.resume)
    elif args.role == "boundary":
        _need(args, "id", "global_target", "run_dir")
        creds = load_credentials(args.certs, f"boundary.{args.id}")
        job = roles.run_boundary(cfg, creds, args.id, args.listen, args.global_target, args.run_dir)
    else:
        _need(args, "id", "boundary_target")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        # A device that is a replica of a Yellowstone plan keeps its job's files under the run dir.
        workdir = args.run_dir / "plans" / args.id if args.run_dir else None
        job = roles.run_device(
            cfg, load_credentials(args.certs, f"device.{args.id}"), args.id, args.boundary_target, workdir
        )
    tasks = [asyncio.ensure_future(job)]
    if args.parent_pid is not None:
        tasks.append(asyncio.ensure_future(_watch_parent(args.parent_pid)))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        t.result()
    return 0


def run(args: argparse.Namespace) -> int:
    from echelon.runtime.grpc.roles import configure_logging

    configure_logging(args.role if args.id is None else f"{args.role}.{args.id}")
    try:
        code = asyncio.run(_serve(args))
    except asyncio.CancelledError:
        print(f"{args.role}: stopped", file=sys.stderr)
        code = 143
    # gRPC and compute threads must not keep a finished party alive: everything durable (audit
    # log, metrics, summary, weights) was closed by the role before this point.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
