"""Chaos on a deployment: the faults of `benchmarks/chaos.py` (which prints them as a table),
each with the outcome it must have. Slow: each runs a deployment, most of them `echelon launch`
with nine processes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path

import pytest
import yaml

from benchmarks.chaos import CRASHED, RUN, Launch, global_faults
from echelon.audit.report import IN_FLIGHT
from echelon.config import RunConfig
from echelon.parties import device_address
from echelon.runtime.churn import cycling_devices
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
    assert r.replay  # the same message again, byte for byte: refused as a replay, on record
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
    # Each party closed its log as interrupted when launch went: what was in flight then is
    # reported as such, and there is no crash to accept.
    report = resumed.report(frozenset({IN_FLIGHT}))
    assert report.ok, [(f.party, f.category, f.reason) for f in report.failures][:3]
    assert not report.crashes and not any(log.crashes for log in report.logs.values())


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


def test_a_deployment_cycles_the_devices_the_simulator_picks(tmp_path):
    # Short uptimes (the picked devices' first ones are 0.08 s and 3 s from their seeds), so
    # each picked device goes offline within the run whatever the machine's speed.
    churn = {"mean_uptime_s": 1, "mean_downtime_s": 1, "cycling_fraction": 0.5}
    launch = Launch(tmp_path, {**RUN, "churn": churn, "budget": {"outer_steps": 6}})
    _done(launch)
    cfg = RunConfig.model_validate(yaml.safe_load(launch.run_file.read_text()))
    picked = cycling_devices(cfg.churn, [device_address(d.id) for _, d in cfg.devices], cfg.seed)
    assert len(picked) == 2
    offline = {
        device_address(p.name.removeprefix("device.").removesuffix(".log"))
        for p in (launch.out / "logs").glob("device.*.log")
        if "churn: offline for" in p.read_text()
    }
    assert offline == picked  # the same seeded half as `echelon train`; the other half never left
    assert launch.report().ok


AGGREGATED = re.compile(r"middle step (\d+) aggregated (.*) \(round opened at ([0-9.]+) s\)")


def _aggregations(log: str) -> list[tuple[int, set[str], float]]:
    """(middle step, device ids, when its round opened) of every middle step in a boundary's log."""
    return [
        (int(m[1]), {d.removeprefix("device/") for d in m[2].split(", ")}, float(m[3]))
        for m in AGGREGATED.finditer(log)
    ]


def test_a_deployment_carries_out_a_join_a_departure_and_an_outage(tmp_path):
    """d4 joins b0 (admitted by its certificate), d1 leaves b0 for good, b1 and its devices go
    offline for 4 s; the schedule counts from the run's start. The run completes its budget."""
    churn = {
        "joins": [{"at_s": 0, "boundary": "b0", "device": {"id": "d4", "tokens_per_s": 1500}}],
        "departures": [{"at_s": 3, "device": "d1"}],
        "outages": [{"boundary": "b1", "at_s": 5, "duration_s": 4}],
    }
    launch = Launch(tmp_path, {**RUN, "churn": churn, "budget": {"outer_steps": 14}})
    err = _done(launch)
    assert "device.d4 joins (churn.joins, at 0 s)" in err
    assert "device.d1 leaves for good" in err
    assert "boundary.b1 and its devices back online" in err
    assert json.loads((launch.out / "summary.json").read_text())["outer_steps"] == 14
    logs = launch.out / "logs"
    b0, b1 = (logs / "boundary.b0.log").read_text(), (logs / "boundary.b1.log").read_text()
    # The joiner is admitted, then aggregated; the departed device never in a round opened after it left.
    admitted = b0.index("admitted device.d4")
    assert any("d4" in m for _, m, _ in _aggregations(b0[admitted:]))
    left = float(re.search(r"device.d1 left the run for good at ([0-9.]+) s", b0)[1])
    before = [opened for _, m, opened in _aggregations(b0) if "d1" in m]
    assert before and max(before) < left
    # The outage: the global plane went on without b1; b1 resumed from its checkpoint and was
    # given the final model (even when the run ended while it was restarting).
    assert "boundary.b1 disconnected: absent from the outer steps" in (logs / "global.log").read_text()
    resumed = re.search(r"resuming at middle step (\d+)", b1)
    assert int(resumed[1]) > 0
    assert "final reference received" in b1[resumed.end() :]  # back in the run, to its end
    # The audit passes (messages in flight when b1 went offline were lost with it), and b0's log
    # holds the admission and the departure.
    report = launch.report(frozenset({IN_FLIGHT}))
    assert report.ok, [v.reason for v in report.failures][:3]
    events = [(f.category, f.record["device"]) for f in report.logs["boundary.b0"].membership]
    assert sorted(events) == [("admitted", "device.d4"), ("departed", "device.d1")]


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
