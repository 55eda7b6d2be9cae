"""Echelon's Python API: what `import echelon` exposes (see `echelon.__all__`).

    import echelon

    cfg = echelon.load_config("examples/demo.yaml")         # or echelon.RunConfig.model_validate({...})
    summary = echelon.simulate(cfg, "runs/demo")             # a RunSummary
    summary = echelon.launch("examples/demo.yaml", "runs/d")  # the same run deployed as local processes
    outer = echelon.read_metrics("runs/demo", "outer_step")  # metrics.jsonl records

Bring your own model, data and loss to a simulated run: `model` is any `torch.nn.Module` called as
a Hugging Face causal LM (`model(input_ids=..., labels=...).loss`) or scored by your own `loss`
(`echelon.TaskLoss`); `data` is any iterable of records with the run file's `data.text_field`
(a Hugging Face `datasets.Dataset` is one). A local Hugging Face checkpoint directory needs no
code: `model: {path: DIR}` in the run file, and `data: {source: hf_dataset, path: ...}` reads a
saved dataset, JSONL or parquet through `datasets`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from echelon.cliargs import MAX_THREADS, writable_path
from echelon.config import RunConfig, load_run
from echelon.errors import ConfigError, UserError
from echelon.record import RunSummary
from echelon.yamlio import validation_problems

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerFast

    from echelon.train.model import InnerOptimizer, TaskLoss
    from echelon.yellowstone.plan import Plan

__all__ = ["launch", "load_config", "plan", "read_summary", "simulate"]


def load_config(source: str | Path | Mapping[str, Any]) -> RunConfig:
    """A validated run configuration from a run file (relative paths resolve against its
    directory) or a mapping; ConfigError names the field and the fix."""
    if isinstance(source, Mapping):
        try:
            return RunConfig.model_validate(source)
        except ValidationError as e:
            raise ConfigError("the run configuration", validation_problems(e)) from None
    return load_run(source)


def simulate(
    config: RunConfig | str | Path | Mapping[str, Any],
    out: str | Path,
    *,
    model: nn.Module | None = None,
    loss: TaskLoss | None = None,
    optimizer: InnerOptimizer | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    data: Iterable[Mapping[str, Any]] | None = None,
    force: bool = False,
    progress: bool = False,
) -> RunSummary:
    """Simulate the run `config` and write its run directory `out`; returns its summary.

    `model` replaces the run file's model (it trains its parameters that require a gradient;
    set `model.trainable: full`), tokenised with `tokenizer` (default: a byte-level one) and
    scored by `loss` (default: the causal LM's own). `optimizer` builds each device's inner
    optimiser (`echelon.InnerOptimizer`; default: AdamW from the run file's `train`). `data`
    replaces the run file's documents.
    """
    from echelon.preflight import preflight
    from echelon.runner import train
    from echelon.train.data import row_document
    from echelon.train.model import build_model, causal_lm_loss, own_model

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    out = _run_dir(out)
    bundle = None
    if model is None:  # the run file's model: checked against this machine before any work
        preflight(cfg, "the run configuration", out, deploy=False)
    else:
        bundle = own_model(model, cfg.model, loss or causal_lm_loss, tokenizer)
    if optimizer is not None:
        _require_local_rounds(cfg)
        bundle = dataclasses.replace(bundle or build_model(cfg.model, cfg.seed), inner_optimizer=optimizer)
    documents = None
    if data is not None:
        d = cfg.data
        documents = [
            row_document(r, d.text_field, d.domain_field, f"data row {i}") for i, r in enumerate(data)
        ]
    train(cfg, out, force=force, progress=progress, bundle=bundle, documents=documents)
    return RunSummary.read(out)


def _require_local_rounds(cfg: RunConfig) -> None:
    """UserError unless every device's inner steps are the simulator's own local rounds (where an
    inner optimiser of the caller's is used)."""
    from echelon.strategies import get_strategy

    if get_strategy(cfg.strategy).local == "scaffold":
        raise UserError(
            f"strategy {cfg.strategy}: SCAFFOLD's local steps are plain SGD by definition; "
            "drop the optimizer or choose another strategy"
        )
    if any(d.replica is not None for b in cfg.boundaries for d in b.devices):
        raise UserError(
            "boundaries with a `plan`: a plan's replicas run their own optimiser; "
            "drop the optimizer or list the boundaries' devices"
        )


def launch(
    run_file: str | Path, out: str | Path, *, force: bool = False, progress: bool = False, threads: int = 1
) -> RunSummary:
    """Deploy the run file as local processes (the global plane, each boundary and device over
    gRPC with mutual TLS, supervised) and write its run directory `out`; returns its summary."""
    from echelon.commands.launch import launch as deploy

    path, out = Path(run_file), _run_dir(out)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise UserError(
            f"threads {threads!r}: give a whole number of torch threads per device, 1 to {MAX_THREADS}"
        )
    deploy(load_run(path), path, out, force=force, progress=progress, threads=threads)
    return RunSummary.read(out)


def _run_dir(out: str | Path) -> Path:
    """`out` as a run directory to write (as the command line's --out takes it); UserError naming
    what is wrong (empty, no name to stage `<out>.partial` beside, too long)."""
    text = os.fspath(out)
    try:
        return writable_path(text)
    except ValueError as e:
        raise UserError(f"out {text!r}: {e}") from None


def read_summary(run_dir: str | Path) -> RunSummary:
    """The summary of a finished run directory (either runtime's)."""
    return RunSummary.read(run_dir)


def plan(fleet: str | Path, model: str = "tiny", **profile: Any) -> Plan:
    """Yellowstone's plan for the fleet file `fleet` and `model` (a preset name or a local Hugging
    Face checkpoint directory); `profile` takes `echelon.yellowstone.model_profile.build_profile`'s
    options (trainable, dtype, seq_len, micro_batch, lora_rank)."""
    from echelon.yellowstone.fleet import load_fleet
    from echelon.yellowstone.model_profile import build_profile, resolve_model
    from echelon.yellowstone.planner import plan_fleet

    name, shape, source = resolve_model(model)
    return plan_fleet(load_fleet(fleet), build_profile(name, shape, source=source, **profile))
