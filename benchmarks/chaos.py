"""Chaos: faults thrown at a deployment, and what it did about each (fault -> outcome).

In-process faults run the deployed global plane or a boundary in this process, over loopback gRPC
with mutual TLS, against a client holding a real party's certificate:

- mutated frames: N real frames with bytes flipped, cut or extended, from an authenticated
  boundary; outcome: how many were refused (and recorded in the audit log), whether the stream
  stayed open and the run still completed its outer step;
- a BoundaryDelta one element too long, and one full of NaN: refused and recorded, theta_g finite;
- never-ending device chunks (--flood-mib of them, no `last`): how much the boundary held at most;
- a second stream presenting a live boundary's certificate: refused, the real stream unaffected;
- no boundary ever comes: the global plane ends on its patience with the last synchronised model.

Process faults run `echelon launch` on a small run (two boundaries of two devices) and kill:
a device, a boundary, the global plane (each kill -9, restarted by launch from its checkpoint),
and launch itself (then `--resume`); and Ctrl-C (the audit must show no violation).

    .venv/bin/python benchmarks/chaos.py [--quick] [--mutations 2000] [--flood-mib 300]

--quick runs the in-process faults only, with 300 mutations and a 48 MiB flood.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from echelon.audit.anchor import PINS_FILE
from echelon.audit.report import CRASH, IN_FLIGHT, AuditReport
from echelon.audit.verify import verify_log, verify_run
from echelon.config import RunConfig
from echelon.contract.guard import IngressGuard
from echelon.contract.policy import Terms
from echelon.contract.slicing import encode_frames
from echelon.runtime.grpc.boundary_role import BoundaryRole
from echelon.runtime.grpc.global_role import GlobalRole
from echelon.runtime.grpc.tls import init_certs, load_credentials
from echelon.runtime.grpc.transport import CROSS_METHOD, LOCAL_METHOD, make_channel
from echelon.tensors import payload as tensor_payload
from echelon.v1 import boundary_pb2, services_pb2, tensor_pb2
from echelon.wire import CROSS_BOUNDARY_BODIES

RUN = {
    "name": "chaos",
    "seed": 0,
    "model": {"preset": "tiny", "trainable": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    "data": {"source": "stdlib", "seq_len": 32, "max_documents": 40},
    "train": {"inner_steps": 2, "micro_batch": 4, "lr": 0.003},
    "echelon": {"buffer_size": 2, "buffer_timeout_s": 5, "sync": {"interval": 2}},
    "boundaries": [
        {"id": "b0", "devices": [{"id": "d0", "tokens_per_s": 2000}, {"id": "d1", "tokens_per_s": 1000}]},
        {"id": "b1", "devices": [{"id": "d2", "tokens_per_s": 1500}, {"id": "d3", "tokens_per_s": 800}]},
    ],
    "budget": {"outer_steps": 4},
    "eval": {"sequences": 8, "batch": 8},
}


# What killing a party causes and its operator accepts: a log reopened after a crash, messages
# lost with it.
CRASHED = frozenset({CRASH, IN_FLIGHT})


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _certs(tmp: Path, cfg: RunConfig) -> Path:
    init_certs(tmp / "certs", {b.id: [d.id for d in b.devices] for b in cfg.boundaries})
    return tmp / "certs"


# In-process faults ---------------------------------------------------------------------------


class Boundary:
    """A boundary's side of its stream to the global plane, with its real certificate and no
    egress guard (an attacker needs none): it frames whatever it likes as a boundary would."""

    def __init__(self, certs: Path, boundary_id: str, target: str, dim: int) -> None:
        self.boundary_id = boundary_id
        self.creds = load_credentials(certs, f"boundary.{boundary_id}")
        self.ingress = IngressGuard(self.creds.party, Terms(min_quorum=2, dim=dim, boundaries=2), None)
        self.channel = make_channel(self.creds, target, "global")
        self.call = self.channel.stream_stream(CROSS_METHOD)()
        self.sent = 0

    def frames(self, body) -> list[bytes]:
        """`body` in its envelope with a made-up chain head, sliced as every large message is."""
        envelope = boundary_pb2.CrossBoundaryEnvelope(boundary_id=self.boundary_id)
        getattr(envelope, CROSS_BOUNDARY_BODIES[body.DESCRIPTOR.full_name]).CopyFrom(body)
        envelope.audit_head.seq, envelope.audit_head.hash = self.sent, bytes(32)
        self.sent += 1
        return list(encode_frames(envelope))

    async def send(self, body) -> None:
        for frame in self.frames(body):
            await self.call.write(frame)

    async def expect(self, kind: type, within: float = 60.0):
        async def wait():
            while not isinstance(body := self.ingress.receive(0.0, await self.call.read(), "global"), kind):
                pass
            return body

        return await asyncio.wait_for(wait(), within)


def delta(step: int, values: np.ndarray) -> boundary_pb2.BoundaryDelta:
    """A boundary's Delta_b for outer step `step` (2 contributors)."""
    # A forger's payload: built below the guard, as an attacker would, not minted by a boundary.
    forged = tensor_payload(values, tensor_pb2.BOUNDARY_AGGREGATE, 2, tensor_pb2.FLOAT32)
    return boundary_pb2.BoundaryDelta(
        outer_step=step, tokens=256, middle_step=1, delta=forged, contributors=2
    )


def mutations(frames: list[bytes], n: int, seed: int) -> list[bytes]:
    """`n` frames, each a real frame with a few bytes flipped, cut short or extended (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        frame = bytearray(frames[rng.integers(len(frames))])
        kind = rng.integers(3)
        if kind == 0:
            for at in rng.integers(0, len(frame), size=rng.integers(1, 4)):
                frame[at] ^= int(rng.integers(1, 256))
        elif kind == 1:
            frame = frame[: rng.integers(0, len(frame))]
        else:
            frame += rng.bytes(int(rng.integers(1, 64)))
        out.append(bytes(frame))
    return out


@dataclass
class GlobalFaults:
    """What the global plane did with `count` mutated frames, two bad deltas, an impostor and a replay."""

    count: int
    summary: dict  # the run's summary
    refused: list[str]  # the reasons of the refusals in its audit log
    impostor: str  # the status the impostor's stream got
    replay: bool  # a message sent twice, byte for byte, was refused (and recorded) the second time
    finite: bool  # theta_g is finite at the end


async def global_faults(tmp: Path, count: int) -> GlobalFaults:
    """Mutated frames, a bad delta, a NaN delta, an impostor stream and a replay against one global plane,
    then a regular outer step: the run must complete it."""
    cfg = RunConfig.model_validate(
        {**RUN, "budget": {"outer_steps": 1}, "echelon": {**RUN["echelon"], "sync": {"interval": 1}}}
    )
    certs = _certs(tmp, cfg)
    run_dir = tmp / "global"
    run_dir.mkdir()
    at = _port()
    role = GlobalRole(cfg, load_credentials(certs, "global"), at, run_dir, resume=False)
    serving = asyncio.create_task(role.run())
    dim = role.plane.theta_g.numel()
    b0, b1 = Boundary(certs, "b0", at, dim), Boundary(certs, "b1", at, dim)
    status = boundary_pb2.BoundaryStatus(middle_step=0, drift=0.1)
    for b in (b0, b1):
        await b.send(status)
    for b in (b0, b1):
        await b.expect(boundary_pb2.GlobalReference)
    cadence = boundary_pb2.CadenceUpdate(interval=7)
    # The frames mutated below carry heads far from those of b0's own later messages, so that a
    # flipped bit of their head forges a head b0 never sends, not one of its next (that message
    # would be refused as a replay: the forger's doing, not the global plane's).
    sent, b0.sent = b0.sent, 1 << 20
    genuine = b0.frames(cadence) + b0.frames(delta(9, np.ones(dim)))
    b0.sent = sent
    for i, frame in enumerate(mutations(genuine, count, seed=0)):
        await b0.call.write(frame)
        if i % 16 == 15:  # a valid message now and then: the stream must still take it
            await b0.send(status)
    impostor = Boundary(certs, "b1", at, dim)
    try:
        await impostor.send(status)  # refused as it opens: the write may already fail
        await impostor.call.read()
        impostor_code = "admitted"
    except grpc.aio.AioRpcError as e:
        impostor_code = e.code().name
    await impostor.channel.close()
    replayed_seq = b0.sent
    again = b0.frames(boundary_pb2.BoundaryStatus(middle_step=0, drift=0.2))
    for frame in again + again:  # one message, then the same bytes again: a replay
        await b0.call.write(frame)
    await b0.send(boundary_pb2.BoundaryStatus(middle_step=1, drift=0.1, tokens_total=128))
    request = await b0.expect(boundary_pb2.SyncRequest)
    await b0.send(delta(request.outer_step, np.ones(dim + 1)))
    await b0.send(delta(request.outer_step, np.full(dim, np.nan)))
    await b0.send(delta(request.outer_step, np.full(dim, 0.01)))
    await b1.send(delta(request.outer_step, np.full(dim, -0.01)))
    await b0.expect(boundary_pb2.GlobalReference)
    for b in (b0, b1):
        await b.call.done_writing()
    summary = await asyncio.wait_for(serving, 120)
    for b in (b0, b1):
        await b.channel.close()
    refused = [f.reason for f in verify_log(run_dir / "audit" / "global.jsonl", None, "global").refused]
    replay = any(f"a replayed message: boundary.b0's chain head at seq {replayed_seq} " in x for x in refused)
    finite = bool(np.isfinite(role.plane.theta_g.numpy()).all())
    return GlobalFaults(count, summary, refused, impostor_code, replay, finite)


def _global_rows(r: GlobalFaults) -> list[tuple[str, str, str]]:
    steps = r.summary["outer_steps"]
    done = f"run completed {steps} outer step" if steps == 1 else "RUN STALLED"
    return [
        (
            f"{r.count:,} mutated frames from an authenticated boundary",
            "each refused and recorded; the stream stays open",
            f"{r.summary['refused'] - 3:,} refused ({len(r.refused) - 4:,} on record), the rest harmless; {done}",
        ),
        (
            "a boundary's message sent again, byte for byte",
            "refused as a replay and recorded",
            "refused as a replay and recorded" if r.replay else "ACCEPTED",
        ),
        (
            "BoundaryDelta one element too long",
            "refused and recorded",
            "refused and recorded" if any("elements" in x for x in r.refused) else "ACCEPTED",
        ),
        (
            "BoundaryDelta full of NaN",
            "refused and recorded; theta_g finite",
            ("refused and recorded" if any("NaN" in x for x in r.refused) else "ACCEPTED")
            + ("; theta_g finite" if r.finite else "; theta_g NOT FINITE"),
        ),
        (
            "second stream with a live boundary's certificate",
            "refused (ALREADY_EXISTS), recorded; the real one goes on",
            r.impostor
            + ("; recorded" if any("stream refused" in x for x in r.refused) else "; NOT RECORDED"),
        ),
    ]


async def _flood(tmp: Path, mib: int) -> tuple[str, str, str]:
    """Never-ending chunks from an authenticated device: the most the boundary holds."""
    cfg = RunConfig.model_validate(RUN)
    certs = _certs(tmp, cfg)
    at = _port()
    tracemalloc.start()
    role = BoundaryRole(cfg, load_credentials(certs, "boundary.b0"), "b0", at, _port(), tmp, resume=False)
    serving = asyncio.create_task(role.run())  # the global plane is unreachable: it keeps dialling
    await asyncio.sleep(0.5)
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    channel = make_channel(load_credentials(certs, "device.d0"), at, "boundary.b0")
    call = channel.stream_stream(LOCAL_METHOD)()
    piece = services_pb2.DeviceChunk(data=b"x" * (1 << 20), last=False).SerializeToString()
    sent = 0

    async def flood() -> None:
        nonlocal sent
        for _ in range(mib):
            await call.write(piece)
            sent += 1

    refusals: list[str] = []  # the boundary's own word: it refuses at the cap and ends the stream
    seen = logging.Handler()
    seen.emit = lambda record: refusals.append(record.getMessage())  # type: ignore[method-assign]
    serve_log = logging.getLogger("echelon.serve")
    was = serve_log.level, serve_log.propagate
    serve_log.setLevel(logging.ERROR)
    serve_log.propagate = False  # read here, not printed
    serve_log.addHandler(seen)
    writer = asyncio.create_task(flood())
    try:
        await asyncio.wait_for(call.read(), 120)
        ended = "the stream stayed open"
    except grpc.aio.AioRpcError as e:
        # grpc-python reports INTERNAL to a client whose own write was under way when the server's
        # status came: the status the boundary sent is then read from its log.
        capped = any("exceeds the cap" in r for r in refusals)
        status = "RESOURCE_EXHAUSTED (its log: refused at the cap)" if capped else "no refusal logged"
        ended = f"the boundary ended the stream with {status}; the client saw {e.code().name}"
    except TimeoutError:
        ended = "the stream stayed open"
    serve_log.removeHandler(seen)
    serve_log.setLevel(was[0])
    serve_log.propagate = was[1]
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    held = (tracemalloc.get_traced_memory()[1] - base) / (1 << 20)
    tracemalloc.stop()
    await channel.close()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    return (
        f"{mib} MiB of never-ending chunks from a device",
        f"the stream ends at the cap ({role.cap / (1 << 20):.1f} MiB): RESOURCE_EXHAUSTED",
        f"{ended} after {sent} MiB; the boundary's Python heap grew {held:.1f} MiB at most",
    )


async def _patience(tmp: Path) -> tuple[str, str, str]:
    cfg = RunConfig.model_validate({**RUN, "deployment": {"patience_s": 2}})
    certs = _certs(tmp, cfg)
    (tmp / "run").mkdir()
    t0 = time.monotonic()
    summary = await GlobalRole(
        cfg, load_credentials(certs, "global"), "127.0.0.1:0", tmp / "run", False
    ).run()
    return (
        "no boundary ever comes (patience 2 s)",
        "the global plane ends the run on its last synchronised model",
        f"ended after {time.monotonic() - t0:.0f} s: stop reason {summary['stop_reason']}, outer step "
        f"{summary['outer_steps']}, model written",
    )


# Process faults --------------------------------------------------------------------------------


def processes_of(run_file: Path) -> list[str]:
    """Pids of every process still running the run file (launch and its parties)."""
    return subprocess.run(["pgrep", "-f", str(run_file)], capture_output=True, text=True).stdout.split()


def kill_run(run_file: Path) -> None:
    """SIGKILL every process of the run file: its parties run in sessions of their own, so
    killing launch alone leaves them running."""
    for pid in processes_of(run_file):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def interruptible() -> None:
    """In a child about to run `echelon launch`: SIGINT back to its default, which Python turns
    into KeyboardInterrupt. A job started in the background of a non-interactive shell inherits
    SIGINT ignored, and the Ctrl-C cases would then time out against a launch that never hears it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Launch:
    """`echelon launch` of `spec` in a subprocess under `tmp`, and its parties' processes."""

    def __init__(self, tmp: Path, spec: dict, *extra: str) -> None:
        self.tmp, self.run_file, self.out = tmp, tmp / "run.yaml", tmp / "out"
        self.partial = tmp / "out.partial"
        self.run_file.write_text(yaml.safe_dump(spec))
        argv = [
            sys.executable,
            "-m",
            "echelon",
            "launch",
            str(self.run_file),
            "--out",
            str(self.out),
            "--no-progress",
        ]
        self.proc = subprocess.Popen(
            [*argv, *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=interruptible,
        )
        self.t0 = time.monotonic()

    def steps(self) -> list[int]:
        """The outer steps recorded so far (a step repeated after a restart appears twice)."""
        metrics = (self.out if self.out.exists() else self.partial) / "metrics.jsonl"
        if not metrics.exists():
            return []
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
        return [r["outer_step"] for r in lines if r["kind"] == "outer_step"]

    def wait_for(self, step: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while max(self.steps(), default=-1) < step:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"outer step {step} not reached: {self.proc.communicate()[1][-2000:]}")
            time.sleep(0.3)

    def pid(self, party: str) -> int:
        role, _, ident = party.partition(".")
        pattern = f"serve {role} --config {self.run_file}" + (f" .*--id {ident} " if ident else "")
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        if len(found) != 1:
            raise RuntimeError(f"{len(found)} processes of {party}")
        return int(found[0])

    def kill(self, party: str) -> None:
        os.kill(self.pid(party), signal.SIGKILL)

    def leftovers(self, wait_s: float = 30) -> list[str]:
        """Processes of this run still alive after up to `wait_s` seconds."""
        deadline = time.monotonic() + wait_s
        while True:
            left = processes_of(self.run_file)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        """Launch's exit code and stderr. Past `timeout` it is killed with every process of its
        run (its parties run in sessions of their own), so a launch that hangs leaves nothing
        behind to slow what runs next."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
                kill_run(self.run_file)
        return self.proc.returncode, err

    def report(self, accept: frozenset[str] = frozenset()) -> AuditReport:
        """`echelon audit` of this launch's run against its pinned keys: beside the run once it
        completed, in the keys directory an interrupted launch keeps."""
        if self.out.exists():
            return verify_run(self.out, self.tmp / f"out.{PINS_FILE}", accept)
        return verify_run(self.partial, self.tmp / "out.keys" / "certs", accept)

    def audit(self, accept: frozenset[str] = frozenset()) -> str:
        """The audit's verdict, accepting `accept` (the crashes and losses a fault causes)."""
        report = self.report(accept)
        verdict = "audit passed" if report.ok else f"AUDIT: {len(report.violations)} violations"
        return f"{verdict} (accepting {', '.join(sorted(accept)) or 'nothing'}), {len(report.in_flight)} in flight"


def _killed(tmp: Path, party: str) -> tuple[str, str, str]:
    launch = Launch(tmp, RUN)
    launch.wait_for(1)
    launch.kill(party)
    code, err = launch.finish()
    restarted = "restarted" if f"{party} exited with code -9; restarted" in err else "NOT RESTARTED"
    if code != 0:
        return (f"kill -9 {party}", "restarted; the run completes", f"{restarted}; LAUNCH FAILED ({code})")
    summary = json.loads((launch.out / "summary.json").read_text())
    return (
        f"kill -9 {party}",
        "restarted from its checkpoint; the run completes",
        f"{restarted}; {summary['outer_steps']} outer steps in {time.monotonic() - launch.t0:.0f} s; "
        + launch.audit(CRASHED),
    )


def _launch_killed(tmp: Path) -> tuple[str, str, str]:
    before = {p.name for p in Path("/tmp").iterdir()}
    launch = Launch(tmp, RUN)
    launch.wait_for(1)
    launch.proc.kill()
    launch.proc.wait()
    time.sleep(3)
    left = processes_of(launch.run_file)
    keys_in_tmp = [p for p in Path("/tmp").iterdir() if p.name not in before and "cert" in p.name]
    resumed = Launch(tmp, RUN, "--resume")
    code, _ = resumed.finish()
    return (
        "kill -9 of launch, then launch --resume",
        "no process and no key in /tmp left, every log closed as interrupted; the resumed run completes",
        f"{len(left)} processes left, {len(keys_in_tmp)} keys in /tmp; resume "
        + (
            f"completed outer step {max(resumed.steps())}; " + resumed.audit(frozenset({IN_FLIGHT}))
            if code == 0
            else f"FAILED ({code})"
        ),
    )


def _interrupted(tmp: Path) -> tuple[str, str, str]:
    launch = Launch(tmp, {**RUN, "budget": {"outer_steps": 1000}})
    launch.wait_for(2)
    launch.proc.send_signal(signal.SIGINT)
    code, _ = launch.finish()
    return (
        "Ctrl-C of launch",
        "every party stops; audit: in flight, no violation",
        f"exit {code}; " + launch.audit(frozenset({IN_FLIGHT})),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="in-process faults only, smaller")
    parser.add_argument("--mutations", type=int, default=2000, help="mutated frames from a boundary")
    parser.add_argument("--flood-mib", type=int, default=300, help="MiB of never-ending device chunks")
    args = parser.parse_args()
    logging.getLogger("echelon").setLevel(logging.CRITICAL)  # the refusals are the point: no log lines
    if args.quick:
        args.mutations, args.flood_mib = 300, 48
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="echelon-chaos-") as tmp:
        root = Path(tmp)

        def fresh(name: str) -> Path:
            (root / name).mkdir()
            return root / name

        rows += _global_rows(asyncio.run(global_faults(fresh("global"), args.mutations)))
        rows.append(asyncio.run(_flood(fresh("flood"), args.flood_mib)))
        rows.append(asyncio.run(_patience(fresh("patience"))))
        if not args.quick:
            process_faults: list[Callable[[Path], tuple[str, str, str]]] = [
                lambda p: _killed(p, "device.d0"),
                lambda p: _killed(p, "boundary.b1"),
                lambda p: _killed(p, "global"),
                _launch_killed,
                _interrupted,
            ]
            for i, fault in enumerate(process_faults):
                rows.append(fault(fresh(f"launch{i}")))
    table = Table(title=f"chaos: fault -> outcome ({os.cpu_count()} cores)")
    for col in ("fault", "expected", "observed"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 160)).print(table)


if __name__ == "__main__":
    main()
