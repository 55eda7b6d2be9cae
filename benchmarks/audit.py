"""Audit figures: logging overhead on a demo run, and verification speed on a 1,000,000-record log.

1. Overhead: the demo's run file (a shorter token budget with --tokens) trains once in this
   process with every party's guard writing its signed audit log through a timing wrapper; the
   time spent in the log (creating, appending, checkpointing, closing) is divided by the run's
   wall time. Target < 1%.
2. Verification: one party's log of N message records is written (the global plane's receipts of
   real serialized cross-boundary envelopes, each keeping its sender's chain head, checkpoint
   every 1,000), then `verify_log` re-checks every hash, link, field and signature. Target:
   1,000,000 records in under 30 s. (Receipts, not sends: a send is synced to disk before it
   leaves, milliseconds each, which a run pays per cross-boundary message and figure 1 counts.)

    .venv/bin/python benchmarks/audit.py [--tokens 200000] [--records 1000000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from echelon.audit.anchor import RunBinding
from echelon.audit.layout import log_path
from echelon.audit.log import AuditLog
from echelon.audit.report import UNANCHORED
from echelon.audit.verify import verify_log, verify_run
from echelon.commands.demo import demo_config
from echelon.contract.guard import EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.contract.provenance import BoundaryModel
from echelon.runner import open_audit_logs, train
from echelon.v1 import boundary_pb2


class TimedLog:
    """Forwards to an AuditLog, adding the seconds spent in it to `spent`."""

    def __init__(self, log: AuditLog, spent: list[float]) -> None:
        self.log, self.spent = log, spent

    def append(self, **fields: object) -> dict:
        t0 = time.perf_counter()
        try:
            return self.log.append(**fields)
        finally:
            self.spent[0] += time.perf_counter() - t0

    def head(self) -> tuple[int, str]:
        t0 = time.perf_counter()
        try:
            return self.log.head()
        finally:
            self.spent[0] += time.perf_counter() - t0

    def countersigned(self, peer: str, seq: int) -> bool:
        t0 = time.perf_counter()
        try:
            return self.log.countersigned(peer, seq)
        finally:
            self.spent[0] += time.perf_counter() - t0

    def close(self) -> None:
        t0 = time.perf_counter()
        self.log.close()
        self.spent[0] += time.perf_counter() - t0


def logging_overhead(tokens: int, out: Path, quick: bool = False) -> dict:
    import echelon.runner as runner

    cfg = demo_config(tokens, smoke=quick)
    spent = [0.0]

    def timed_open(run_dir, run_cfg, min_quorum, binding):
        t0 = time.perf_counter()
        logs = open_audit_logs(run_dir, run_cfg, min_quorum, binding)
        spent[0] += time.perf_counter() - t0
        return {p: TimedLog(log, spent) for p, log in logs.items()}

    runner.open_audit_logs = timed_open
    try:
        t0 = time.perf_counter()
        train(cfg, out / "demo", progress=False)
        wall = time.perf_counter() - t0
    finally:
        runner.open_audit_logs = open_audit_logs
    report = verify_run(out / "demo", accept=frozenset({UNANCHORED}))  # simulated: keys in memory
    return {
        "wall": wall,
        "audit": spent[0],
        "records": sum(log.records for log in report.logs.values()),
        "ok": report.ok,
    }


def verification_speed(records: int, out: Path) -> dict:
    model = BoundaryModel(torch.zeros(16), min_quorum=2)
    model.apply_aggregate(model.open_round(1, 2).seal(np.ones(16), 2.0, 2), lr=1.0)
    bodies = [
        boundary_pb2.BoundaryStatus(middle_step=1, drift=0.5, tokens=4096, contributors=2),
        boundary_pb2.BoundaryDelta(outer_step=1, tokens=4096, contributors=2, delta=model.delta_payload()),
        boundary_pb2.BoundaryDelta(outer_step=1),
    ]
    terms, binding = Terms(2, 16), RunBinding("0" * 32, "0" * 64)
    (out / "sender" / "audit").mkdir(parents=True)
    (out / "audit").mkdir(parents=True)
    sender_path = log_path(out / "sender", "boundary.b0")
    with AuditLog.create(
        sender_path, "boundary.b0", Ed25519PrivateKey.generate(), "virtual", binding
    ) as sent:
        sender = EgressGuard("boundary.b0", terms, sent, model.ledger)
        envelopes = [
            boundary_pb2.CrossBoundaryEnvelope.FromString(sender.send(0.0, b, "global")[0]) for b in bodies
        ]
    key = Ed25519PrivateKey.generate()
    path = log_path(out, "global")
    write_s = 0.0
    with AuditLog.create(path, "global", key, "virtual", binding, min_quorum=2) as log:
        guard = IngressGuard("global", terms, log)  # records exactly as in a run
        for i in range(records):
            # Each message carries a head of its own, as a sender's grows (the guard refuses a
            # head it countersigned already: a replay); framing it is not the receiver's cost.
            envelope = envelopes[i % 3]
            envelope.audit_head.seq = i
            frame = envelope.SerializeToString()
            t0 = time.perf_counter()
            guard.receive(i * 1e-3, frame, "boundary.b0")
            write_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = verify_log(path, key.public_key())
    verify_s = time.perf_counter() - t0
    assert rep.records == records and not rep.violations, rep.violations[:3]
    return {"write": write_s, "verify": verify_s, "bytes": path.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000, help="token budget of the demo run")
    parser.add_argument("--records", type=int, default=1_000_000, help="records in the generated log")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run (CI): 3,000 tokens, 50,000 records, not the figure"
    )
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.records = 3_000, 50_000
    with tempfile.TemporaryDirectory() as tmp:
        over = logging_overhead(args.tokens, Path(tmp) / "overhead", args.quick)
        speed = verification_speed(args.records, Path(tmp) / "speed")
    table = Table(title="Audit log: overhead and verification speed")
    for col in ("Figure", "Value", "Target"):
        table.add_column(col)
    table.add_row("demo run wall time", f"{over['wall']:.1f} s", "")
    table.add_row("time in the audit log", f"{over['audit'] * 1e3:.1f} ms ({over['records']} records)", "")
    table.add_row("logging overhead", f"{over['audit'] / over['wall']:.4%}", "< 1%")
    table.add_row("demo run audit passes", str(over["ok"]), "True")
    table.add_row(
        "records written",
        f"{args.records:,} in {speed['write']:.1f} s ({speed['bytes'] / 2**20:.0f} MiB)",
        "",
    )
    table.add_row("verification time", f"{speed['verify']:.1f} s", "< 30 s")
    table.add_row("verification speed", f"{args.records / speed['verify']:,.0f} records/s", "")
    Console().print(table)


if __name__ == "__main__":
    main()
