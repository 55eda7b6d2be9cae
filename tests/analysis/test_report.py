"""`echelon report RUN` writes its plots and summary into RUN/report/ and nothing else."""

from __future__ import annotations

import hashlib

import pytest

from echelon.cli import main
from echelon.config import RunConfig
from echelon.runner import train
from tests.helpers import small_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    sync = {"interval": 2, "h_min": 2, "h_max": 6}  # the drift-aware cadence, kept short
    cfg = RunConfig.model_validate(
        small_run(strategy="echelon-da", budget={"outer_steps": 3}, echelon={"sync": sync})
    )
    out = tmp_path_factory.mktemp("report") / "run"
    train(cfg, out, progress=False)
    return out


def _snapshot(run_dir) -> dict[str, str]:
    """Digest of every file in the run directory outside report/."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.relative_to(run_dir).parts[0] != "report"
    }


def test_report_writes_plots_and_markdown_without_touching_the_run(run_dir, capsys):
    before = _snapshot(run_dir)
    assert main(["report", str(run_dir), "--target", "100"]) == 0
    report = run_dir / "report"
    assert sorted(p.name for p in report.iterdir()) == [
        "bytes.png",
        "controller.png",
        "loss.png",
        "report.md",
    ]
    for name in ("bytes.png", "controller.png", "loss.png"):
        assert (report / name).read_bytes()[:8] == PNG
    md = (report / "report.md").read_text()
    assert md.startswith("# Run report: small")
    for words in ("echelon-da", "(loss.png)", "(controller.png)", "(bytes.png)", "BoundaryDelta", "B_eff"):
        assert words in md
    assert "time to target loss 100 | 0.00 s virtual, 0 tokens" in md
    assert "they match the run summary" in md
    assert _snapshot(run_dir) == before
    assert str(report / "report.md") in capsys.readouterr().out


def test_report_again_replaces_the_old_one_cleanly(run_dir):
    assert main(["report", str(run_dir)]) == 0
    assert main(["report", str(run_dir)]) == 0
    assert "time to target" not in (run_dir / "report" / "report.md").read_text()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".report")) == []


def test_not_a_run_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and "summary.json" in err and "Traceback" not in err
    assert not (tmp_path / "empty" / "report").exists()
    (tmp_path / "x.partial").mkdir()
    assert main(["report", str(tmp_path / "x.partial")]) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
