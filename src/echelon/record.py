"""One way to record a run, for the simulator and the deployment alike.

`RunRecorder` is handed the run's events. Every event is a line of `metrics.jsonl` (always)
and, with `metrics.tensorboard`, scalars in a TensorBoard event file under `tb/` in the run
directory (`tensorboard --logdir runs/` shows them live): at every outer step it evaluates the
global model, adds the run's tokens and cross-boundary bytes (in total and per boundary), writes
the record, then checkpoints the plane's state dict. At the end it writes the final weights and
`summary.json`, a `RunSummary`.

What differs between the runtimes is passed in, not branched on: the run's clock (virtual
seconds in simulation, wall seconds since the global plane started in a deployment), what
`tokens` counts (what devices trained in simulation; what the global model folded in, in a
deployment, see docs/architecture.md) and the guards that count each crossing once (every
party's egress guard in simulation; the global plane's two guards in a deployment).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from safetensors import SafetensorError

from echelon import rundir
from echelon.errors import UserError
from echelon.parties import GLOBAL

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from echelon.assembly import Prepared
    from echelon.config import RunConfig
    from echelon.contract.guard import EgressGuard, IngressGuard

    Guard = EgressGuard | IngressGuard
    from echelon.planes.coordinator import GlobalPlane

Runtime = Literal["simulation", "grpc"]


@dataclass(frozen=True)
class RunSummary:
    """summary.json: the same keys, with the same types, whichever runtime ran the run.

    virtual_time_s is the run's clock (virtual seconds in simulation, wall seconds since the
    global plane started in a deployment); bytes are wire bytes by message type; `refused`
    counts messages refused on arrival; `intra_boundary_bytes` is empty in a deployment (each
    boundary's own business, never seen by the global plane). Throughput is measured from the
    run: `tokens_per_virtual_s` over the run's clock (the modelled fleet, stalls and all), and
    `compute_tokens_per_s` per CPU second of the local rounds this process ran (0.0 in a
    deployment, whose global plane runs none).
    """

    name: str
    runtime: Runtime
    strategy: str
    admissible: bool
    start_val_loss: float
    end_val_loss: float
    tokens: int
    outer_steps: int
    b_eff: float
    middle_steps: dict[str, int]
    stop_reason: str | None
    virtual_time_s: float
    wall_time_s: float
    trainable_parameters: int
    partition_skew: float
    cross_boundary_bytes: dict[str, int]
    cross_boundary_bytes_by_boundary: dict[str, int]
    intra_boundary_bytes: dict[str, int]
    refused: int
    tokens_per_virtual_s: float
    compute_tokens_per_s: float
    artefact: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunSummary:
        """The summary of the finished run in `run_dir`; UserError when it is missing or damaged."""
        path = Path(run_dir) / "summary.json"
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except FileNotFoundError:
            raise UserError(f"{path}: no summary; is {run_dir} a finished run directory?") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a run summary ({type(e).__name__}: {e})") from None


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of `run_dir`/metrics.jsonl in order (only those of `kind` when given)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); the file is damaged") from None
            if kind is None or record.get("kind") == kind:
                records.append(record)
    return records


class MetricsWriter:
    """metrics.jsonl (one JSON object per line, flushed) and, when asked, TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self._jsonl = (run_dir / "metrics.jsonl").open("a")
        self._tb: SummaryWriter | None = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "metrics.tensorboard needs the tensorboard package: pip install 'echelon[tensorboard]'"
                ) from None
            self._tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._scalars(record)

    def _scalars(self, r: dict[str, Any]) -> None:
        tb = self._tb
        if r["kind"] == "outer_step":
            step = r["outer_step"]
            scalars = {
                "loss/val": r["val_loss"],
                "cadence/H": r.get("interval"),
                "tokens": r["tokens_total"],
                "bytes/cross_boundary": r["cross_boundary_bytes"],
                "b_eff": r.get("b_eff"),
            }
            scalars |= {f"bytes/boundary/{b}": n for b, n in r["cross_boundary_bytes_by_boundary"].items()}
        elif r["kind"] == "controller":
            step = r["tick"]
            scalars = {f"drift/D_b/{b}": d for b, d in r["drift"].items()}
            scalars |= {f"cadence/H_b/{b}": h for b, h in r["scheduled"].items()}
            scalars["cadence/H"] = r["interval"]
        elif r["kind"] == "middle_step" and "boundary" in r:
            step, scalars = r["middle_step"], {f"loss/train/{r['boundary']}": r["train_loss"]}
        else:
            return
        for tag, value in scalars.items():
            if isinstance(value, int | float):
                tb.add_scalar(tag, value, step)
        tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class RunRecorder:
    """Records the run of `plane` into `run_dir`; `on_emit` is the plane's event sink.

    `counters` are guards that between them count every crossing once; `clock` and `tokens` give
    the run's time and token count as its runtime defines them; `evals` resumes a checkpoint's;
    `on_outer_step` sees each outer step's record (a progress bar); `tensorboard` adds event files
    whatever the run file's metrics.tensorboard says.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: RunConfig,
        prep: Prepared,
        plane: GlobalPlane,
        counters: Sequence[Guard],
        *,
        runtime: Runtime,
        clock: Callable[[], float],
        tokens: Callable[[], int],
        evals: list[float] | None = None,
        on_outer_step: Callable[[dict[str, Any]], None] | None = None,
        tensorboard: bool = False,
    ) -> None:
        self.run_dir, self.cfg, self.prep, self.plane, self.counters = run_dir, cfg, prep, plane, counters
        self.runtime, self.clock, self.tokens = runtime, clock, tokens
        self.evals = list(evals or [])
        self.on_outer_step = on_outer_step
        self.metrics = MetricsWriter(run_dir, cfg.metrics.tensorboard or tensorboard)

    def cross_bytes(self) -> int:
        return sum(g.bytes_total for g in self.counters)

    def cross_bytes_by_boundary(self) -> dict[str, int]:
        return dict(sorted(sum((g.bytes_by_boundary for g in self.counters), Counter()).items()))

    def cross_bytes_by_type(self) -> dict[str, int]:
        return dict(sorted(sum((g.bytes_by_type for g in self.counters), Counter()).items()))

    def evaluate(self) -> float:
        return self.prep.trainer.evaluate(self.plane.theta_g, self.cfg.eval.sequences, self.cfg.eval.batch)

    def on_emit(self, kind: str, fields: dict[str, Any]) -> None:
        record = {"kind": kind, **fields}
        if kind == "outer_step":
            record["val_loss"] = self.evaluate()
            record["tokens_total"] = self.tokens()
            record["cross_boundary_bytes"] = self.cross_bytes()
            record["cross_boundary_bytes_by_boundary"] = self.cross_bytes_by_boundary()
            self.evals.append(record["val_loss"])
        self.metrics.write(record)
        if kind == "outer_step":
            # After the record, before the step's reference leaves (a deployment's outbox releases
            # it only when this returns): a crash in between repeats the record, never the step.
            state = {"plane": self.plane.state_dict(), "evals": list(self.evals)}
            rundir.save_checkpoint(rundir.checkpoint_path(self.run_dir, GLOBAL), state)
            if self.on_outer_step is not None:
                self.on_outer_step(record)

    def close(self) -> None:
        self.metrics.close()

    def finish(
        self,
        wall_s: float,
        middle_steps: dict[str, int],
        intra_boundary_bytes: dict[str, int],
        refused: int,
        hint: str = "",
        compute_s: float = 0.0,
    ) -> RunSummary:
        """Write the final model and summary.json; UserError (the checkpoint kept) when the disk refuses."""
        from echelon.strategies import get_strategy

        plane, prep = self.plane, self.prep
        if not self.evals:  # the run ended before it started (no boundary came): the initial model
            self.evals.append(self.evaluate())
        strategy = get_strategy(self.cfg.strategy)
        try:
            artefact = prep.bundle.save(self.run_dir, prep.trainer.model_part(plane.theta_g))
            summary = RunSummary(
                name=self.cfg.name,
                runtime=self.runtime,
                strategy=strategy.label,
                admissible=strategy.admissible,
                start_val_loss=self.evals[0],
                end_val_loss=self.evals[-1],
                tokens=self.tokens(),
                outer_steps=plane.outer_step,
                b_eff=plane.b_eff,
                middle_steps=middle_steps,
                stop_reason=plane.final_reason,
                virtual_time_s=self.clock(),
                wall_time_s=wall_s,
                trainable_parameters=prep.bundle.dim,
                partition_skew=prep.skew,
                cross_boundary_bytes=self.cross_bytes_by_type(),
                cross_boundary_bytes_by_boundary=self.cross_bytes_by_boundary(),
                intra_boundary_bytes=dict(sorted(intra_boundary_bytes.items())),
                refused=refused,
                tokens_per_virtual_s=self.tokens() / self.clock() if self.clock() else 0.0,
                compute_tokens_per_s=self.tokens() / compute_s if compute_s else 0.0,
                artefact=artefact.name,
            )
            rundir.write_atomic(
                self.run_dir / "summary.json", json.dumps(summary.to_dict(), indent=2, sort_keys=True) + "\n"
            )
        except (OSError, SafetensorError) as e:
            raise UserError(
                f"could not write the final model or summary in {self.run_dir} ({e}); the last "
                f"synchronised model (outer step {plane.outer_step}) is in "
                f"{rundir.checkpoint_path(self.run_dir, GLOBAL)}{hint}"
            ) from None
        return summary
