"""Parameter sweeps: a grid of simulated runs in parallel processes, resumable, one results table.

A sweep file (YAML):

    base: run.yaml                  # a run file (relative to the sweep file), or an inline run
    grid:                           # dotted run-file field -> values; the cartesian product runs
      network.wan.latency_ms: [5, 20, 100]
      data.partition: [{kind: iid}, {kind: dirichlet, alpha: 0.1}]
      boundaries: [2, 4]            # an integer: that many boundaries (see `replicate_boundaries`)
      seed: [0, 1]
      strategy: [echelon, echelon-da]
    target_loss: 5.0                # optional: time-to-target is measured against it

Every grid point becomes a validated run config whose id is a hash of that config (its name
aside), so a run's directory DIR/runs/<id>/ is the same however the sweep is restarted: finished
runs (with summary.json) are skipped, and interrupted ones (`<id>.partial`) start over.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from echelon.analysis.rundata import load_run_dir, time_to_target
from echelon.config import RunConfig, Strict, load_run, resolve_path
from echelon.errors import ConfigError, UserError
from echelon.rundir import write_atomic
from echelon.yamlio import load_model, validation_problems

GRID_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
RESULTS = "results.csv"
RUNS = "runs"


class OnBaseRun(Strict):
    """A file built on a base run: `base` is a run file's path (relative to this file) or an
    inline run (a mapping of run-file fields). Sweep and contest files share it."""

    base: Path | dict[str, Any] = Field(description="run file path (relative to this file) or inline run")

    @field_validator("base", mode="before")
    @classmethod
    def _path_or_mapping(cls, value: object) -> object:
        if not isinstance(value, str | Path | dict):
            raise ValueError("give a run file's path or an inline run (a mapping of run-file fields)")
        return value

    @field_validator("base")
    @classmethod
    def _resolve_base(cls, value: Path | dict[str, Any], info: ValidationInfo) -> Path | dict[str, Any]:
        return resolve_path(value, info) if isinstance(value, Path) else value


class SweepFile(OnBaseRun):
    """A sweep: a base run, a grid of dotted field paths to value lists, an optional target loss."""

    grid: dict[str, list[Any]] = Field(min_length=1, description="dotted run-file field -> values")
    target_loss: float | None = Field(None, gt=0, description="validation loss for time-to-target")

    @field_validator("grid")
    @classmethod
    def _grid_keys(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not GRID_KEY.match(key):
                raise ValueError(f"{key!r} is not a dotted field path such as network.wan.latency_ms")
            if key == "name":
                raise ValueError("`name` cannot be swept: each run is named after its id")
            if not values:
                raise ValueError(f"{key}: give at least one value")
        return grid


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: its values (grid key -> value), its run id and its validated run config."""

    values: dict[str, Any]
    run_id: str
    config: RunConfig


def replicate_boundaries(boundaries: list[dict], count: int) -> list[dict]:
    """`count` boundaries made from the run's own: the first `count`, or copies of them in turn.

    Copy k (k >= 1) of boundary `b` is `b-k`, its devices `<id>-k`, so ids stay unique and every
    boundary keeps its template's devices (and so its quorum). Total devices grow with `count`.
    """
    if count < 1:
        raise ValueError(f"boundaries: {count} is not a boundary count (give an integer >= 1)")
    out = []
    for i in range(count):
        template, k = boundaries[i % len(boundaries)], i // len(boundaries)
        if k == 0:
            out.append(template)
            continue
        b = copy.deepcopy(template)
        b["id"] = f"{template['id']}-{k}"
        b["devices"] = [{**d, "id": f"{d['id']}-{k}"} for d in template["devices"]]
        out.append(b)
    return out


def apply_point(base: dict, values: Mapping[str, Any]) -> dict:
    """A copy of the run dict `base` with each dotted key set to its value (missing mappings made)."""
    cfg = copy.deepcopy(base)
    for key, value in values.items():
        if key == "boundaries" and isinstance(value, int) and not isinstance(value, bool):
            cfg["boundaries"] = replicate_boundaries(cfg["boundaries"], value)
            continue
        *parents, leaf = key.split(".")
        node = cfg
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(
                    f"{'.'.join(parents[: i + 1])} is not a group of fields, so {key} cannot be set"
                )
        node[leaf] = copy.deepcopy(value)
    return cfg


def run_id(cfg: RunConfig) -> str:
    """A stable 12-hex id of a run config (its name left out): same config, same id."""
    data = cfg.model_dump(mode="json")
    data.pop("name")
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def load_sweep(path: str | Path) -> tuple[SweepFile, list[SweepPoint]]:
    """Read a sweep file and expand its grid into validated run configs (in grid order).

    Every problem (the sweep file's fields, the base run, any grid point's resulting run) is a
    ConfigError naming the sweep file, the field and the grid point.
    """
    p = Path(path)
    # Relative paths written in the sweep file (base, grid values) resolve against its directory;
    # the base run's own resolve against the base run file's.
    here = p.resolve().parent
    sweep = load_model(p, SweepFile, context={"base_dir": here})
    if isinstance(sweep.base, Path):
        base_cfg = load_run(sweep.base)
    else:
        try:
            base_cfg = RunConfig.model_validate({"name": "sweep", **sweep.base}, context={"base_dir": here})
        except ValidationError as e:
            raise ConfigError(str(p), [(f"base.{f}", m) for f, m in validation_problems(e)]) from None
    base = base_cfg.model_dump(mode="json")
    prefix = base_cfg.name[:51]
    points = []
    for combo in itertools.product(*sweep.grid.values()):
        values = dict(zip(sweep.grid, combo, strict=True))
        try:
            cfg = RunConfig.model_validate(apply_point(base, values), context={"base_dir": here})
        except ValidationError as e:
            where = f"grid point {_describe(values)}"
            raise ConfigError(str(p), [(f"{f} (at {where})", m) for f, m in validation_problems(e)]) from None
        except ValueError as e:
            raise ConfigError(str(p), [("grid", str(e))]) from None
        rid = run_id(cfg)
        points.append(SweepPoint(values, rid, cfg.model_copy(update={"name": f"{prefix}-{rid}"})))
    return sweep, points


@dataclass
class Execution:
    """What `execute` did: summaries of every finished run, how many were skipped, failures."""

    summaries: dict[str, dict] = field(default_factory=dict)
    skipped: int = 0
    failures: dict[str, str] = field(default_factory=dict)


def _init_worker() -> None:
    """One torch thread per worker process: the workers are the parallelism."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _train(cfg: RunConfig, run_dir: str, redteam: bool) -> dict:
    from echelon.runner import train

    observer = None
    if redteam:
        from echelon.analysis.redteam import Recorder
        from echelon.strategies import effective_config

        observer = Recorder(effective_config(cfg))
    return train(cfg, Path(run_dir), progress=False, observer=observer)


def execute(
    runs: Mapping[str, RunConfig],
    runs_dir: Path,
    *,
    workers: int,
    progress: bool = True,
    on_finish: Callable[[Execution], None] | None = None,
    redteam: bool = False,
) -> Execution:
    """Train every run (id -> config) into runs_dir/<id>/ in `workers` spawned processes
    (`redteam`: with the recordings `echelon redteam` attacks, see echelon.runner.train).

    Runs whose directory already holds summary.json are skipped. A run that fails is recorded in
    `failures` and the others go on. `on_finish` is called after each run ends (e.g. to rewrite
    the results table, so an interrupted sweep still leaves one). Ctrl-C cancels pending runs.
    """
    result = Execution()
    pending: dict[str, RunConfig] = {}
    for rid, cfg in runs.items():
        d = runs_dir / rid
        if (d / "summary.json").is_file():
            result.summaries[rid] = json.loads((d / "summary.json").read_text())
            result.skipped += 1
        elif d.exists():
            raise UserError(f"{d} exists but holds no summary.json (not a finished run); delete it and rerun")
        else:
            pending[rid] = cfg
    runs_dir.mkdir(parents=True, exist_ok=True)
    bar = Progress(
        TextColumn("[bold]sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not progress,
    )
    task = bar.add_task(
        "runs", total=len(runs), completed=result.skipped, status=f"{result.skipped} done before"
    )
    if not pending:
        return result
    pool = ProcessPoolExecutor(
        max_workers=max(1, min(workers, len(pending))),
        mp_context=get_context("spawn"),
        initializer=_init_worker,
    )
    try:
        with bar:
            futures: dict[Future, str] = {
                pool.submit(_train, cfg, str(runs_dir / rid), redteam): rid for rid, cfg in pending.items()
            }
            for fut in as_completed(futures):
                rid = futures[fut]
                try:
                    summary = fut.result()
                except Exception as e:
                    result.failures[rid] = f"{type(e).__name__}: {e}"
                    status = f"{rid} failed"
                else:
                    result.summaries[rid] = summary
                    status = f"{rid}: val loss {summary['end_val_loss']:.4f}"
                bar.update(task, advance=1, status=status)
                if on_finish is not None:
                    on_finish(result)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return result


DESCRIPTIVE = (
    "strategy",
    "seed",
    "boundaries",
    "wan_latency_ms",
    "wan_jitter_pct",
    "partition",
    "dirichlet_alpha",
    "noniid_severity",
)
METRICS = (
    "start_val_loss",
    "end_val_loss",
    "loss_delta",
    "target_loss",
    "time_to_target_s",
    "cross_boundary_bytes",
    "outer_steps",
    "b_eff",
    "tokens",
    "partition_skew",
    "virtual_time_s",
    "trainable_parameters",
    "tokens_per_virtual_s",
    "compute_tokens_per_s",
    "stop_reason",
)


def _cell(value: Any) -> Any:
    """A CSV cell: scalars as they are, None empty, mappings and lists as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return value


def describe_config(cfg: RunConfig) -> dict[str, Any]:
    """The settings sweeps usually vary, as flat columns (the run file's, before the strategy's rewrite)."""
    part = cfg.data.partition
    return {
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "boundaries": len(cfg.boundaries),
        "wan_latency_ms": cfg.network.wan.latency_ms,
        "wan_jitter_pct": cfg.network.wan.jitter_pct,
        "partition": part.kind,
        "dirichlet_alpha": part.alpha if part.kind == "dirichlet" else None,
        # The paper's non-IID stressor as one number: 1 / Dirichlet alpha (more skewed: larger), 0 for IID.
        "noniid_severity": 1 / part.alpha if part.kind == "dirichlet" else 0.0,
    }


def run_outcome(run_dir: Path, target: float | None) -> dict[str, Any]:
    """The outcome columns of one finished run (METRICS).

    loss_delta = end - start validation loss (negative: it improved); time_to_target_s is virtual
    seconds to the first evaluation at or below `target` (empty when never reached or no target).
    """
    run = load_run_dir(run_dir)
    s = run.summary
    return {
        "start_val_loss": s["start_val_loss"],
        "end_val_loss": s["end_val_loss"],
        "loss_delta": s["end_val_loss"] - s["start_val_loss"],
        "target_loss": _cell(target),
        "time_to_target_s": _cell(None if target is None else time_to_target(run.outer, target)),
        "cross_boundary_bytes": run.cross_boundary_total,
        "outer_steps": s["outer_steps"],
        "b_eff": s.get("b_eff", ""),
        "tokens": s["tokens"],
        "partition_skew": s.get("partition_skew", ""),
        "virtual_time_s": s["virtual_time_s"],
        "trainable_parameters": s.get("trainable_parameters", ""),
        "tokens_per_virtual_s": s.get("tokens_per_virtual_s", ""),
        "compute_tokens_per_s": s.get("compute_tokens_per_s", ""),
        "stop_reason": s.get("stop_reason", ""),
    }


def write_results(
    path: Path,
    points: list[SweepPoint],
    runs_dir: Path,
    target: float | None,
    outcomes: dict[str, dict[str, Any]] | None = None,
) -> int:
    """Write the results CSV (atomically): one row per point whose run finished; returns the count.

    A row is the run id, the grid values, `describe_config` and `run_outcome`. `outcomes` caches
    run outcomes by run id across calls, so rewriting the table after each run stays cheap.
    """
    cache = {} if outcomes is None else outcomes
    rows = []
    for pt in points:
        if pt.run_id not in cache and (runs_dir / pt.run_id / "summary.json").is_file():
            cache[pt.run_id] = run_outcome(runs_dir / pt.run_id, target)
        if pt.run_id in cache:
            row: dict[str, Any] = {"run_id": pt.run_id}
            row.update({k: _cell(v) for k, v in pt.values.items()})
            row.update({k: _cell(v) for k, v in describe_config(pt.config).items() if k not in row})
            rows.append({**row, **cache[pt.run_id]})
    columns = ["run_id", *points[0].values] if points else ["run_id"]
    columns += [c for c in DESCRIPTIVE if c not in columns]
    columns += list(METRICS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())
    return len(rows)


def run_sweep(
    points: list[SweepPoint], out: Path, target: float | None, *, workers: int, progress: bool = True
) -> Execution:
    """Run the grid into out/runs/ (skipping finished runs) and keep out/results.csv current."""
    runs_dir = out / RUNS
    unique = {pt.run_id: pt.config for pt in points}
    outcomes: dict[str, dict[str, Any]] = {}

    def refresh(_: Execution) -> None:
        write_results(out / RESULTS, points, runs_dir, target, outcomes)

    outcome = execute(unique, runs_dir, workers=workers, progress=progress, on_finish=refresh)
    out.mkdir(parents=True, exist_ok=True)
    refresh(outcome)
    return outcome
