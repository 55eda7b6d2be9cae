"""`echelon plan FLEET.yaml --model PRESET_OR_DIR`: compile a fleet and a model into a training plan.

Writes plan.json (see `echelon.yellowstone.plan` for the schema), plan.schema.json and plan.png to
--out, and prints the plan; --explain adds the reasons for each choice. Exit status: `EXIT_STATUS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from echelon.cliargs import count, out_path
from echelon.errors import UserError
from echelon.rundir import write_atomic
from echelon.yellowstone.cost import CostSettings
from echelon.yellowstone.fleet import load_fleet
from echelon.yellowstone.model_profile import DTYPE_BYTES, PRESETS, build_profile, resolve_model
from echelon.yellowstone.plan import Plan, write_plan
from echelon.yellowstone.planner import plan_fleet
from echelon.yellowstone.render import render_png, render_text

EXIT_STATUS = """exit status:
  0  plan written; every boundary planned and every check passed
  1  plan written, but a check failed (printed as FAILED)
  2  bad input (file, field or flag), or no boundary can be planned; nothing is written
  3  plan written for the other boundaries; a boundary was refused (named, with the reason)"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_STATUS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("fleet", type=Path, help="fleet file (YAML); see examples/fleets/")
    parser.add_argument(
        "--model", required=True, help=f"a preset ({', '.join(PRESETS)}) or a directory with config.json"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--lora", dest="trainable", action="store_const", const="lora", help="train LoRA adapters (default)"
    )
    mode.add_argument(
        "--full", dest="trainable", action="store_const", const="full", help="train every weight"
    )
    parser.set_defaults(trainable="lora")
    parser.add_argument(
        "--lora-rank", type=count(4096), default=16, help="LoRA rank r (adapters on q_proj, v_proj)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    parser.add_argument("--seq-len", type=count(2**20), default=2048, help="tokens per sequence")
    parser.add_argument(
        "--micro-batch", type=count(4096), default=4, help="sequences per micro-batch and replica"
    )
    parser.add_argument("--micro-batches", type=count(4096), default=8, help="micro-batches per step (1F1B)")
    parser.add_argument(
        "--out",
        type=out_path(staged=False),
        default=None,
        help="output directory (default runs/plan-<fleet name>)",
    )
    parser.add_argument("--explain", action="store_true", help="say why each choice was made")


def run(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    name, shape, source = resolve_model(args.model)
    profile = build_profile(
        name, shape, trainable=args.trainable, dtype=args.dtype, seq_len=args.seq_len,
        micro_batch=args.micro_batch, lora_rank=args.lora_rank, source=source,
    )  # fmt: skip
    plan = plan_fleet(fleet, profile, CostSettings(micro_batches=args.micro_batches))
    out = args.out or Path("runs") / f"plan-{fleet.name}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_plan(plan, out / "plan.json")
    write_atomic(out / "plan.schema.json", json.dumps(Plan.model_json_schema(), indent=2) + "\n")
    render_png(plan, out / "plan.png")
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    render_text(plan, console, explain=args.explain)
    console.print(f"wrote {out / 'plan.json'}, {out / 'plan.schema.json'} and {out / 'plan.png'}")
    if not all(c.ok for c in plan.checks):
        return 1
    return 3 if plan.refused else 0
