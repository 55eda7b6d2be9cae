"""The planes deployed over gRPC with mutual TLS: same results as the simulator, peers refused."""

from __future__ import annotations

import asyncio
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

from echelon.config import RunConfig
from echelon.errors import UserError
from echelon.runner import train
from echelon.runtime.grpc import roles
from echelon.runtime.grpc.tls import init_certs, load_credentials
from tests.conftest import small_run


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
    tasks = [asyncio.create_task(roles.run_global(cfg, load_credentials(certs, "global"), at, run_dir))]
    for b in cfg.boundaries:
        b_at = _port()
        creds = load_credentials(certs, f"boundary.{b.id}")
        tasks.append(asyncio.create_task(roles.run_boundary(cfg, creds, b.id, b_at, at, run_dir)))
        for d in b.devices:
            creds = load_credentials(certs, f"device.{d.id}")
            tasks.append(asyncio.create_task(roles.run_device(cfg, creds, d.id, b_at)))
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
    cfg = _lockstep_config(strategy)
    summary = asyncio.run(_deploy(cfg, _certs(tmp_path / "certs", cfg), tmp_path / "deployed"))
    simulated = train(cfg, tmp_path / "simulated", progress=False)
    assert summary["outer_steps"] == simulated["outer_steps"] == 2
    deployed = load_file(tmp_path / "deployed" / "adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "simulated" / "adapter" / "adapter_model.safetensors")
    assert deployed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(deployed[name], reference[name], rtol=1e-5, atol=1e-6)
    # The deployed run leaves the same evidence: `echelon audit` passes on it.
    from echelon.audit.verify import verify_run

    report = verify_run(tmp_path / "deployed")
    assert report.ok, [v.reason for v in report.violations][:3]
    assert report.per_device_bytes == 0


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
    task = asyncio.create_task(roles.run_boundary(cfg, creds, boundary_id, at, _port(), run_dir))
    await asyncio.sleep(1.5)
    try:
        return await asyncio.wait_for(probe(at), 20)
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
            lambda at: _call(_tls(certs, "device.d0"), at, "boundary.b1", roles.LOCAL_METHOD),
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
            await _call(_tls(foreign, "device.d2"), at, "boundary.b1", roles.LOCAL_METHOD),
            await _call(None, at, "boundary.b1", roles.LOCAL_METHOD),
        )

    foreign_code, plaintext_code = asyncio.run(_with_boundary(cfg, certs, "b1", probe, tmp_path))
    assert foreign_code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: nothing is served
    assert plaintext_code == grpc.StatusCode.UNAVAILABLE


def test_a_party_with_a_foreign_certificate_stops_with_a_clear_error(deployment, tmp_path):
    cfg, certs = deployment
    foreign = load_credentials(_certs(tmp_path / "other", cfg), "device.d2")

    async def probe(at):
        return await roles.run_device(cfg, foreign, "d2", at)

    with pytest.raises(UserError, match="TLS handshake"):
        asyncio.run(_with_boundary(cfg, certs, "b1", probe, tmp_path))


def test_a_non_admissible_strategy_is_refused_by_the_deployment(tmp_path, capsys):
    from echelon.cli import main

    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run(strategy="fedavg")))
    assert main(["launch", str(run_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "not admissible" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_stops_every_process_and_leaves_no_run_directory(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run(budget={"outer_steps": 10_000})))
    out = tmp_path / "interrupted"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "echelon", "launch", str(run_file), "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = out.with_name(out.name + ".partial") / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and "outer_step" in metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metrics.exists(), "the deployment never started training"
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=60) == 130
    left = subprocess.run(["pgrep", "-f", str(run_file)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes left behind: {left}"
    assert not out.exists() and out.with_name(out.name + ".partial").exists()


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
