"""Chaos on a deployment: the faults of `benchmarks/chaos.py` (which prints them as a table),
each with the outcome it must have. Slow: each runs a deployment, most of them `echelon launch`
with nine processes."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from benchmarks.chaos import CRASHED, RUN, Launch, global_faults
from echelon.config import RunConfig
from echelon.runtime.grpc.tls import init_certs, load_credentials

pytestmark = pytest.mark.slow

MUTATED = 2000  # as many as stopped the global plane's reader twice before


def test_garbage_from_an_authenticated_boundary_is_refused_recorded_and_the_run_goes_on(tmp_path):
    r = asyncio.run(global_faults(tmp_path, MUTATED))
    assert r.impostor == "ALREADY_EXISTS"
    assert r.summary["outer_steps"] == 1 and r.finite
    assert r.summary["refused"] >= MUTATED // 2  # most mutations break the contract or the encoding
    assert any("elements where the model has" in x for x in r.refused)  # one element too many
    assert any("NaN" in x for x in r.refused)
    assert any("stream refused" in x for x in r.refused)
    assert len(r.refused) == r.summary["refused"] + 1  # every refusal is on record (and the stream's)


def _done(launch: Launch, timeout: float = 400) -> str:
    try:
        code, err = launch.finish(timeout)
    finally:
        assert launch.leftovers() == []
    assert code == 0, err
    return err


def test_killed_parties_are_restarted_and_the_run_completes_with_a_clean_audit(tmp_path):
    launch = Launch(tmp_path, RUN)
    launch.wait_for(1)
    launch.kill("device.d0")
    launch.wait_for(2)
    launch.kill("boundary.b1")  # it resumes from its checkpoint
    err = _done(launch)
    assert "device.d0 exited with code -9; restarted (1 of 3)" in err
    assert "boundary.b1 exited with code -9; restarted (1 of 3)" in err
    assert sorted(set(launch.steps())) == [0, 1, 2, 3, 4]
    assert json.loads((launch.out / "summary.json").read_text())["outer_steps"] == 4
    assert "resuming at middle step" in (launch.out / "logs" / "boundary.b1.log").read_text()
    report = launch.report(CRASHED)
    assert report.ok, [v.reason for v in report.violations][:3]
    assert report.logs["boundary.b1"].crashes == 1
    assert not launch.report().ok  # the crash is a finding until the operator accepts it


def test_kill_9_of_launch_leaves_no_keys_in_tmp_and_resume_completes_the_run(tmp_path):
    before = {p.name for p in Path("/tmp").iterdir() if "cert" in p.name}
    launch = Launch(tmp_path, RUN)
    launch.wait_for(1)
    launch.proc.kill()
    launch.proc.wait()
    assert launch.leftovers() == []  # the parties saw their parent go and stopped
    assert {p.name for p in Path("/tmp").iterdir() if "cert" in p.name} == before
    keys = tmp_path / "out.keys"
    assert keys.stat().st_mode & 0o777 == 0o700
    resumed = Launch(tmp_path, RUN, "--resume")
    _done(resumed)
    assert sorted(set(resumed.steps())) == [0, 1, 2, 3, 4]
    assert not keys.exists()  # a completed run's keys are deleted
    report = resumed.report(CRASHED)
    assert report.ok, [v.reason for v in report.violations][:3]


def test_an_interrupted_run_audits_without_violations(tmp_path):
    """Ctrl-C stops every party; what was in flight is reported as such, not as a violation."""
    launch = Launch(tmp_path, {**RUN, "budget": {"outer_steps": 1000}})
    launch.wait_for(2)
    launch.proc.send_signal(signal.SIGINT)
    code, err = launch.finish(timeout=60)
    assert launch.leftovers() == []
    assert code == 130
    assert "--resume` continues it" in err
    report = launch.report()
    assert not report.violations, [v.reason for v in report.violations][:3]
    assert all(log.closed for log in report.logs.values())


def test_a_deployment_honours_churn(tmp_path):
    spec = {**RUN, "churn": {"mean_uptime_s": 3, "mean_downtime_s": 1}, "budget": {"outer_steps": 3}}
    launch = Launch(tmp_path, spec)
    _done(launch)
    logs = [p.read_text() for p in (launch.out / "logs").glob("device.*.log")]
    assert sum(text.count("churn: offline for") for text in logs) >= 2
    assert launch.report().ok


def test_secure_outer_aggregation_of_a_large_delta_crosses_in_slices(tmp_path):
    """+SA: the masked Delta_b (8 bytes per parameter) is over gRPC's 4 MiB message limit here."""
    model = {"preset": "tiny", "trainable": "lora", "lora": {"r": 160, "alpha": 8, "dropout": 0.0}}
    launch = Launch(tmp_path, {**RUN, "strategy": "echelon+sa", "model": model, "budget": {"outer_steps": 2}})
    _done(launch)
    assert json.loads((launch.out / "summary.json").read_text())["outer_steps"] == 2
    assert launch.report().ok


def test_a_global_plane_whose_boundaries_never_come_ends_on_its_patience(tmp_path):
    from echelon.runtime.grpc.global_role import run_global

    cfg = RunConfig.model_validate({**RUN, "deployment": {"patience_s": 2}})
    init_certs(tmp_path / "certs", {b.id: [d.id for d in b.devices] for b in cfg.boundaries})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    creds = load_credentials(tmp_path / "certs", "global")
    summary = asyncio.run(asyncio.wait_for(run_global(cfg, creds, "127.0.0.1:0", run_dir), 120))
    assert summary["stop_reason"] == "patience" and summary["outer_steps"] == 0
    assert (run_dir / summary["artefact"]).is_dir()  # the last synchronised model: the initial one
