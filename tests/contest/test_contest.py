"""The whole contest on a tiny task: pilots pick the best setting, finals run, a rerun resumes."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from echelon.cli import main
from echelon.contest.protocol import RESULTS, RUNS, TABLES, TUNING
from echelon.contest.spec import load_contest
from tests.helpers import small_run

LABEL = "fedavg [not admissible: simulation only]"


def _write(tmp_path: Path) -> Path:
    base = {k: v for k, v in small_run().items() if k not in ("name", "budget")}
    base["data"] = {**base["data"], "max_documents": 20}
    contest = {
        "base": base,
        "strategies": ["echelon", "fedavg"],
        "budgets": {"syncs": {"outer_steps": 1}},
        "seeds": 1,
        "target_loss": 50.0,
        "pilot": {"tokens": 1000, "trials": 2, "search": "grid"},
        "spaces": {"echelon": {"train.lr": [0.0001, 0.03]}, "fedavg": {"train.lr": [0.0001, 0.03]}},
        "stressors": {"wan200": {"network.wan.latency_ms": 200}},
    }
    path = tmp_path / "contest.yaml"
    path.write_text(yaml.safe_dump(contest, sort_keys=False))
    return path


def _run(path: Path, out: Path) -> int:
    return main(["contest", str(path), "--out", str(out), "--workers", "2", "--no-progress"])


@pytest.mark.slow  # spawns worker processes for pilots and finals
def test_contest_tunes_runs_finals_and_resumes(tmp_path, capsys):
    path, out = _write(tmp_path), tmp_path / "out"
    assert _run(path, out) == 0
    printed = capsys.readouterr().out
    assert "8 runs trained now, 0 already finished, 0 failed" in printed
    assert LABEL in printed and all(f"Table {n}:" in printed for n in (5, 6, 10)) and "Table 9" not in printed

    # The chosen setting is the pilot with the lowest final validation loss.
    tuning = json.loads((out / TUNING).read_text())
    assert tuning["pilot"]["token_budget_per_strategy"] == 2000
    for name in ("echelon", "fedavg"):
        trials = tuning["strategies"][name]["trials"]
        losses = {
            t["run_id"]: json.loads((out / RUNS / t["run_id"] / "summary.json").read_text())["end_val_loss"]
            for t in trials
        }
        assert len(losses) == 2 and len(set(losses.values())) == 2
        chosen = tuning["strategies"][name]["chosen"]
        assert chosen["run_id"] == min(losses, key=losses.get)
        assert chosen["end_val_loss"] == min(losses.values())

    with (out / RESULTS).open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["strategy"], r["budget"], r["seed"]) for r in rows] == [
        ("echelon", "syncs", "0"),
        ("echelon", "syncs/wan200", "0"),
        ("fedavg", "syncs", "0"),
        ("fedavg", "syncs/wan200", "0"),
    ]
    for r in rows:
        settings = json.loads(r["settings"])
        assert settings == tuning["strategies"][r["strategy"]]["chosen"]["settings"]
        assert (
            r["outer_steps"] == "1" and r["stop_reason"] == "outer_steps" and r["time_to_target_s"] == "0.0"
        )
    assert [r["admissible"] for r in rows] == ["True", "True", "False", "False"]
    assert all(
        float(b["virtual_time_s"]) > float(a["virtual_time_s"])
        for a, b in zip(rows[::2], rows[1::2], strict=True)
    )
    tables = (out / TABLES).read_text()
    assert LABEL in tables and "## Relative to echelon" in tables and "syncs/wan200" in tables
    assert (out / "plots" / "loss_vs_tokens.png").stat().st_size > 0
    assert (out / "plots" / "final_loss.png").stat().st_size > 0

    # Rerun: nothing trains again and the finished runs are untouched.
    stamps = {d.name: os.stat(d / "summary.json").st_mtime_ns for d in (out / RUNS).iterdir()}
    assert _run(path, out) == 0
    assert "0 runs trained now, 8 already finished" in capsys.readouterr().out
    assert {d.name: os.stat(d / "summary.json").st_mtime_ns for d in (out / RUNS).iterdir()} == stamps

    # An interrupted final (left as .partial) is the only run trained again.
    lost = out / RUNS / rows[1]["run_id"]
    lost.rename(lost.with_name(lost.name + ".partial"))
    (out / RESULTS).unlink()
    assert _run(path, out) == 0
    assert "1 runs trained now, 7 already finished" in capsys.readouterr().out
    assert (lost / "summary.json").is_file() and not lost.with_name(lost.name + ".partial").exists()
    with (out / RESULTS).open() as f:
        assert [r["run_id"] for r in csv.DictReader(f)] == [r["run_id"] for r in rows]


def test_example_contest_files_are_valid():
    examples = Path(__file__).parents[2] / "examples"
    quick = load_contest(examples / "contest_quick.yaml", quick=True)
    assert len(quick.seeds) <= 2 and all(len(t) <= 2 for t in quick.pilots.values())
    full = load_contest(examples / "contest.yaml")
    assert full.seeds == (0, 1, 2) and set(full.spec.budgets) == {"tokens", "bytes", "time", "syncs"}
    assert full.base.data.partition.kind == "dirichlet" and len(full.base.boundaries) == 2
