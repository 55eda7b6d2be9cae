"""`echelon serve global|boundary|device --config RUN.yaml`: run one party of a deployment over gRPC.

Every party reads the same run file and the deployment's certificates (`echelon certs init`).
Boundaries dial the global plane; devices dial their boundary. A device leaves the run for good on
SIGUSR1 (it says goodbye to its boundary, which never aggregates it again). `echelon launch` starts them all
on loopback; on real machines, start each with its own addresses. Every flag is checked before
any work starts (ids, addresses, directories, certificates).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from echelon.cliargs import MAX_THREADS, count, out_path
from echelon.config import RunConfig, load_run
from echelon.errors import UserError
from echelon.parties import GLOBAL, boundary_party, device_party

if TYPE_CHECKING:
    from echelon.runtime.grpc.handshakes import HandshakeTap


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
    parser.add_argument(
        "--run-dir", type=out_path(staged=False), help="where metrics, summary, weights and audit logs go"
    )
    parser.add_argument("--threads", type=count(MAX_THREADS), default=None, help="torch threads (device)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from RUN_DIR's checkpoint (global, boundary)"
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to RUN_DIR/tb (global; the run file's metrics.tensorboard)",
    )
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_target', '').replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise UserError(f"`echelon serve {args.role}` needs {', '.join(missing)}")


def _run_dir(path: Path) -> Path:
    """`--run-dir`, created if missing; UserError when it is no writable directory."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--run-dir {path}: cannot create it ({e.strerror})") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--run-dir {path} is not a writable directory")
    return path


def _party(args: argparse.Namespace, cfg: RunConfig) -> str:
    """The party the flags name, its id checked against the run file; every flag checked."""
    from echelon.runtime.grpc.transport import check_listen, parse_address

    if args.role == "global":
        _need(args, "run_dir")
        check_listen(args.listen)
        return GLOBAL
    if args.role == "boundary":
        _need(args, "id", "global_target", "run_dir")
        known = [b.id for b in cfg.boundaries]
        if args.id not in known:
            raise UserError(
                f"--id {args.id!r} is not a boundary of {args.config} (boundaries: {', '.join(known)})"
            )
        check_listen(args.listen)
        parse_address(args.global_target, "--global")
        return boundary_party(args.id)
    _need(args, "id", "boundary_target")
    known = [d.id for _, d in cfg.all_devices]  # the initial membership and the devices that join
    if args.id not in known:
        raise UserError(f"--id {args.id!r} is not a device of {args.config} (devices: {', '.join(known)})")
    parse_address(args.boundary_target, "--boundary")
    return device_party(args.id)


async def _watch_parent(parent: int) -> None:
    """Return once `parent` is gone: launched children must not outlive `echelon launch`, even
    after kill -9 of it; the role is then cancelled as on SIGTERM, and closes its audit log as
    interrupted."""
    while os.getppid() == parent:
        await asyncio.sleep(0.5)


async def _serve(args: argparse.Namespace, cfg: RunConfig, party: str, tap: HandshakeTap | None) -> int:
    from echelon.runtime.grpc.tls import load_credentials

    creds = load_credentials(args.certs, party)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    if args.role == "global":
        from echelon.runtime.grpc.global_role import run_global

        job = run_global(
            cfg, creds, args.listen, args.run_dir, args.resume, tap, tensorboard=args.tensorboard
        )
    elif args.role == "boundary":
        from echelon.runtime.grpc.boundary_role import run_boundary

        job = run_boundary(
            cfg, creds, args.id, args.listen, args.global_target, args.run_dir, args.resume, tap
        )
    else:
        import torch

        from echelon.runtime.grpc.device_role import run_device

        if args.threads:
            torch.set_num_threads(args.threads)
        # A device that is a replica of a Yellowstone plan keeps its job's files under the run dir.
        workdir = args.run_dir / "plans" / args.id if args.run_dir else None
        job = run_device(cfg, creds, args.id, args.boundary_target, workdir)
    tasks = [asyncio.ensure_future(job)]
    if args.parent_pid is not None:
        tasks.append(asyncio.ensure_future(_watch_parent(args.parent_pid)))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if tasks[0] not in done:  # stopped as on SIGTERM, and said why
        print(f"{party}: parent process {args.parent_pid} is gone; stopped", file=sys.stderr)
        return 143
    tasks[0].result()
    return 0


def log_format(party: str) -> str:
    return f"%(asctime)s {party} %(levelname)s %(message)s"


def configure_logging(party: str) -> None:
    logging.basicConfig(level=os.environ.get("ECHELON_LOG", "INFO"), format=log_format(party))


def run(args: argparse.Namespace) -> int:
    from echelon.preflight import preflight

    cfg = load_run(args.config)
    party = _party(args, cfg)
    if args.run_dir is not None:
        _run_dir(args.run_dir)
    preflight(cfg, args.config, args.run_dir if args.role == "global" else None, deploy=True)
    configure_logging(party)
    tap = None
    if args.role != "device":  # a server: TLS handshakes refused by gRPC core become our warnings
        from echelon.runtime.grpc.handshakes import HandshakeTap

        tap = HandshakeTap(log_format(party))
    try:
        code = asyncio.run(_serve(args, cfg, party, tap))
    except asyncio.CancelledError:
        print(f"{party}: stopped", file=sys.stderr)
        code = 143
    finally:
        if tap is not None:
            tap.close()
    # gRPC and compute threads must not keep a finished party alive: everything durable (audit
    # log, metrics, summary, weights) was closed by the role before this point.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
