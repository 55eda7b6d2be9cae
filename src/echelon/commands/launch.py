"""`echelon launch RUN.yaml`: a whole deployment as local processes over gRPC with mutual TLS.

Creates throwaway certificates, starts the global plane, one process per boundary and one per
device on loopback, shows one progress bar (from the global plane's metrics), and gathers one
run directory. The certificates and keys are discarded after the run; their pinned audit public
keys stay beside the run directory (`RUN.audit-keys.json`, for `echelon audit RUN --keys`). Any process failing, or Ctrl-C, stops every process (SIGTERM, then SIGKILL) and
leaves only the marked `.partial` directory; children also exit if this process dies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from echelon.audit.anchor import PINS_FILE
from echelon.commands.train import add_run_options, print_summary
from echelon.config import RunConfig, load_run
from echelon.errors import UserError

STOP_GRACE_S = 10.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_file", type=Path, help="run file (YAML); see examples/")
    add_run_options(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per device process")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """The processes of one launched run; `stop` leaves none behind."""

    def __init__(self, cfg: RunConfig, run_file: Path, certs: Path, run_dir: Path, threads: int) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = run_dir / "logs"
        self.logs.mkdir()
        base = [sys.executable, "-m", "echelon", "serve"]
        common = ["--config", str(run_file), "--certs", str(certs), "--parent-pid", str(os.getpid())]
        global_at = f"127.0.0.1:{_free_port()}"
        self._start("global", [*base, "global", *common, "--listen", global_at, "--run-dir", str(run_dir)])
        for b in cfg.boundaries:
            at = f"127.0.0.1:{_free_port()}"
            self._start(
                f"boundary.{b.id}",
                [
                    *base,
                    "boundary",
                    *common,
                    "--id",
                    b.id,
                    "--listen",
                    at,
                    "--global",
                    global_at,
                    "--run-dir",
                    str(run_dir),
                ],
            )
            for d in b.devices:
                self._start(
                    f"device.{d.id}",
                    [
                        *base,
                        "device",
                        *common,
                        "--id",
                        d.id,
                        "--boundary",
                        at,
                        "--threads",
                        str(threads),
                        "--run-dir",
                        str(run_dir),
                    ],
                )

    def _start(self, party: str, argv: list[str]) -> None:
        log = (self.logs / f"{party}.log").open("wb")
        # A session of its own: a terminal's Ctrl-C reaches only this process, which stops the
        # children in order; the children's parent watch covers this process dying outright.
        self.procs[party] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def failed(self) -> tuple[str, int] | None:
        """The first process that exited with an error, and its exit code."""
        for party, p in self.procs.items():
            if p.poll() not in (None, 0):
                return party, p.returncode
        return None

    @property
    def finished(self) -> bool:
        """The global plane and every boundary exited cleanly: the run is over. Devices are
        workers: one still reconnecting to a boundary that already finished is then stopped."""
        return all(p.poll() == 0 for party, p in self.procs.items() if not party.startswith("device."))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def tail(self, party: str, lines: int = 15) -> str:
        text = (self.logs / f"{party}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def _outer_steps(metrics: Path, seen: int) -> tuple[list[dict], int]:
    if not metrics.exists():
        return [], seen
    with metrics.open() as f:
        f.seek(seen)
        text = f.read()
    complete = text[: text.rfind("\n") + 1]
    records = [json.loads(line) for line in complete.splitlines()]
    return [r for r in records if r["kind"] == "outer_step"], seen + len(complete.encode())


def launch(cfg: RunConfig, run_file: Path, out: Path, *, force: bool, progress: bool, threads: int) -> dict:
    """Run `cfg` as a local deployment and write its run directory; returns the summary."""
    from echelon.progress import RunProgress
    from echelon.rundir import RunDirectory
    from echelon.runtime.grpc.roles import require_admissible
    from echelon.runtime.grpc.tls import init_certs

    require_admissible(cfg)
    run_dir = RunDirectory(out, force=force)
    run_dir.write_yaml("config.yaml", cfg.model_dump(mode="json"))
    keys = Path(tempfile.mkdtemp(prefix="echelon-certs-"))  # private keys never enter the run directory
    deployment = None
    try:
        init_certs(keys / "certs", {b.id: [d.id for d in b.devices] for b in cfg.boundaries})
        deployment = Deployment(cfg, run_file.resolve(), keys / "certs", run_dir.staging, threads)
        bar, seen = RunProgress(cfg.budget, enabled=progress), 0
        with bar:
            while not deployment.finished:
                failure = deployment.failed()
                if failure is not None:
                    party, code = failure
                    raise UserError(
                        f"{party} exited with code {code}; its log ends:\n{deployment.tail(party)}"
                    )
                records, seen = _outer_steps(run_dir.staging / "metrics.jsonl", seen)
                for r in records:
                    bar.update(r["time"], r["tokens_total"], r["outer_step"], r["val_loss"])
                time.sleep(0.2)
        deployment.stop()  # devices left reconnecting to a finished boundary
        summary = json.loads((run_dir.staging / "summary.json").read_text())
        pins = out.with_name(f"{out.name}.{PINS_FILE}")
        pins.unlink(missing_ok=True)  # a forced rerun's; the run directory it pinned is replaced too
        shutil.copyfile(keys / "certs" / PINS_FILE, pins)
    except BaseException:
        if deployment is not None:
            deployment.stop()
        run_dir.abandon()
        raise
    finally:
        shutil.rmtree(keys, ignore_errors=True)
    run_dir.commit()
    return summary


def run(args: argparse.Namespace) -> int:
    return launch_file(args.run_file, args)


def launch_file(path: Path, args: argparse.Namespace) -> int:
    """Launch the run file at `path` with the command's options; print the summary."""
    cfg = load_run(path)
    out = args.out or Path("runs") / cfg.name
    summary = launch(cfg, path, out, force=args.force, progress=not args.no_progress, threads=args.threads)
    summary.setdefault("middle_steps", {})
    summary.setdefault("intra_boundary_bytes", {})
    print_summary(summary, out)
    return 0
