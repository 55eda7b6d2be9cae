"""A plan's replicas as Echelon devices: the same run with the replicas listed as ordinary devices
reaches the same model, the plan's job serves the rounds, and nothing per-device crosses."""

from __future__ import annotations

import json

import pytest
import yaml

from echelon.audit.report import UNANCHORED
from echelon.audit.verify import verify_run
from echelon.config import load_run
from echelon.errors import ConfigError
from echelon.runner import train
from echelon.yellowstone.execute.handmade import HandLayout
from echelon.yellowstone.plan import read_plan
from tests.yellowstone.execution import write_hand_plan

LAYOUTS = [
    HandLayout((("cpu0",), ("cpu2",)), "U", ((0, 3), (3, 5))),
    HandLayout((("cpu1", "cpu4"), ("cpu3",)), "U", ((0, 2), (2, 5))),
]


def run_file(tmp_path, lab: dict) -> dict:
    return {
        "name": "planned",
        "model": {"preset": "tiny", "trainable": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"source": "stdlib", "seq_len": 32, "max_documents": 40, "partition": {"kind": "iid"}},
        "train": {"inner_steps": 2, "micro_batch": 16, "lr": 0.003},
        "echelon": {"buffer_size": 2, "buffer_timeout_s": 5, "sync": {"interval": 2}},
        "boundaries": [
            {"id": "lab", **lab},
            {"id": "b1", "devices": [{"id": "d2", "tokens_per_s": 1500}, {"id": "d3", "tokens_per_s": 800}]},
        ],
        "budget": {"outer_steps": 2},
        "eval": {"sequences": 8, "batch": 8},
    }


def write(tmp_path, name: str, cfg: dict):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return load_run(path)


def test_a_plan_gives_its_boundary_one_device_per_replica_and_must_match_the_run(tmp_path):
    plan = write_hand_plan(tmp_path / "plan.json", LAYOUTS, devices=5, cleared=2)
    cfg = write(tmp_path, "run.yaml", run_file(tmp_path, {"plan": "plan.json"}))
    devices = cfg.boundaries[0].devices
    assert [d.id for d in devices] == ["lab-r0", "lab-r1"] and [d.replica for d in devices] == [
        "lab/r0",
        "lab/r1",
    ]
    assert [d.tokens_per_s for d in devices] == [
        r.predicted.tokens_per_s for r in plan.boundaries[0].replicas
    ]
    for edit, problem in [
        ({"data": {"source": "stdlib", "seq_len": 64}}, "sequences of 32 tokens"),
        ({"train": {"micro_batch": 8}}, "4 x 4 sequences per step"),
        ({"model": {"preset": "tiny", "lora": {"r": 8}}}, "LoRA rank 4"),
        ({"boundaries": [{"id": "other", "plan": "plan.json"}]}, "not 'other'"),
    ]:
        with pytest.raises(ConfigError) as e:
            write(tmp_path, "bad.yaml", {**run_file(tmp_path, {"plan": "plan.json"}), **edit})
        assert problem in str(e.value) and "bad.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="not both"):
        write(
            tmp_path,
            "bad.yaml",
            run_file(tmp_path, {"plan": "plan.json", "devices": [{"id": "x", "tokens_per_s": 1}]}),
        )
    with pytest.raises(ConfigError, match=r"no such file|cannot read"):
        write(tmp_path, "bad.yaml", run_file(tmp_path, {"plan": "missing.json"}))


@pytest.mark.slow
def test_planned_replicas_train_like_single_process_devices_and_the_audit_passes(tmp_path):
    plan = write_hand_plan(tmp_path / "plan.json", LAYOUTS, devices=5, cleared=2)
    planned = write(tmp_path, "planned.yaml", run_file(tmp_path, {"plan": "plan.json"}))
    listed = [{"id": d.id, "tokens_per_s": d.tokens_per_s} for d in planned.boundaries[0].devices]
    plain = write(tmp_path, "plain.yaml", run_file(tmp_path, {"devices": listed}))
    a = train(planned, tmp_path / "planned", progress=False)
    b = train(plain, tmp_path / "plain", progress=False)
    assert a["outer_steps"] == b["outer_steps"] == 2 and a["middle_steps"] == b["middle_steps"]
    assert abs(a["end_val_loss"] - b["end_val_loss"]) <= 1e-4 * b["end_val_loss"]
    assert a["end_val_loss"] < a["start_val_loss"]
    # A simulated run's signing keys only ever lived in memory: its public keys are the run's own.
    report = verify_run(tmp_path / "planned", accept=frozenset({UNANCHORED}))
    assert report.ok and report.per_device_bytes == 0, [
        f.reason for f in report.violations + report.in_flight
    ][:5]
    job = tmp_path / "planned" / "plans" / "plan-0"
    assert {p.name for p in (job / "replicas").iterdir()} == {"lab-r0", "lab-r1"}
    assert json.loads((job / "topology.json").read_text())["applied"] == []
    assert read_plan(job / "plan.json").boundaries[0].replicas == plan.boundaries[0].replicas


@pytest.mark.slow
def test_a_deployment_runs_planned_devices_as_the_simulator_does(tmp_path):
    """Lockstep Echelon, so the schedule does not depend on timing: each deployed device process
    runs a job of its own replica, and the model equals the simulated run's."""
    import asyncio
    import socket

    import torch
    from safetensors.torch import load_file

    from echelon.runtime.grpc.boundary_role import run_boundary
    from echelon.runtime.grpc.device_role import run_device
    from echelon.runtime.grpc.global_role import run_global
    from echelon.runtime.grpc.tls import init_certs, load_credentials

    def port() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{s.getsockname()[1]}"

    write_hand_plan(tmp_path / "plan.json", LAYOUTS, devices=5, cleared=2)
    file = run_file(tmp_path, {"plan": "plan.json"})
    file |= {
        "strategy": "echelon-sync",
        "echelon": {"buffer_size": 2, "buffer_timeout_s": 600, "sync": {"interval": 1}},
        "network": {"wan": {"latency_ms": 0}, "lan": {"latency_ms": 0}},
    }
    cfg = write(tmp_path, "run.yaml", file)
    certs = tmp_path / "certs"
    init_certs(certs, {b.id: [d.id for d in b.devices] for b in cfg.boundaries})

    async def deploy(run_dir):
        run_dir.mkdir()
        at = port()
        tasks = [asyncio.create_task(run_global(cfg, load_credentials(certs, "global"), at, run_dir))]
        for b in cfg.boundaries:
            b_at = port()
            creds = load_credentials(certs, f"boundary.{b.id}")
            tasks.append(asyncio.create_task(run_boundary(cfg, creds, b.id, b_at, at, run_dir)))
            for d in b.devices:
                creds = load_credentials(certs, f"device.{d.id}")
                work = run_dir / "plans" / d.id
                tasks.append(asyncio.create_task(run_device(cfg, creds, d.id, b_at, work)))
        return (await asyncio.wait_for(asyncio.gather(*tasks), 900))[0]

    summary = asyncio.run(deploy(tmp_path / "deployed"))
    simulated = train(cfg, tmp_path / "simulated", progress=False)
    assert summary["outer_steps"] == simulated["outer_steps"] == 2
    deployed = load_file(tmp_path / "deployed" / "adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "simulated" / "adapter" / "adapter_model.safetensors")
    for name in reference:
        torch.testing.assert_close(deployed[name], reference[name], rtol=1e-5, atol=1e-6)
    # One job per deployed device, each serving only its own replica.
    for device, replica in (("lab-r0", "lab/r0"), ("lab-r1", "lab/r1")):
        job = read_plan(tmp_path / "deployed" / "plans" / device / "plan-0" / "plan.json")
        assert [r.id for r in job.boundaries[0].replicas] == [replica]
    # The keys `certs init` pinned, for the configuration (config.yaml, as `echelon launch` writes it).
    (tmp_path / "deployed" / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    report = verify_run(tmp_path / "deployed", certs)
    assert report.ok and report.per_device_bytes == 0, [
        f.reason for f in report.violations + report.in_flight
    ][:5]
