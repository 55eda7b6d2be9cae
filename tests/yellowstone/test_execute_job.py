"""Plans executed on torch.distributed (gloo, CPU processes): equivalence, where raw data goes,
failures and bad input. Each job starts several Python processes, so most are marked slow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from echelon.yellowstone.execute.handmade import HandLayout
from echelon.yellowstone.execute.job import JobOptions, main, model_config
from echelon.yellowstone.execute.reference import reference_losses
from echelon.yellowstone.plan import read_plan
from tests.yellowstone.execution import (
    MICRO_BATCH,
    SEQ_LEN,
    execute,
    finish,
    kill_after,
    records,
    write_hand_plan,
)

HIDDEN = 256  # the tiny preset's hidden size


def reference(plan_path, steps: int) -> list[float]:
    """The same batches trained in one process (the executor's defaults: seed 0, lr 1e-3)."""
    options = JobOptions(plan_path, plan_path.parent, steps=steps, documents=40)
    return reference_losses(read_plan(plan_path), options)


def assert_same_trajectory(got: list[float], want: list[float], rtol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True), 1):
        assert abs(a - b) <= rtol * abs(b), f"step {step}: executed {a} vs single process {b}"


@pytest.mark.slow  # spawns a torch.distributed job
def test_u_shaped_ddp_and_fsdp_clusters_match_one_process_and_keep_raw_data_in_the_cleared_cluster(tmp_path):
    """Cluster 0 (cleared: embedding and loss head) runs DDP over shares 3 + 1; cluster 1 (not
    cleared: the middle layers) runs FSDP over 2 + 2. Every transfer is traced."""
    layout = HandLayout((("cpu0", "cpu1"), ("cpu2", "cpu3")), "U", ((0, 3), (3, 5)), modes=("DDP", "FSDP"))
    write_hand_plan(tmp_path / "plan.json", [layout])
    traces = tmp_path / "traces"
    run = tmp_path / "run"
    out = finish(execute(tmp_path / "plan.json", run, 3, env={"ECHELON_TRACE_DIR": str(traces)}))
    assert "execution vs plan" in out
    got = [r["loss"] for r in records(run)]
    assert [r["step"] for r in records(run)] == [1, 2, 3]
    assert_same_trajectory(got, reference(tmp_path / "plan.json", 3))

    trace = {
        d: [json.loads(x) for x in (traces / f"{d}.jsonl").read_text().splitlines()]
        for d in ("cpu0", "cpu1", "cpu2", "cpu3")
    }
    # Raw data is read only by the leader of the cleared cluster.
    assert [e for e in trace["cpu0"] if e["kind"] == "data"]
    for device in ("cpu1", "cpu2", "cpu3"):
        assert not [e for e in trace[device] if e["kind"] == "data"]
    # Outside the cleared cluster, every tensor received is a hidden state or its gradient (float32,
    # [rows, seq_len, hidden]) or a control header (int32, 4 values); never a token id (int64).
    for device in ("cpu2", "cpu3"):
        received = [e for e in trace[device] if e["kind"] == "recv" and "dtype" in e]
        assert received
        for e in received:
            hidden = (
                e["dtype"] == "float32"
                and e["shape"][1:] == [SEQ_LEN, HIDDEN]
                and e["shape"][0] <= MICRO_BATCH
            )
            header = e["dtype"] == "int32" and e["shape"] == [4]
            vote = e["dtype"] == "int32" and e["shape"] == [1]  # pipelining's warm-up vote
            assert hidden or header or vote, (device, e)
    # The members of the cleared cluster do get their rows of token ids and labels.
    assert any(e["kind"] == "recv" and e.get("dtype") == "int64" for e in trace["cpu1"])
    summary = json.loads((run / "summary.json").read_text())
    (replica,) = summary["replicas"]
    assert replica["step_s_measured"] > 0 and set(replica["peak_memory_bytes"]) == {
        "cpu0",
        "cpu1",
        "cpu2",
        "cpu3",
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "trainable"),
    [
        (
            HandLayout((("cpu0", "cpu1"), ("cpu2",)), "U", ((0, 2), (2, 5)), modes=("FSDP+ckpt", "DDP+ckpt")),
            "full",
        ),
        (HandLayout((("cpu0", "cpu2"), ("cpu1",)), "linear", ((0, 3), (3, 6)), modes=("DDP", "DDP")), "full"),
        (HandLayout((("cpu0", "cpu1"),), "single", ((0, 6),), modes=("FSDP",)), "lora"),
    ],
    ids=["U-fsdp-ckpt-full", "linear-ddp-full", "single-fsdp-lora"],
)
def test_every_structure_and_parallelism_matches_one_process(tmp_path, layout, trainable):
    cleared = 3 if layout.structure == "linear" else 2
    write_hand_plan(tmp_path / "plan.json", [layout], trainable=trainable, devices=3, cleared=cleared)
    finish(execute(tmp_path / "plan.json", tmp_path / "run", 4))
    got = [r["loss"] for r in records(tmp_path / "run")]
    assert_same_trajectory(got, reference(tmp_path / "plan.json", 4))


@pytest.mark.slow
@pytest.mark.parametrize("backup", ["fallback", "standby"])
def test_kill_9_of_a_rank_applies_its_backup_and_loses_or_repeats_no_step(tmp_path, backup):
    from echelon.yellowstone.plan import Backup, write_plan

    plan = write_hand_plan(
        tmp_path / "plan.json", [HandLayout((("cpu0", "cpu1"), ("cpu2",)), "U", ((0, 3), (3, 5)))], devices=4
    )
    victim = "cpu1" if backup == "fallback" else "cpu2"
    if backup == "standby":
        plan.boundaries[0].backups = [
            Backup(device="cpu2", kind="standby", replica="lab/r0", standby="cpu3", tokens_per_s_after=1.0)
        ]
        write_plan(plan, tmp_path / "plan.json")
    steps, run = 8, tmp_path / "run"
    proc = execute(tmp_path / "plan.json", run, steps)
    kill_after(tmp_path / "run.partial", victim, 3, proc)
    out = finish(proc)
    assert "backup applied" in out and "recovery of lab/r0" in out
    got = records(run)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # each step exactly once
    assert got[-1]["attempt"] >= 1 and victim not in got[-1]["devices"]
    if backup == "standby":
        assert "cpu3" in got[-1]["devices"]
    failures = [json.loads(x) for x in (run / "failures.jsonl").read_text().splitlines()]
    assert [(f["device"], f["signal"]) for f in failures] == [(victim, "SIGKILL")]
    # The survivors carry on exactly where the checkpoint left them: same trajectory as one process.
    assert_same_trajectory([r["loss"] for r in got], reference(tmp_path / "plan.json", steps))


def test_bad_input_is_refused_with_the_file_and_field(tmp_path):
    plan = write_hand_plan(tmp_path / "plan.json", [HandLayout((("cpu0",),), "single", ((0, 6),))], devices=2)
    plan.boundaries[0].replicas[0].clusters[0].shares = [5]
    (tmp_path / "bad.json").write_text(plan.model_dump_json())
    cli = [sys.executable, "-m", "echelon.cli", "execute"]
    done = subprocess.run([*cli, str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad.json" in done.stderr and "clusters[0].shares" in done.stderr
    assert not (tmp_path / "runs").exists()
    # A worker told a device the plan does not have refuses before joining any group.
    code = main(["--plan", str(tmp_path / "plan.json"), "--device-id", "gpu7", "--out", str(tmp_path / "w")])
    assert code == 2
    # --resume onto checkpoints of another plan.
    staging = tmp_path / "old.partial" / "checkpoints" / "lab-r0"
    staging.mkdir(parents=True)
    (staging / "latest.json").write_text(
        json.dumps({"plan": "0123456789abcdef", "step": 3, "path": "step-000003"})
    )
    done = subprocess.run(
        [*cli, str(tmp_path / "plan.json"), "--resume", "--out", str(tmp_path / "old")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "another plan" in done.stderr and "latest.json" in done.stderr
    # Only the built-in tiny preset or a checkpoint directory can run; a shape preset cannot.
    plan.model.source = "llama-8b"
    with pytest.raises(Exception, match="only a real checkpoint or `tiny` executes"):
        model_config(plan, 0.0)
