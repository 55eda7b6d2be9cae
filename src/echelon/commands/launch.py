"""`echelon launch RUN.yaml`: a whole deployment as local processes over gRPC with mutual TLS.

Everything is checked first (`echelon.preflight`): a run that cannot work creates nothing. The
deployment's certificates and private keys go to `<out>.keys/` (mode 0700), beside the run
directory, never inside it and never in /tmp. Then the global plane, one process per boundary
and one per device start on loopback, under one progress bar. Launch supervises them: a party
that dies is restarted (the global plane and the boundaries from their checkpoints), up to
`deployment.max_restarts` times each, and the run goes on. A completed run is moved into place,
its keys are deleted and their pinned audit public keys stay beside it (`RUN.audit-keys.json`,
for `echelon audit RUN --keys`). Ctrl-C, or a party past its restarts, stops every process
(SIGTERM, then SIGKILL): their audit logs close as interrupted, and the `.partial` run directory
and the keys stay, so `echelon launch --resume` continues the run. Children exit when this
process dies, even by kill -9.
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
import time
from pathlib import Path

from echelon.audit.anchor import PINS_FILE
from echelon.cliargs import MAX_THREADS, count
from echelon.commands.train import add_run_options, print_summary
from echelon.config import RunConfig, load_run
from echelon.errors import UserError
from echelon.parties import GLOBAL, boundary_id_of, boundary_party, device_party
from echelon.rundir import RunDirectory, checkpoint_path

STOP_GRACE_S = 10.0
FINISH_GRACE_S = 30.0  # how long boundaries and devices get to end after the global plane ended the run


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_file", type=Path, help="run file (YAML); see examples/")
    add_run_options(parser)
    parser.add_argument(
        "--threads", type=count(MAX_THREADS), default=1, help="torch threads per device process"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted launch from <out>.partial and <out>.keys",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keys_dir(out: Path) -> Path:
    """Where a launch keeps the deployment's certificates and private keys while it runs."""
    return out.with_name(out.name + ".keys")


class Deployment:
    """The processes of one launched run, supervised; `stop` leaves none behind.

    Churn is carried out on the wall clock, `at_s` counting from the run's start (`started`: the
    global plane's outer step 0, once every boundary is connected): a device of `churn.joins` is
    started at its `at_s`; a device of `churn.departures` is told to leave for good (SIGUSR1: it
    says goodbye and ends) and is never restarted after; a boundary of `churn.outages` is stopped
    with its devices at `at_s` and restarted `duration_s` later, the boundary from its checkpoint."""

    def __init__(
        self,
        cfg: RunConfig,
        run_file: Path,
        certs: Path,
        run_dir: Path,
        threads: int,
        resume: bool,
        tensorboard: bool = False,
    ) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.argv: dict[str, list[str]] = {}
        self.restarts: dict[str, int] = {}
        self.max_restarts = cfg.deployment.max_restarts
        self.run_dir = run_dir
        self._ended_at: float | None = None  # when the global plane ended the run
        self.logs = run_dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.t0: float | None = None  # when the run started (monotonic), see `started`
        base = [sys.executable, "-m", "echelon", "serve"]
        common = ["--config", str(run_file), "--certs", str(certs), "--parent-pid", str(os.getpid())]
        global_at = f"127.0.0.1:{_free_port()}"
        self.argv[GLOBAL] = [*base, "global", *common, "--listen", global_at, "--run-dir", str(run_dir)]
        if tensorboard:
            self.argv[GLOBAL].append("--tensorboard")
        members: dict[str, list[str]] = {}  # boundary party -> its device parties
        for b, devices in cfg.certified_devices().items():
            at = f"127.0.0.1:{_free_port()}"
            self.argv[boundary_party(b)] = [
                *[*base, "boundary", *common, "--id", b, "--listen", at, "--global", global_at],
                *["--run-dir", str(run_dir)],
            ]
            members[boundary_party(b)] = [device_party(d) for d in devices]
            for d in devices:
                self.argv[device_party(d)] = [
                    *[*base, "device", *common, "--id", d, "--boundary", at, "--threads", str(threads)],
                    *["--run-dir", str(run_dir)],
                ]
        churn = cfg.churn
        self.joins = {device_party(j.device.id): j.at_s for j in churn.joins}  # not started before at_s
        self.departures = {device_party(d.device): d.at_s for d in churn.departures}
        # (boundary party, its device parties, from, until): offline for that wall-time window
        self.outages = [
            (boundary_party(o.boundary), members[boundary_party(o.boundary)], o.at_s, o.at_s + o.duration_s)
            for o in churn.outages
        ]
        self.offline: set[str] = set()  # parties stopped by an outage in progress
        self.left: set[str] = set()  # devices told to leave for good
        for party in self.argv:
            if party not in self.joins:
                self._start(party, resume)

    def _start(self, party: str, resume: bool) -> None:
        argv = self.argv[party]
        if resume and (party != GLOBAL or checkpoint_path(self.run_dir, GLOBAL).exists()):
            argv = [*argv, "--resume"]
        log = (self.logs / f"{party}.log").open("ab")
        # A session of its own: a terminal's Ctrl-C reaches only this process, which stops the
        # children in order; the children's parent watch covers this process dying outright.
        self.procs[party] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def _note(self, party: str, text: str) -> None:
        with (self.logs / f"{party}.log").open("a") as f:
            f.write(f"--- echelon launch: {text} ---\n")

    def started(self) -> None:
        """The run started (its outer step 0 is on record): the churn schedule's clock starts."""
        if self.t0 is None:
            self.t0 = time.monotonic()

    def churn(self) -> list[str]:
        """Carry out the churn whose time came; returns what it did."""
        if self.t0 is None:
            return []
        now, notes = time.monotonic() - self.t0, []
        for party, at in self.joins.items():
            if party not in self.procs and now >= at:
                self._start(party, resume=False)
                notes.append(f"{party} joins (churn.joins, at {at:g} s)")
        for party, at in self.departures.items():
            if party not in self.left and now >= at:
                self.left.add(party)
                if party in self.procs and self.procs[party].poll() is None:
                    self.procs[party].send_signal(signal.SIGUSR1)
                notes.append(f"{party} leaves for good (churn.departures, at {at:g} s)")
        for boundary, devices, start, end in self.outages:
            parties = [boundary, *devices]
            if start <= now < end and boundary not in self.offline:
                down = [p for p in parties if p in self.procs and self.procs[p].poll() is None]
                self._terminate([self.procs[p] for p in down])
                self.offline |= set(parties)
                for p in down:
                    self._note(p, f"offline (churn.outages) until {end:g} s")
                notes.append(f"{boundary} and its devices offline (churn.outages, {start:g} to {end:g} s)")
            elif now >= end and boundary in self.offline:
                self.offline -= set(parties)
                back = [p for p in parties if p in self.procs and p not in self.left]
                for p in back:
                    self._note(p, "back online (churn.outages)")
                    self._start(p, resume=True)
                notes.append(f"{boundary} and its devices back online, the boundary from its checkpoint")
        return notes

    def supervise(self) -> list[str]:
        """Carry out the churn due, and restart every party that died (a crash, a kill) while the
        run goes on; returns what it did. UserError, with the party's log, when a party is past
        its restarts."""
        if self.procs[GLOBAL].poll() == 0:
            return []  # the run is over: boundaries and devices are ending on their own
        notes = self.churn()
        for party, p in self.procs.items():
            code = p.poll()
            if code in (None, 0) or party in self.offline or party in self.left:
                continue
            done = self.restarts.get(party, 0)
            if done >= self.max_restarts:
                raise UserError(
                    f"{party} exited with code {code} after {done} restarts (deployment.max_restarts); its log "
                    f"ends:\n{self.tail(party)}"
                )
            self.restarts[party] = done + 1
            self._note(party, f"exited with code {code}; restart {done + 1}")
            self._start(party, resume=True)
            notes.append(f"{party} exited with code {code}; restarted ({done + 1} of {self.max_restarts})")
        return notes

    @property
    def finished(self) -> bool:
        """The global plane ended the run, and every boundary has ended (or had FINISH_GRACE_S to).
        Devices are workers: one still reconnecting to a boundary that already finished is stopped."""
        g = self.procs[GLOBAL]
        if g.poll() != 0:
            return False
        if self._ended_at is None:
            self._ended_at = time.monotonic()
        boundaries = [p for party, p in self.procs.items() if boundary_id_of(party) is not None]
        return (
            all(p.poll() is not None for p in boundaries)
            or time.monotonic() - self._ended_at > FINISH_GRACE_S
        )

    def stop(self) -> None:
        self._terminate(list(self.procs.values()))

    @staticmethod
    def _terminate(procs: list[subprocess.Popen]) -> None:
        """SIGTERM (their audit logs close as interrupted), then SIGKILL after STOP_GRACE_S."""
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
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


def _certificates(cfg: RunConfig, keys: Path, resume: bool) -> Path:
    """The deployment's certificates in `keys` (0700): made afresh, or kept from the launch resumed."""
    from echelon.runtime.grpc.tls import init_certs

    certs = keys / "certs"
    if resume:
        if not (certs / "ca.pem").is_file():
            raise UserError(f"cannot resume: {certs} holds no certificates of the interrupted launch")
        return certs
    shutil.rmtree(keys, ignore_errors=True)  # a previous launch's, as its `.partial` is replaced
    try:
        keys.mkdir(mode=0o700)
    except OSError as e:
        raise UserError(f"cannot create {keys} for the deployment's keys: {e.strerror}") from None
    init_certs(certs, cfg.certified_devices())
    return certs


def launch(
    cfg: RunConfig,
    run_file: Path,
    out: Path,
    *,
    force: bool,
    progress: bool,
    threads: int,
    resume: bool = False,
    tensorboard: bool = False,
) -> dict:
    """Run `cfg` as a local deployment and write its run directory; returns the summary.
    `tensorboard` adds TensorBoard event files (the run file itself is what every party runs)."""
    from echelon.preflight import preflight
    from echelon.progress import RunProgress

    preflight(cfg, run_file, out, deploy=True)
    run_dir = RunDirectory(out, force=force, resume=resume)
    keys = keys_dir(out)
    deployment = None
    try:
        if not resume:
            run_dir.write_yaml("config.yaml", cfg.model_dump(mode="json"))
        certs = _certificates(cfg, keys, resume)
        deployment = Deployment(cfg, run_file.resolve(), certs, run_dir.staging, threads, resume, tensorboard)
        bar, seen = RunProgress(cfg.budget, clock="elapsed", enabled=progress), 0
        with bar:
            while not deployment.finished:
                for note in deployment.supervise():
                    print(f"echelon launch: {note}", file=sys.stderr)
                records, seen = _outer_steps(run_dir.staging / "metrics.jsonl", seen)
                for r in records:
                    deployment.started()
                    bar.update(r)
                time.sleep(0.2)
        deployment.stop()  # devices left reconnecting to a finished boundary
        summary = json.loads((run_dir.staging / "summary.json").read_text())
        pins = out.with_name(f"{out.name}.{PINS_FILE}")
        pins.unlink(missing_ok=True)  # a forced rerun's; the run directory it pinned is replaced too
        shutil.copyfile(keys / "certs" / PINS_FILE, pins)
    except BaseException as e:
        if deployment is None:
            raise
        deployment.stop()
        hint = (
            f"the interrupted run is in {run_dir.staging} and its keys in {keys}: "
            f"`echelon launch {run_file} --out {out} --resume` continues it"
        )
        if isinstance(e, UserError):
            raise UserError(f"{e}\n{hint}") from None
        print(hint, file=sys.stderr)
        raise
    run_dir.commit()
    shutil.rmtree(keys, ignore_errors=True)
    return summary


def run(args: argparse.Namespace) -> int:
    return launch_file(args.run_file, args)


def launch_file(path: Path, args: argparse.Namespace) -> int:
    """Launch the run file at `path` with the command's options; print the summary."""
    cfg = load_run(path)
    out = args.out or Path("runs") / cfg.name
    summary = launch(
        cfg,
        path,
        out,
        force=args.force,
        progress=not args.no_progress,
        threads=args.threads,
        resume=getattr(args, "resume", False),
        tensorboard=args.tensorboard,
    )
    print_summary(summary, out)
    return 0
