"""Read a finished run directory: summary.json, config.yaml, metrics.jsonl and the audit byte trace.

Times are virtual seconds (the simulation clock); bytes are exact wire bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from echelon.audit.layout import audit_dir
from echelon.errors import UserError
from echelon.yamlio import read_yaml

RUN_FILES = ("summary.json", "metrics.jsonl", "config.yaml")
SUMMARY_KEYS = (
    "name",
    "strategy",
    "start_val_loss",
    "end_val_loss",
    "tokens",
    "outer_steps",
    "virtual_time_s",
    "cross_boundary_bytes",
)


@dataclass(frozen=True)
class RunData:
    """One run directory's records, split by metrics kind, in file order."""

    path: Path
    summary: dict
    config: dict
    outer: list[dict]
    middle: list[dict]
    controller: list[dict]

    @property
    def cross_boundary_total(self) -> int:
        """All cross-boundary wire bytes of the run (the sum of the per-type totals)."""
        return int(sum(self.summary["cross_boundary_bytes"].values()))


def _not_a_run(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} is not a run directory ({why}); pass a directory written by `echelon train` "
        "(runs/<name> by default) or by `echelon sweep` (DIR/runs/<id>)"
    )


def load_run_dir(path: str | Path) -> RunData:
    """Read a finished run directory; a UserError names the path and what is missing or damaged."""
    p = Path(path)
    if not p.is_dir():
        raise _not_a_run(p, "no such directory")
    if p.name.endswith(".partial"):
        raise UserError(f"{p} is an unfinished run (interrupted before it completed); train it again")
    missing = [name for name in RUN_FILES if not (p / name).is_file()]
    if missing:
        raise _not_a_run(p, f"missing {', '.join(missing)}")
    try:
        summary = json.loads((p / "summary.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p / 'summary.json'}: not valid JSON ({e}); the run directory is damaged") from None
    absent = [k for k in SUMMARY_KEYS if k not in summary]
    if absent:
        raise UserError(f"{p / 'summary.json'}: missing {', '.join(absent)}; the run directory is damaged")
    config = read_yaml(p / "config.yaml")
    records = _read_jsonl(p / "metrics.jsonl")
    by_kind: dict[str, list[dict]] = {"outer_step": [], "middle_step": [], "controller": []}
    for r in records:
        by_kind.setdefault(r.get("kind", ""), []).append(r)
    if not by_kind["outer_step"]:
        raise UserError(f"{p / 'metrics.jsonl'}: no outer_step records; the run directory is damaged")
    return RunData(
        path=p,
        summary=summary,
        config=config if isinstance(config, dict) else {},
        outer=by_kind["outer_step"],
        middle=by_kind["middle_step"],
        controller=by_kind["controller"],
    )


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); the file is damaged") from None
    return out


def time_to_target(outer: list[dict], target: float) -> float | None:
    """Virtual seconds until the first evaluation with val_loss <= `target`; None if never reached."""
    for r in outer:
        if r["val_loss"] <= target:
            return float(r["time"])
    return None


def tokens_to_target(outer: list[dict], target: float) -> int | None:
    """Training tokens consumed at the first evaluation with val_loss <= `target`; None if never."""
    for r in outer:
        if r["val_loss"] <= target:
            return int(r["tokens_total"])
    return None


def audit_byte_trace(path: Path) -> dict[str, list[tuple[float, int]]]:
    """Sent cross-boundary messages per message type: (virtual time, wire bytes), sorted by time.

    Read from every party's audit log (RUN/audit/*.jsonl, outgoing records that were sent). Empty
    when the run has no audit logs. This does not verify the logs: that is `echelon audit RUN`.
    """
    directory = audit_dir(path)
    trace: dict[str, list[tuple[float, int]]] = {}
    if not directory.is_dir():
        return trace
    for log in sorted(directory.glob("*.jsonl")):
        for r in _read_jsonl(log):
            if r.get("kind") == "message" and r.get("direction") == "out" and r.get("outcome") == "sent":
                trace.setdefault(r["message_type"], []).append((float(r["time"]), int(r["wire_bytes"])))
    return {k: sorted(v) for k, v in sorted(trace.items())}
