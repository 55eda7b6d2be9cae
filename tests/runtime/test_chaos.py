"""Chaos on a whole local deployment (`echelon launch`): parties killed, the launcher killed and
resumed, a run interrupted, a run with churn, boundaries that never come. Each fault has one
expected outcome; `benchmarks/chaos.py` prints the same faults as a table. Slow: each test runs
a deployment of nine processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from echelon.audit.verify import verify_run
from echelon.config import RunConfig
from echelon.runtime.grpc.tls import init_certs, load_credentials
from tests.conftest import small_run

pytestmark = pytest.mark.slow


class Launch:
    """`echelon launch` of a run file in a subprocess, and its parties' processes."""

    def __init__(self, tmp_path: Path, spec: dict, *extra: str) -> None:
        self.run_file = tmp_path / "run.yaml"
        self.run_file.write_text(yaml.safe_dump(spec))
        self.out = tmp_path / "out"
        self.partial = tmp_path / "out.partial"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "echelon",
                "launch",
                str(self.run_file),
                "--out",
                str(self.out),
                "--no-progress",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def outer_steps(self) -> list[int]:
        metrics = (self.out if self.out.exists() else self.partial) / "metrics.jsonl"
        if not metrics.exists():
            return []
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
        return [r["outer_step"] for r in records if r["kind"] == "outer_step"]

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while max(self.outer_steps(), default=-1) < step:
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, f"outer step {step} not reached"
            time.sleep(0.3)

    def pid(self, party: str) -> int:
        role, _, ident = party.partition(".")
        pattern = f"serve {role} --config {self.run_file}" + (f" .*--id {ident} " if ident else "")
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        assert len(found) == 1, (party, found)
        return int(found[0])

    def leftovers(self) -> list[str]:
        return subprocess.run(
            ["pgrep", "-f", str(self.run_file)], capture_output=True, text=True
        ).stdout.split()

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.returncode, out, err


def _spec(**overrides) -> dict:
    return small_run(budget={"outer_steps": 4}, **overrides)


def _no_processes_left(launch: Launch) -> None:
    deadline = time.monotonic() + 30
    while launch.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert launch.leftovers() == []


def test_killed_parties_are_restarted_and_the_run_completes_with_a_clean_audit(tmp_path):
    launch = Launch(tmp_path, _spec())
    try:
        launch.wait_for_step(1)
        os.kill(launch.pid("device.d0"), signal.SIGKILL)
        launch.wait_for_step(2)
        os.kill(launch.pid("boundary.b1"), signal.SIGKILL)  # it resumes from its checkpoint
        code, _, err = launch.finish()
    finally:
        _no_processes_left(launch)
    assert code == 0, err
    assert "device.d0 exited with code -9; restarted (1 of 3)" in err
    assert "boundary.b1 exited with code -9; restarted (1 of 3)" in err
    assert sorted(set(launch.outer_steps())) == [0, 1, 2, 3, 4]
    assert json.loads((launch.out / "summary.json").read_text())["outer_steps"] == 4
    assert "resuming at middle step" in (launch.out / "logs" / "boundary.b1.log").read_text()
    report = verify_run(launch.out)
    assert report.ok, [v.reason for v in report.violations][:3]
    assert report.logs["boundary.b1"].crashes == 1


def test_kill_9_of_launch_leaves_no_keys_in_tmp_and_resume_completes_the_run(tmp_path):
    before = {p.name for p in Path("/tmp").iterdir() if "cert" in p.name}
    launch = Launch(tmp_path, _spec())
    launch.wait_for_step(1)
    launch.proc.kill()
    launch.proc.wait()
    _no_processes_left(launch)  # the parties saw their parent go and stopped
    assert {p.name for p in Path("/tmp").iterdir() if "cert" in p.name} == before
    keys = tmp_path / "out.keys"
    assert keys.stat().st_mode & 0o777 == 0o700
    resumed = Launch(tmp_path, _spec(), "--resume")
    try:
        code, _, err = resumed.finish()
    finally:
        _no_processes_left(resumed)
    assert code == 0, err
    assert sorted(set(resumed.outer_steps())) == [0, 1, 2, 3, 4]
    assert not keys.exists()  # a completed run's keys are deleted
    report = verify_run(resumed.out)
    assert report.ok, [v.reason for v in report.violations][:3]


def test_an_interrupted_run_audits_without_violations(tmp_path):
    """Ctrl-C stops every party; what was in flight is reported as such, not as a violation."""
    launch = Launch(tmp_path, _spec(budget={"outer_steps": 1000}))
    launch.wait_for_step(2)
    launch.proc.send_signal(signal.SIGINT)
    code, _, err = launch.finish(timeout=60)
    _no_processes_left(launch)
    assert code == 130
    assert "--resume` continues it" in err
    report = verify_run(launch.partial)
    assert not report.violations, [v.reason for v in report.violations][:3]
    assert all(log.closed for log in report.logs.values())


def test_a_deployment_honours_churn(tmp_path):
    spec = _spec(churn={"mean_uptime_s": 8, "mean_downtime_s": 2}, budget={"outer_steps": 5})
    launch = Launch(tmp_path, spec)
    try:
        code, _, err = launch.finish(timeout=400)
    finally:
        _no_processes_left(launch)
    assert code == 0, err
    logs = [p.read_text() for p in (launch.out / "logs").glob("device.*.log")]
    assert sum(text.count("churn: offline for") for text in logs) >= 2
    assert verify_run(launch.out).ok


def test_secure_outer_aggregation_of_a_large_delta_crosses_in_slices(tmp_path):
    """+SA: the masked Delta_b (8 bytes per parameter) is over gRPC's 4 MiB message limit here."""
    model = {"preset": "tiny", "trainable": "lora", "lora": {"r": 160, "alpha": 8, "dropout": 0.0}}
    launch = Launch(tmp_path, _spec(strategy="echelon+sa", model=model, budget={"outer_steps": 2}))
    try:
        code, _, err = launch.finish(timeout=400)
    finally:
        _no_processes_left(launch)
    assert code == 0, err
    assert json.loads((launch.out / "summary.json").read_text())["outer_steps"] == 2
    assert verify_run(launch.out).ok


def test_a_global_plane_whose_boundaries_never_come_ends_on_its_patience(tmp_path):
    from echelon.runtime.grpc.global_role import run_global

    cfg = RunConfig.model_validate(small_run(deployment={"patience_s": 2}))
    init_certs(tmp_path / "certs", {b.id: [d.id for d in b.devices] for b in cfg.boundaries})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    creds = load_credentials(tmp_path / "certs", "global")
    summary = asyncio.run(asyncio.wait_for(run_global(cfg, creds, "127.0.0.1:0", run_dir), 120))
    assert summary["stop_reason"] == "patience" and summary["outer_steps"] == 0
    assert (run_dir / summary["artefact"]).is_dir()  # the last synchronised model: the initial one
