"""Yellowstone plans executed on torch.distributed: equivalence, prediction, throughput.

1. Equivalence: the loss trajectory of a pipelined, data-parallel execution of a plan against a
   single-process run on the same global batches (fp32, 20 steps): the largest relative
   difference over the steps, for DDP, FSDP and FSDP+ckpt clusters (uneven shares) and a U-shaped
   3-stage pipeline (target <= 1e-4).
2. Prediction: this machine is calibrated as `echelon profile --model tiny --ranks N --fleet`
   does (a training step timed on N processes running at once, what FSDP over them adds to a
   micro-batch of a decoder layer, and the link between two local processes over gloo), then
   three CPU plans (pure DDP, a 3-stage pipeline, pipeline + FSDP) are priced by the planner's
   cost model and executed: predicted / measured median step time (target [0.8, 1.25]) and each
   rank's peak memory beside the plan's figure (on CPU the measured peak is the process's resident
   set, torch included). A shared host's speed drifts by 10-25% within a minute, so calibration
   and execution are repeated `--reps` times, the plans interleaved (calibrate, run, next plan,
   ...): the ratio is the median prediction over the median measurement, with the single
   repetitions' range beside it.
   These runs checkpoint once, at the end: the cost model prices training steps, and a checkpoint
   after every step (`echelon execute`'s default) costs its own writes on top.
3. Throughput: tokens/s of each executed plan against the same ranks training the same model
   data-parallel only (one DDP cluster over the whole model), measured in the same invocation.

On CUDA the same runs use NCCL, one GPU per process. The last line is machine-readable JSON.

    .venv/bin/python benchmarks/yellowstone_exec.py [--quick] [--reps 3]

--quick checks equivalence on one layout (a U-shaped pipeline over a DDP and an FSDP cluster) and
prediction on one plan (the 3-stage pipeline), 4 steps, once, and prints the same tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from echelon.yellowstone.cli_profile import measured_fields
from echelon.yellowstone.cost import CostSettings
from echelon.yellowstone.execute.handmade import HandLayout, hand_plan
from echelon.yellowstone.execute.job import JobOptions
from echelon.yellowstone.execute.reference import reference_losses
from echelon.yellowstone.fleet import Fleet
from echelon.yellowstone.measure import StepProbe, Timed, measure_local_link, measure_model_steps
from echelon.yellowstone.model_profile import PRESETS, build_profile
from echelon.yellowstone.plan import Plan, write_plan

GIB = 1024**3
SEQ_LEN, MICRO_BATCH, MICRO_BATCHES = 64, 4, 4
UNITS = PRESETS["tiny"].layers + 2  # embedding, layers, head

EQUIVALENCE = {
    "DDP (shares 3 + 1)": HandLayout((("cpu0", "cpu1"),), "single", ((0, UNITS),), ("DDP",)),
    "FSDP": HandLayout((("cpu0", "cpu1"),), "single", ((0, UNITS),), ("FSDP",)),
    "FSDP+ckpt": HandLayout((("cpu0", "cpu1"),), "single", ((0, UNITS),), ("FSDP+ckpt",)),
    "U-shaped, 3 stages": HandLayout((("cpu0",), ("cpu1",)), "U", ((0, 3), (3, UNITS - 1)), ("DDP", "DDP")),
    "U-shaped, DDP + FSDP": HandLayout(
        (("cpu0", "cpu1"), ("cpu2", "cpu3")), "U", ((0, 3), (3, UNITS - 1)), ("DDP", "FSDP")
    ),
}
PREDICTION = {
    "pure DDP": HandLayout((("cpu0", "cpu1"),), "single", ((0, UNITS),), ("DDP",)),
    "3-stage pipeline": HandLayout((("cpu0",), ("cpu1",)), "U", ((0, 3), (3, UNITS - 1)), ("DDP", "DDP")),
    "pipeline + FSDP": HandLayout(
        (("cpu0",), ("cpu1", "cpu2")), "U", ((0, 2), (2, UNITS - 1)), ("DDP", "FSDP")
    ),
}


def fleet(
    speeds: list[float],
    steps: list[Timed] | None = None,
    memory_gib: float = 4.0,
    link: tuple[float, float] = (10.0, 0.05),
) -> Fleet:
    """CPU devices of this host, all cleared; `steps` are measured steps that calibrate them,
    `link` the host's (Gbit/s, ms) between processes."""
    devices = []
    for i, tflops in enumerate(speeds):
        d = {"id": f"cpu{i}", "boundary": "lab", "site": "host", "memory_gib": memory_gib, "tflops": tflops,
             "access_tier": "lab"}  # fmt: skip
        if steps is not None:
            d["measured_steps"] = [
                {
                    "model": "tiny",
                    "trainable": "full",
                    "seq_len": SEQ_LEN,
                    "micro_batch": MICRO_BATCH,
                    "micro_batches": MICRO_BATCHES,
                    **measured_fields(steps[i]),  # as `echelon profile` writes them
                }
            ]
        devices.append(d)
    return Fleet.model_validate(
        {
            "name": "bench",
            "access_tiers": ["public", "lab"],
            "boundaries": [{"id": "lab", "data_tier": "lab"}],
            "sites": [{"id": "host", "bandwidth_gbps": link[0], "latency_ms": link[1]}],
            "devices": devices,
        }
    )


def profile():
    return build_profile(
        "tiny", PRESETS["tiny"], trainable="full", dtype="fp32", seq_len=SEQ_LEN, micro_batch=MICRO_BATCH
    )


def execute(plan: Plan, work: Path, name: str, steps: int, threads: int, checkpoint_every: int = 1) -> dict:
    """Run `plan` with `echelon execute`; the replica's step records and summary."""
    path = work / f"{name}.json"
    write_plan(plan, path)
    out = work / name
    cmd = [
        sys.executable,
        "-m",
        "echelon.cli",
        "execute",
        str(path),
        "--out",
        str(out),
        "--steps",
        str(steps),
    ]
    cmd += ["--documents", "60", "--threads", str(threads), "--checkpoint-every", str(checkpoint_every)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"echelon execute {name} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [
        json.loads(x) for x in (out / "replicas" / "lab-r0" / "metrics.jsonl").read_text().splitlines()
    ]
    return {"summary": summary["replicas"][0], "records": records, "plan": path}


def equivalence(layouts: dict[str, HandLayout], work: Path, steps: int, threads: int) -> list[dict]:
    rows = []
    for name, layout in layouts.items():
        plan = hand_plan(
            fleet([0.06, 0.02, 0.05, 0.05]), profile(), [layout], CostSettings(micro_batches=MICRO_BATCHES)
        )
        run = execute(plan, work, f"eq-{len(rows)}", steps, threads)
        want = reference_losses(plan, JobOptions(run["plan"], work, steps=steps, documents=60))
        got = [r["loss"] for r in run["records"]]
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
        rows.append({"layout": name, "steps": steps, "max_rel_diff": worst, "first": got[0], "last": got[-1]})
    return rows


def prediction(layouts: dict[str, HandLayout], work: Path, steps: int, reps: int) -> list[dict]:
    samples: dict[str, list[dict]] = {name: [] for name in layouts}
    for rep in range(reps):
        link = measure_local_link()
        for i, (name, layout) in enumerate(layouts.items()):
            samples[name].append(_predict_and_run(layout, link, work, f"{rep}-{i}", steps))
    rows = []
    for name, runs in samples.items():
        predicted = statistics.median(r["predicted_step_s"] for r in runs)
        measured = statistics.median(r["measured_step_s"] for r in runs)
        rows.append(
            {
                "plan": name,
                "ranks": runs[0]["ranks"],
                "reps": len(runs),
                "predicted_step_s": predicted,
                "measured_step_s": measured,
                "ratio": predicted / measured,
                "rep_ratios": [r["predicted_step_s"] / r["measured_step_s"] for r in runs],
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                "dp_only_tokens_per_s": statistics.median(r["dp_only_tokens_per_s"] for r in runs),
                "memory": {
                    d: (max(r["memory"][d][0] for r in runs), runs[-1]["memory"][d][1])
                    for d in runs[-1]["memory"]
                },
            }
        )
    return rows


def _predict_and_run(layout: HandLayout, link: tuple[float, float], work: Path, tag: str, steps: int) -> dict:
    """Calibrate this machine's ranks, price `layout` and run it, and the same ranks data-parallel only."""
    devices = sorted({d for c in layout.clusters for d in c})
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    probe = StepProbe("tiny", "full", 4, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES, steps=8, threads=threads)
    measured = measure_model_steps(probe, len(devices))
    calibrated = fleet([0.05] * len(devices), measured, link=link)
    plan = hand_plan(calibrated, profile(), [layout], CostSettings(micro_batches=MICRO_BATCHES))
    # The cost model prices training steps; a checkpoint after every step (the default) adds
    # its writes (about 40 MB here, ~30% of a step on this machine's disk) to the next step.
    run = execute(plan, work, f"pred-{tag}", steps, threads, checkpoint_every=steps)
    baseline = hand_plan(
        calibrated, profile(), [HandLayout((tuple(devices),), "single", ((0, UNITS),), ("DDP",))],
        CostSettings(micro_batches=MICRO_BATCHES),
    )  # fmt: skip
    dp = execute(baseline, work, f"dp-{tag}", steps, threads, checkpoint_every=steps)
    s = run["summary"]
    return {
        "ranks": len(devices),
        "predicted_step_s": s["step_s_predicted"],
        "measured_step_s": s["step_s_measured"],
        "tokens_per_s": s["tokens_per_s_measured"],
        "dp_only_tokens_per_s": dp["summary"]["tokens_per_s_measured"],
        "memory": {
            d: (s["peak_memory_bytes"][d], s["planned_memory_bytes"][d]) for d in s["peak_memory_bytes"]
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one layout, 4 steps")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3, help="calibrate-and-run repetitions (1 with --quick)")
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    steps = 4 if args.quick else args.steps
    eq = {"U-shaped, DDP + FSDP": EQUIVALENCE["U-shaped, DDP + FSDP"]} if args.quick else EQUIVALENCE
    pred = {"3-stage pipeline": PREDICTION["3-stage pipeline"]} if args.quick else PREDICTION
    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="yellowstone-exec-") as tmp:
        work = Path(tmp)
        eq_rows = equivalence(eq, work, steps, threads=1)
        pred_rows = prediction(pred, work, steps, reps)
    table = Table(title=f"equivalence with one process (fp32, {steps} steps, same batches; target <= 1e-4)")
    for col in ("layout", "loss first -> last", "max relative difference"):
        table.add_column(col)
    for r in eq_rows:
        table.add_row(r["layout"], f"{r['first']:.4f} -> {r['last']:.4f}", f"{r['max_rel_diff']:.2e}")
    console.print(table)
    table = Table(
        title="prediction after calibration (medians over repetitions), and throughput vs data-parallel only "
        "on the same ranks"
    )
    for col in ("plan", "ranks", "step s predicted / measured", "ratio (target 0.8-1.25)", "single repetitions",
                "tokens/s plan / DP only", "peak memory measured / planned (GiB)"):  # fmt: skip
        table.add_column(col)
    for r in pred_rows:
        memory = ", ".join(f"{d} {a / GIB:.2f}/{b / GIB:.2f}" for d, (a, b) in r["memory"].items())
        table.add_row(
            r["plan"], str(r["ranks"]), f"{r['predicted_step_s']:.3f} / {r['measured_step_s']:.3f}", f"{r['ratio']:.2f}",
            ", ".join(f"{x:.2f}" for x in r["rep_ratios"]),
            f"{r['tokens_per_s']:,.0f} / {r['dp_only_tokens_per_s']:,.0f} "
            f"({r['tokens_per_s'] / r['dp_only_tokens_per_s']:.2f}x)", memory,
        )  # fmt: skip
    console.print(table)
    print(
        json.dumps(
            {
                "equivalence": eq_rows,
                "prediction": pred_rows,
                "median_ratio": statistics.median(r["ratio"] for r in pred_rows),
            }
        )
    )


if __name__ == "__main__":
    main()
