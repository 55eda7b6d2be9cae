"""Sweep files expand into validated run configs; a sweep resumes, skipping finished runs."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml

from echelon.analysis.sweep import RESULTS, RUNS, load_sweep, run_id
from echelon.cli import main
from tests.helpers import small_run


def _tiny_run(**overrides) -> dict:
    """small_run with one outer step on 20 documents: the fastest run that still trains."""
    cfg = small_run(budget={"outer_steps": 1}, **overrides)
    cfg["data"] = {**cfg["data"], "max_documents": 20}
    return cfg


def _write(tmp_path, sweep: dict, base: dict | None = None):
    if base is not None:
        (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_grid_expands_to_the_cartesian_product_in_order(tmp_path):
    grid = {"network.wan.latency_ms": [5, 100], "seed": [0, 1, 2], "strategy": ["echelon-da"]}
    path = _write(tmp_path, {"base": "base.yaml", "grid": grid, "target_loss": 5.0}, _tiny_run())
    sweep, points = load_sweep(path)
    assert sweep.target_loss == 5.0
    assert [(p.values["network.wan.latency_ms"], p.values["seed"]) for p in points] == [
        (5, 0),
        (5, 1),
        (5, 2),
        (100, 0),
        (100, 1),
        (100, 2),
    ]
    for p in points:
        assert p.config.network.wan.latency_ms == p.values["network.wan.latency_ms"]
        assert p.config.seed == p.values["seed"] and p.config.strategy == "echelon-da"
        assert p.config.network.wan.jitter_pct == 50  # untouched fields keep the base's values
        assert p.config.name == f"small-{p.run_id}" and run_id(p.config) == p.run_id
    assert len({p.run_id for p in points}) == 6
    assert [p.run_id for p in load_sweep(path)[1]] == [p.run_id for p in points]  # stable ids


def test_boundary_count_and_mappings_in_the_grid(tmp_path):
    grid = {
        "boundaries": [1, 3],
        "data.partition": [{"kind": "iid"}, {"kind": "dirichlet", "alpha": 0.1}],
    }
    base = {k: v for k, v in _tiny_run().items() if k != "name"}
    _, points = load_sweep(_write(tmp_path, {"base": base, "grid": grid}))
    assert [len(p.config.boundaries) for p in points] == [1, 1, 3, 3]
    three = points[2].config
    assert [b.id for b in three.boundaries] == ["b0", "b1", "b0-1"]
    assert [d.id for d in three.boundaries[2].devices] == ["d0-1", "d1-1"]
    assert points[0].config.data.partition.kind == "iid"
    assert points[1].config.data.partition.alpha == 0.1


@pytest.mark.parametrize(
    ("sweep", "field", "words"),
    [
        (
            {"base": "base.yaml", "grid": {"network.wan.latncy_ms": [5]}},
            "network.wan.latncy_ms",
            "unknown field",
        ),
        ({"base": "base.yaml", "grid": {"network.wan.latency_ms": [5, -1]}}, "latency_ms", "greater than"),
        ({"base": "base.yaml", "grid": {"seed": 3}}, "grid.seed", "valid list"),
        ({"base": "base.yaml", "grid": {"seed": []}}, "grid", "at least one value"),
        ({"base": "base.yaml", "grid": {"name": ["x"]}}, "grid", "cannot be swept"),
        ({"base": "base.yaml", "grid": {"strategy": ["nope"]}}, "strategy", "unknown strategy"),
        ({"base": "base.yaml", "grdi": {"seed": [0]}}, "grdi", "unknown field"),
        ({"grid": {"seed": [0]}}, "base", "missing"),
        ({"base": 3, "grid": {"seed": [0]}}, "base", "run file's path"),
        ({"base": {"boundaries": []}, "grid": {"seed": [0]}}, "base.boundaries", "at least 1"),
        ({"base": "other.yaml", "grid": {"seed": [0]}}, "other.yaml", "no such file"),
    ],
)
def test_bad_sweep_file_exits_2_naming_file_and_field(tmp_path, capsys, sweep, field, words):
    path = _write(tmp_path, sweep, _tiny_run())
    out = tmp_path / "out"
    code = main(["sweep", str(path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert ".yaml" in err and field in err and words in err
    assert not out.exists()


def _results(out) -> list[dict[str, str]]:
    with (out / RESULTS).open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # spawns worker processes
def test_sweep_runs_in_parallel_and_resumes_after_interruption(tmp_path, capsys):
    path = _write(tmp_path, {"base": "base.yaml", "grid": {"seed": [0, 1]}, "target_loss": 50.0}, _tiny_run())
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    assert "2 trained now, 0 already finished" in capsys.readouterr().out
    rows = _results(out)
    assert [r["seed"] for r in rows] == ["0", "1"]
    for r in rows:
        assert float(r["end_val_loss"]) < float(r["start_val_loss"])
        assert float(r["loss_delta"]) == pytest.approx(float(r["end_val_loss"]) - float(r["start_val_loss"]))
        assert r["outer_steps"] == "1" and r["time_to_target_s"] == "0.0"  # the first evaluation hits 50
        assert int(r["cross_boundary_bytes"]) > 0 and float(r["b_eff"]) > 0 and int(r["tokens"]) > 0
        assert r["boundaries"] == "2" and r["wan_latency_ms"] == "20.0" and r["partition"] == "dirichlet"

    # Interrupt: the second run is left half-written, the first is finished.
    kept, lost = (out / RUNS / r["run_id"] for r in rows)
    stamp = os.stat(kept / "summary.json").st_mtime_ns
    lost.rename(lost.with_name(lost.name + ".partial"))
    (out / RESULTS).unlink()
    assert main(["sweep", str(path), "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    assert "1 trained now, 1 already finished" in capsys.readouterr().out
    assert os.stat(kept / "summary.json").st_mtime_ns == stamp
    assert (lost / "summary.json").is_file() and not lost.with_name(lost.name + ".partial").exists()
    assert [r["run_id"] for r in _results(out)] == [r["run_id"] for r in rows]

    # Nothing left to do: the table is rewritten from the finished runs alone.
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "0 trained now, 2 already finished" in capsys.readouterr().out


def test_example_sweep_files_are_valid():
    sweep, points = load_sweep(Path(__file__).parents[2] / "examples" / "sweeps" / "law.yaml")
    assert len(points) == 24 and len({p.run_id for p in points}) == 24
    assert sweep.target_loss == 4.6
    assert {len(p.config.boundaries) for p in points} == {2, 4}
