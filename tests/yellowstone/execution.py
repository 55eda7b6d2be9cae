"""Helpers for the executor's tests: a fleet of CPU "devices", hand-written layouts, running a job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from echelon.yellowstone.cost import CostSettings
from echelon.yellowstone.execute.handmade import HandLayout, hand_plan
from echelon.yellowstone.fleet import Fleet
from echelon.yellowstone.model_profile import PRESETS, build_profile
from echelon.yellowstone.plan import Plan, write_plan

SEQ_LEN, MICRO_BATCH, MICRO_BATCHES = 32, 4, 4


def cpu_fleet(cleared: int = 2, devices: int = 4) -> Fleet:
    """`devices` CPU devices on one host; the first `cleared` may read the lab's raw data. Speeds
    differ (3:1 between the first two), so a two-device cluster splits a micro-batch 3 + 1."""
    speeds = [0.06, 0.02, 0.05, 0.05, 0.04, 0.04][:devices]
    return Fleet.model_validate(
        {
            "name": "cpu-test",
            "access_tiers": ["public", "lab"],
            "boundaries": [{"id": "lab", "data_tier": "lab"}],
            "sites": [{"id": "host", "bandwidth_gbps": 10, "latency_ms": 0.05}],
            "devices": [
                {
                    "id": f"cpu{i}",
                    "boundary": "lab",
                    "site": "host",
                    "memory_gib": 4,
                    "tflops": s,
                    "access_tier": "lab" if i < cleared else "public",
                }
                for i, s in enumerate(speeds)
            ],
        }
    )


def write_hand_plan(path: Path, layouts: list[HandLayout], trainable: str = "lora", **fleet) -> Plan:
    profile = build_profile(
        "tiny", PRESETS["tiny"], trainable=trainable, dtype="fp32", seq_len=SEQ_LEN,
        micro_batch=MICRO_BATCH, lora_rank=4,
    )  # fmt: skip
    plan = hand_plan(cpu_fleet(**fleet), profile, layouts, CostSettings(micro_batches=MICRO_BATCHES))
    write_plan(plan, path)
    return plan


def execute(
    plan: Path, out: Path, steps: int, *extra: str, env: dict | None = None, **popen
) -> subprocess.Popen:
    """Start `echelon execute` in its own process (the elastic agent wants a main thread of its own)."""
    cmd = [
        sys.executable,
        "-m",
        "echelon.cli",
        "execute",
        str(plan),
        "--out",
        str(out),
        "--steps",
        str(steps),
    ]
    cmd += ["--documents", "40", "--threads", "1", "--timeout", "60", *extra]
    return subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"echelon execute did not finish in {timeout} s:\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-4000:]
    return out


def records(run: Path, replica: str = "lab-r0") -> list[dict]:
    path = run / "replicas" / replica / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def kill_after(staging: Path, device: str, steps: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """kill -9 `device`'s worker once its replica has committed `steps` steps."""
    deadline = time.monotonic() + timeout
    metrics = staging / "replicas" / "lab-r0" / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            os.kill(int((staging / "pids" / f"{device}.pid").read_text()), signal.SIGKILL)
            return
        time.sleep(0.05)
    raise AssertionError(f"{device} never reached step {steps}")
