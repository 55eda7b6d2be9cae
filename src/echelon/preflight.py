"""Checks that run before any work starts: everything about a run that can be known to fail.

`preflight(cfg, run_file, out, deploy=...)` refuses, in one ConfigError naming the run file and
every field at fault, what the run file validation alone cannot see: a strategy a deployment
does not run, data or model paths that are not there, sizes the model cannot take (a sequence
longer than its positions, a LoRA rank above its matrices' rank, activations or adapters that do
not fit in this machine's memory), a local round longer than the whole token budget, and an
output directory that cannot be written or lacks the space for the checkpoints and the final
model. Nothing is created before it passes, so a refused run leaves no `.partial` behind.

Light on purpose: `echelon launch` calls it without importing torch or transformers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from echelon.config import RunConfig
from echelon.errors import ConfigError, UserError
from echelon.strategies import effective_config, get_strategy
from echelon.train.presets import TINY_LLAMA

GIB = 1 << 30
# Headroom for what the estimate leaves out (the metrics, the tokenizer, an audit log).
DISK_SLACK_BYTES = 64 << 20


def require_admissible(cfg: RunConfig) -> None:
    """A deployment runs only strategies the information-flow contract admits."""
    if not get_strategy(cfg.strategy).admissible:
        raise UserError(
            f"strategy {cfg.strategy!r} is not admissible under the information-flow contract (per-device "
            "updates would cross a boundary); it runs only in simulation: `echelon train`"
        )


def deployable(cfg: RunConfig) -> RunConfig:
    """The configuration a deployed party runs for the run file `cfg`: refused unless admissible,
    then resolved for its strategy exactly as the simulator resolves it."""
    require_admissible(cfg)
    return effective_config(cfg)


def model_shape(cfg: RunConfig) -> dict:
    """The model's architecture fields (hidden size, layers, positions, ...) without loading it:
    the tiny preset's, or those of `model.path`'s config.json. Empty when they cannot be read
    (the model loader reports why)."""
    if cfg.model.path is None:
        return dict(TINY_LLAMA)
    try:
        return json.loads((Path(cfg.model.path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _memory_problems(cfg: RunConfig, shape: dict, available: int) -> list[tuple[str, str]]:
    """Lower bounds of what one local round holds in memory, against `available` bytes."""
    hidden, layers = shape.get("hidden_size"), shape.get("num_hidden_layers")
    heads, vocab = shape.get("num_attention_heads"), shape.get("vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
        return []
    t, d = cfg.train, cfg.data
    out = []
    # Eager attention keeps a (batch, heads, seq, seq) float32 score matrix per layer for backward.
    attention = 4 * t.micro_batch * heads * d.seq_len**2 * layers
    logits = 4 * t.micro_batch * d.seq_len * vocab * 3  # logits, their softmax and gradient
    activations = attention + logits
    if activations > available:
        out.append(
            (
                "data.seq_len",
                f"{d.seq_len} tokens x micro_batch {t.micro_batch} need at least {activations / GIB:.1f} GiB "
                f"of activations per step, and {available / GIB:.1f} GiB are available; lower data.seq_len "
                "or train.micro_batch",
            )
        )
    if cfg.model.trainable == "lora":
        modules = len(cfg.model.lora.target_modules)
        # Adapters A (r x in) and B (out x r) per targeted matrix and layer; AdamW keeps two moments
        # and a gradient beside each, and every simulated device its own copy of the vector and moments.
        adapter = 4 * cfg.model.lora.r * 2 * hidden * modules * layers
        devices = max(1, len(cfg.devices))
        need = adapter * 4 + adapter * 3 * devices
        if need > available:
            out.append(
                (
                    "model.lora.r",
                    f"rank {cfg.model.lora.r} makes adapters that need at least {need / GIB:.1f} GiB with their "
                    f"optimizer state, and {available / GIB:.1f} GiB are available; lower model.lora.r",
                )
            )
    return out


def available_memory() -> int:
    """Bytes of memory this machine can still give (MemAvailable), or physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _model_problems(cfg: RunConfig, shape: dict) -> list[tuple[str, str]]:
    out = []
    if cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        out.append(
            (
                "model.path",
                f"{cfg.model.path} is not a Hugging Face checkpoint directory (no config.json); give a "
                "local directory saved with save_pretrained, or use `preset: tiny`",
            )
        )
    positions = shape.get("max_position_embeddings")
    if isinstance(positions, int) and cfg.data.seq_len > positions:
        out.append(
            (
                "data.seq_len",
                f"{cfg.data.seq_len} exceeds the model's {positions} positions (max_position_embeddings); "
                f"at most {positions}",
            )
        )
    hidden = shape.get("hidden_size")
    if cfg.model.trainable == "lora" and isinstance(hidden, int) and cfg.model.lora.r > hidden:
        out.append(
            (
                "model.lora.r",
                f"rank {cfg.model.lora.r} exceeds the rank of the adapted matrices (hidden size {hidden}); "
                f"at most {hidden}",
            )
        )
    return out


def _data_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    d = cfg.data
    if d.source == "jsonl" and not Path(d.path).is_file():
        return [("data.path", f"{d.path} is not a file (source jsonl reads one JSONL file)")]
    if d.source == "text_dir" and not Path(d.path).is_dir():
        return [("data.path", f"{d.path} is not a directory (source text_dir reads the .txt files in one)")]
    if d.source == "hf_dataset" and not Path(d.path).exists():
        return [
            ("data.path", f"{d.path} does not exist (a saved dataset directory, or a JSONL or parquet file)")
        ]
    return []


def _budget_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    t, budget, per_round = cfg.train, cfg.budget, cfg.tokens_per_round
    if budget.tokens is not None and per_round > budget.tokens:
        most = max(1, budget.tokens // (t.grad_accum * t.micro_batch * cfg.data.seq_len))
        return [
            (
                "train.inner_steps",
                f"one local round of {t.inner_steps} steps trains {per_round:,} tokens, more than the whole "
                f"token budget of {budget.tokens:,}; at most {most}",
            )
        ]
    return []


def artefact_bytes(cfg: RunConfig, shape: dict) -> int:
    """Bytes of the final model and the checkpoints a run writes (float32), from the model's shape."""
    hidden, layers = shape.get("hidden_size") or 0, shape.get("num_hidden_layers") or 0
    inter, vocab = shape.get("intermediate_size") or 4 * hidden, shape.get("vocab_size") or 0
    base = 4 * (2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter))
    if cfg.model.trainable == "lora":
        trainable = 4 * cfg.model.lora.r * 2 * hidden * len(cfg.model.lora.target_modules) * layers
        final = trainable + (base if cfg.model.path is None else 0)  # the tiny base is saved beside it
    else:
        trainable = final = base
    # The global checkpoint holds theta_g and the outer momentum; each boundary's theta_g, base and
    # Delta_b; each is written beside its previous version before replacing it.
    checkpoints = 2 * (2 * trainable + 3 * trainable * len(cfg.boundaries))
    return final + checkpoints + DISK_SLACK_BYTES


def _output_problems(cfg: RunConfig, out: Path, shape: dict) -> list[tuple[str, str]]:
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        return [("--out", f"{out}: {existing} is not a directory")]
    if out.exists() and not out.is_dir():
        return [("--out", f"{out} exists and is not a directory")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [("--out", f"{out}: {existing} is not writable")]
    need, free = artefact_bytes(cfg, shape), shutil.disk_usage(existing).free
    if need > free:
        return [
            (
                "--out",
                f"{out} needs about {need / (1 << 20):,.0f} MiB for checkpoints and the final model, and "
                f"its filesystem has {free / (1 << 20):,.0f} MiB free",
            )
        ]
    return []


def _simulated_churn(cfg: RunConfig) -> list[tuple[str, str]]:
    """The churn a deployment cannot carry out: a device joining as a boundary of its own (a new
    boundary would need its own coordinator and a place in the global plane's membership)."""
    known = {b.id for b in cfg.boundaries}
    return [
        (
            f"churn.joins[{i}].boundary",
            f"{j.boundary!r} is no boundary of the run: a deployment admits joining devices into its "
            f"boundaries ({', '.join(sorted(known))}); a device joining as a boundary of its own runs "
            "only in simulation (`echelon train`)",
        )
        for i, j in enumerate(cfg.churn.joins)
        if j.boundary not in known
    ]


def preflight(cfg: RunConfig, run_file: Path | str, out: Path | None, *, deploy: bool) -> None:
    """ConfigError naming `run_file` and every field at fault, or nothing: the run can start.

    `out` is the run directory to be (None: not writing one); `deploy`: a deployment will run it.
    """
    problems: list[tuple[str, str]] = []
    if deploy and not get_strategy(cfg.strategy).admissible:
        problems.append(
            (
                "strategy",
                f"{cfg.strategy!r} is not admissible under the information-flow contract (per-device updates "
                "would cross a boundary); it runs only in simulation: `echelon train`",
            )
        )
    if deploy:
        problems += _simulated_churn(cfg)
    shape = model_shape(cfg)
    problems += _data_problems(cfg) + _model_problems(cfg, shape) + _budget_problems(cfg)
    problems += _memory_problems(cfg, shape, available_memory())
    if out is not None:
        problems += _output_problems(cfg, Path(out), shape)
    if problems:
        raise ConfigError(str(run_file), problems)
