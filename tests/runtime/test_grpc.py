"""The planes deployed over gRPC with mutual TLS: same results as the simulator, peers refused."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from safetensors.torch import load_file

from benchmarks.chaos import interruptible, kill_run, processes_of
from echelon.audit.layout import log_path
from echelon.audit.verify import verify_log
from echelon.config import MetricsConfig, RunConfig
from echelon.errors import UserError
from echelon.record import RunSummary, read_metrics
from echelon.runner import train
from echelon.runtime.grpc.boundary_role import run_boundary
from echelon.runtime.grpc.device_role import run_device
from echelon.runtime.grpc.framing import device_frames
from echelon.runtime.grpc.global_role import run_global
from echelon.runtime.grpc.tls import init_certs, load_credentials
from echelon.runtime.grpc.transport import LOCAL_METHOD
from echelon.v1 import device_pb2
from tests.helpers import small_run


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _certs(directory: Path, cfg: RunConfig) -> Path:
    init_certs(directory, {b.id: [d.id for d in b.devices] for b in cfg.boundaries})
    return directory


async def _deploy(cfg: RunConfig, certs: Path, run_dir: Path) -> dict:
    """Every party of `cfg` as a task of this event loop, over loopback gRPC with mTLS."""
    run_dir.mkdir()
    at = _port()
    tasks = [asyncio.create_task(run_global(cfg, load_credentials(certs, "global"), at, run_dir))]
    for b in cfg.boundaries:
        b_at = _port()
        creds = load_credentials(certs, f"boundary.{b.id}")
        tasks.append(asyncio.create_task(run_boundary(cfg, creds, b.id, b_at, at, run_dir)))
        for d in b.devices:
            creds = load_credentials(certs, f"device.{d.id}")
            tasks.append(asyncio.create_task(run_device(cfg, creds, d.id, b_at)))
    results = await asyncio.wait_for(asyncio.gather(*tasks), 240)
    return results[0]


def _lockstep_config(strategy: str = "echelon-sync") -> RunConfig:
    # In lockstep with full buffers: every middle step aggregates every device of its boundary,
    # so the schedule is the same whatever the timing.
    return RunConfig.model_validate(
        small_run(
            strategy=strategy,
            echelon={"buffer_size": 2, "buffer_timeout_s": 600, "sync": {"interval": 1}},
            network={"wan": {"latency_ms": 0}, "lan": {"latency_ms": 0}},
            budget={"outer_steps": 2},
        )
    )


@pytest.mark.parametrize(
    "strategy",
    # diloco+sa-boundary: DiLoCo+SA's admissible form (each boundary one DiLoCo worker, the outer
    # round SecAgg+), the privacy-parity baseline of Table 9, runs deployed as it is simulated.
    ["echelon-sync", pytest.param("diloco+sa-boundary", marks=pytest.mark.slow)],
)
def test_deployment_and_simulation_reach_the_same_parameters(tmp_path, strategy):
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # an optional extra
    cfg = _lockstep_config(strategy).model_copy(update={"metrics": MetricsConfig(tensorboard=tensorboard)})
    summary = asyncio.run(_deploy(cfg, _certs(tmp_path / "certs", cfg), tmp_path / "deployed"))
    simulated = train(cfg, tmp_path / "simulated", progress=False)
    assert summary["outer_steps"] == simulated["outer_steps"] == 2
    # Both runtimes record a run the same way: the same summary keys and types, the same records.
    assert {k: type(v) for k, v in summary.items()} == {k: type(v) for k, v in simulated.items()}
    assert (summary["runtime"], simulated["runtime"]) == ("grpc", "simulation")
    for run, returned in (("deployed", summary), ("simulated", simulated)):
        assert RunSummary.read(tmp_path / run).to_dict() == returned
        outer = read_metrics(tmp_path / run, "outer_step")
        assert [r["outer_step"] for r in outer] == [0, 1, 2]
        assert set(outer[-1]["cross_boundary_bytes_by_boundary"]) == {"b0", "b1"}
        assert (
            sum(outer[-1]["cross_boundary_bytes_by_boundary"].values()) == outer[-1]["cross_boundary_bytes"]
        )
        if tensorboard:
            assert _tensorboard_tags(tmp_path / run / "tb") >= {"loss/val", "cadence/H", "bytes/boundary/b0"}
    if tensorboard:
        assert {"drift/D_b/boundary/b0", "loss/train/b0"} <= _tensorboard_tags(tmp_path / "simulated" / "tb")
    assert read_metrics(tmp_path / "deployed", "outer_step")[-1].keys() == outer[-1].keys()
    deployed = load_file(tmp_path / "deployed" / "adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "simulated" / "adapter" / "adapter_model.safetensors")
    assert deployed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(deployed[name], reference[name], rtol=1e-5, atol=1e-6)
    # The deployed run leaves the same evidence: `echelon audit` passes on it, against the keys
    # `certs init` pinned, for the configuration (config.yaml, as `echelon launch` writes it).
    from echelon.audit.verify import verify_run

    (tmp_path / "deployed" / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    report = verify_run(tmp_path / "deployed", tmp_path / "certs")
    assert report.ok, [v.reason for v in report.failures][:3]
    assert report.per_device_bytes == 0


def _tensorboard_tags(directory: Path) -> set[str]:
    """The scalar tags of the TensorBoard event files in `directory`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    cfg = RunConfig.model_validate(small_run())
    return cfg, _certs(tmp_path_factory.mktemp("certs") / "certs", cfg)


async def _call(
    creds: grpc.ChannelCredentials | None, target: str, server_party: str, method: str
) -> grpc.StatusCode:
    options = [("grpc.ssl_target_name_override", server_party)]
    channel = grpc.aio.secure_channel(target, creds, options) if creds else grpc.aio.insecure_channel(target)
    try:
        call = channel.stream_stream(method)(iter([]))
        async for _ in call:
            pass
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()
    finally:
        await channel.close()


async def _with_boundary(cfg, certs, boundary_id, probe, run_dir: Path):
    at = _port()
    creds = load_credentials(certs, f"boundary.{boundary_id}")
    # The global plane is unreachable: the boundary serves its devices while it keeps dialling.
    task = asyncio.create_task(run_boundary(cfg, creds, boundary_id, at, _port(), run_dir))
    await asyncio.sleep(1.5)
    try:
        return await asyncio.wait_for(probe(at), 90)  # generous: these machines are loaded
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _tls(certs: Path, party: str) -> grpc.ChannelCredentials:
    c = load_credentials(certs, party)
    return grpc.ssl_channel_credentials(root_certificates=c.ca, private_key=c.key, certificate_chain=c.cert)


def test_a_device_of_another_boundary_is_refused_with_a_log_line(deployment, caplog, tmp_path):
    cfg, certs = deployment
    caplog.set_level(logging.WARNING, logger="echelon.serve")
    code = asyncio.run(
        _with_boundary(
            cfg,
            certs,
            "b1",
            lambda at: _call(_tls(certs, "device.d0"), at, "boundary.b1", LOCAL_METHOD),
            tmp_path,
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "device.d0" in caplog.text and "names boundary.b0, not boundary.b1" in caplog.text


def test_an_unknown_certificate_and_plaintext_are_refused(deployment, tmp_path):
    cfg, certs = deployment
    foreign = _certs(tmp_path / "other", cfg)  # a valid-looking device certificate from another CA

    async def probe(at):
        return (
            await _call(_tls(foreign, "device.d2"), at, "boundary.b1", LOCAL_METHOD),
            await _call(None, at, "boundary.b1", LOCAL_METHOD),
        )

    foreign_code, plaintext_code = asyncio.run(_with_boundary(cfg, certs, "b1", probe, tmp_path))
    assert foreign_code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: nothing is served
    assert plaintext_code == grpc.StatusCode.UNAVAILABLE


def test_a_party_with_a_foreign_certificate_stops_with_a_clear_error(deployment, tmp_path):
    cfg, certs = deployment
    foreign = load_credentials(_certs(tmp_path / "other", cfg), "device.d2")

    async def probe(at):
        return await run_device(cfg, foreign, "d2", at)

    with pytest.raises(UserError, match="TLS handshake"):
        asyncio.run(_with_boundary(cfg, certs, "b1", probe, tmp_path))


def test_a_non_admissible_strategy_is_refused_by_the_deployment(tmp_path, capsys):
    from echelon.cli import main

    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run(strategy="fedavg")))
    assert main(["launch", str(run_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "not admissible" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_leaves_no_run_directory(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run(budget={"outer_steps": 10_000})))
    out = tmp_path / "interrupted"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "echelon", "launch", str(run_file), "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=interruptible,
    )
    metrics = out.with_name(out.name + ".partial") / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and "outer_step" in metrics.read_text()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert metrics.exists(), "the deployment never started training"
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 130
        left = processes_of(run_file)
        assert left == [], f"processes left behind: {left}"
        assert not out.exists() and out.with_name(out.name + ".partial").exists()
    finally:  # a failed check leaves no deployment running into the next test
        launcher.kill()
        kill_run(run_file)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["global", "boundary.b0"])
def test_kill_9_and_a_restart_lose_no_outer_step(tmp_path, victim):
    from echelon.audit.report import INTEGRITY, SIGNATURE
    from echelon.audit.verify import verify_run

    steps = 4
    cfg = RunConfig.model_validate(small_run(budget={"outer_steps": steps}))
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run(budget={"outer_steps": steps})))
    certs = _certs(tmp_path / "certs", cfg)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base = [sys.executable, "-m", "echelon", "serve"]
    common = ["--config", str(run_file), "--certs", str(certs)]
    global_at = _port()
    argvs = {"global": [*base, "global", *common, "--listen", global_at, "--run-dir", str(run_dir)]}
    for b in cfg.boundaries:
        at = _port()
        argvs[f"boundary.{b.id}"] = [
            *[*base, "boundary", *common, "--id", b.id, "--listen", at, "--global", global_at],
            *["--run-dir", str(run_dir)],
        ]
        for d in b.devices:
            argvs[f"device.{d.id}"] = [
                *base,
                "device",
                *common,
                "--id",
                d.id,
                "--boundary",
                at,
                "--threads",
                "1",
            ]
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = {
        party: subprocess.Popen(argv, stderr=(logs / f"{party}.log").open("wb"))
        for party, argv in argvs.items()
    }
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if metrics.exists() and '"outer_step": 1,' in metrics.read_text():
                break
            time.sleep(0.2)
        assert procs[victim].poll() is None, f"{victim} finished before it could be killed"
        procs[victim].kill()  # kill -9: no cleanup, no close checkpoint in its audit log
        procs[victim].wait()
        procs[victim] = subprocess.Popen(
            [*argvs[victim], *(["--resume"] if victim == "global" else [])],
            stderr=(logs / f"{victim}.restarted.log").open("wb"),
        )
        # The run is over when the global plane and the boundaries are; a device still
        # reconnecting to a boundary that already finished is a worker to stop, as launch does.
        codes = {party: p.wait(timeout=300) for party, p in procs.items() if not party.startswith("device.")}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    failed = {party: (logs / f"{party}.log").read_text()[-800:] for party, code in codes.items() if code}
    assert not failed, failed
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    done = [r["outer_step"] for r in records if r["kind"] == "outer_step"]
    assert sorted(set(done)) == list(range(steps + 1))  # none lost (a step may be recorded twice)
    assert json.loads((run_dir / "summary.json").read_text())["outer_steps"] == steps
    report = verify_run(run_dir)
    assert report.per_device_bytes == 0
    assert not [v for v in report.violations if v.category in (INTEGRITY, SIGNATURE)]
    assert report.logs[victim].restarts == 1 and report.logs[victim].closed


def test_a_cloned_device_stream_is_refused_and_the_real_one_is_not_retired(deployment, caplog, tmp_path):
    """The issue's impostor: a second stream with a device's own certificate used to retire the
    real stream, whose device then exited 0 with nothing logged."""
    cfg, certs = deployment
    caplog.set_level(logging.WARNING, logger="echelon.serve")

    async def probe(at):
        hello = device_frames("d2", device_pb2.Hello(device_id="d2"))
        real = grpc.aio.secure_channel(
            at, _tls(certs, "device.d2"), [("grpc.ssl_target_name_override", "boundary.b1")]
        )
        clone = grpc.aio.secure_channel(
            at, _tls(certs, "device.d2"), [("grpc.ssl_target_name_override", "boundary.b1")]
        )
        try:
            first = real.stream_stream(LOCAL_METHOD)()
            await first.write(hello[0])
            await asyncio.sleep(0.5)  # admitted: the boundary holds its stream
            second = clone.stream_stream(LOCAL_METHOD)()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await second.write(hello[0])
                await second.read()
            assert first.done() is False  # the real stream goes on
            return refused.value.code()
        finally:
            await real.close()
            await clone.close()

    assert asyncio.run(_with_boundary(cfg, certs, "b1", probe, tmp_path)) == grpc.StatusCode.ALREADY_EXISTS
    assert "refused a stream from device.d2: it already holds a live stream" in caplog.text
    refused = verify_log(log_path(tmp_path, "boundary.b1"), None, "boundary.b1").refused
    assert [(f.record["device"], f.record["event"]) for f in refused] == [("device.d2", "refused")]
    assert "already holds a live stream" in refused[0].reason


@pytest.mark.slow
def test_a_served_party_logs_every_refused_tls_handshake(deployment, tmp_path):
    """Plaintext, another CA's certificate and no certificate are refused by gRPC core before our
    code runs; the party's log still says so, in its own words."""
    cfg, certs = deployment
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run()))
    at = _port()
    argv = [
        sys.executable,
        "-m",
        "echelon",
        "serve",
        "boundary",
        "--config",
        str(run_file),
        "--certs",
        str(certs),
    ]
    argv += ["--id", "b1", "--listen", at, "--global", _port(), "--run-dir", str(tmp_path / "run")]
    log = tmp_path / "boundary.log"
    with log.open("wb") as out:
        party = subprocess.Popen(argv, stderr=out)
    try:
        deadline = time.monotonic() + 120
        while "listening on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        ours, theirs = (
            load_credentials(certs, "device.d2"),
            load_credentials(_certs(tmp_path / "o", cfg), "device.d2"),
        )
        # Trusting our server, presenting a certificate of another CA (or none).
        foreign = grpc.ssl_channel_credentials(ours.ca, private_key=theirs.key, certificate_chain=theirs.cert)
        no_cert = grpc.ssl_channel_credentials(root_certificates=ours.ca)

        async def probe():
            for creds in (None, foreign, no_cert):
                assert await _call(creds, at, "boundary.b1", LOCAL_METHOD) == grpc.StatusCode.UNAVAILABLE

        asyncio.run(probe())
        time.sleep(1)
    finally:
        party.send_signal(signal.SIGTERM)
        party.wait(timeout=60)
    text = log.read_text()
    for why in (
        "not TLS",
        "a certificate this deployment's CA did not sign",
        "the client presented no certificate",
    ):
        assert f"boundary.b1 WARNING refused a TLS handshake: {why}" in text, text[-3000:]
    # ... and its audit log holds each refusal, chained and signed with the rest.
    report = verify_log(
        log_path(tmp_path / "run", "boundary.b1"),
        load_credentials(certs, "boundary.b1").audit_key().public_key(),
    )
    assert not report.violations, report.violations
    reasons = [r.reason for r in report.refused]
    assert len(reasons) == 3 and all(r.startswith("TLS handshake refused: ") for r in reasons), reasons


def test_a_party_whose_audit_log_cannot_be_written_stops_with_a_clear_error(tmp_path, monkeypatch):
    """A full disk under the global plane's audit log: it stops (for launch to restart it,
    resumed) naming the log and the fix, instead of staying up refusing every message."""
    import errno

    import echelon.audit.log as audit_log

    cfg = RunConfig.model_validate(small_run(budget={"outer_steps": 3}))
    write_all = audit_log._write_all

    def disk_fills_at_the_first_delta(fd: int, data: bytes) -> None:
        if b"BoundaryDelta" in data and b'"direction":"in"' in data:  # only the global receives one
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(audit_log, "_write_all", disk_fills_at_the_first_delta)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"global\.jsonl could not be written .*No space left.*--resume"):
        asyncio.run(_deploy(cfg, _certs(tmp_path / "certs", cfg), run_dir))
    report = verify_log(run_dir / "audit" / "global.jsonl", None, "global")
    # Its close could not be written either: `--resume` reopens the log, as after a crash.
    assert report.records > 0 and not report.closed and report.torn_bytes == 0
