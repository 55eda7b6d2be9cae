"""The law fit recovers known coefficients, its scores are seeded, and the CLI reads a results table."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from echelon.analysis.law import (
    LAW,
    compare,
    fit_power_law,
    kfold_predictions,
    loss_gaps,
    read_results,
    usable_rows,
)
from echelon.cli import main
from echelon.errors import UserError

A, ALPHA, B_REF = 0.05, 0.7, 1000.0


def synthetic(n: int = 80, noise: float = 0.2, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B_eff, dL = A * (B_eff / B_REF)^ALPHA * lognormal noise, and an unrelated 'latency' column."""
    rng = np.random.default_rng(seed)
    b = np.exp(rng.uniform(np.log(10.0), np.log(1e5), n))
    gap = A * (b / B_REF) ** ALPHA * np.exp(rng.normal(0.0, noise, n))
    return b, gap, rng.choice([5.0, 20.0, 100.0, 200.0], n)


def test_power_law_is_exact_on_noiseless_data():
    b = np.array([0.1, 0.5, 2.0, 7.0, 30.0])
    a, alpha = fit_power_law(b, 2.0 * b**0.5)
    assert a == pytest.approx(2.0, rel=1e-9) and alpha == pytest.approx(0.5, rel=1e-9)


def test_law_fit_recovers_known_a_and_alpha():
    b, gap, _ = synthetic()
    fit = compare(gap, b, {}, b_ref=B_REF, n_boot=500, seed=0).law
    assert fit.alpha == pytest.approx(ALPHA, abs=0.03)
    assert fit.a == pytest.approx(A, rel=0.1)
    assert fit.alpha_mean == pytest.approx(fit.alpha, abs=0.01)
    assert fit.alpha_ci[0] < fit.alpha < fit.alpha_ci[1] and fit.a_ci[0] < fit.a < fit.a_ci[1]
    assert fit.r2_log > 0.9


def test_bootstrap_ci_covers_the_true_coefficients():
    """Over 20 independent noisy data sets the 95% intervals contain the truth nearly always."""
    covered_a = covered_alpha = 0
    for seed in range(20):
        b, gap, _ = synthetic(n=40, seed=100 + seed)
        fit = compare(gap, b, {}, b_ref=B_REF, n_boot=400, seed=seed).law
        covered_a += fit.a_ci[0] < A < fit.a_ci[1]
        covered_alpha += fit.alpha_ci[0] < ALPHA < fit.alpha_ci[1]
    assert covered_a >= 16 and covered_alpha >= 16


def test_b_ref_only_rescales_a():
    b, gap, _ = synthetic()
    one = compare(gap, b, {}, b_ref=B_REF, n_boot=50).law
    other = compare(gap, b, {}, b_ref=10 * B_REF, n_boot=50).law
    assert other.alpha == pytest.approx(one.alpha)
    assert other.a == pytest.approx(one.a * 10**one.alpha)


def test_law_beats_an_unrelated_linear_predictor():
    b, gap, latency = synthetic()
    result = compare(gap, b, {"Latency": ("wan_latency_ms", latency)}, n_boot=500)
    scores = {s.name: s for s in result.scores}
    assert set(scores) == {LAW, "Linear-Latency"}
    law, lat = scores[LAW], scores["Linear-Latency"]
    assert law.cv_rmse < lat.cv_rmse and law.r2 > lat.r2
    assert lat.pr_law_better > 0.95 and law.pr_law_better is None
    assert law.ci[0] <= law.boot_mean <= law.ci[1]


def test_cv_and_bootstrap_are_deterministic_given_the_seed():
    b, gap, latency = synthetic(n=30, noise=0.3)
    preds = {"Latency": ("wan_latency_ms", latency), "Bytes": ("cross_boundary_bytes", b * 3 + latency)}
    first = compare(gap, b, preds, seed=7, n_boot=300)
    assert compare(gap, b, preds, seed=7, n_boot=300) == first
    other = compare(gap, b, preds, seed=8, n_boot=300)
    assert other.law.a_ci != first.law.a_ci
    assert [s.name for s in first.scores][-1] == "Multivariate linear (all 2)"


def test_kfold_predicts_every_row_out_of_fold():
    x = np.arange(10.0)
    y = 3 * x + 1

    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        assert not set(train) & set(test)
        slope, icpt = np.polyfit(x[train], y[train], 1)
        return slope * x[test] + icpt

    pred = kfold_predictions(fit_predict, 10, 5, np.random.default_rng(0))
    np.testing.assert_allclose(pred, y)


def _rows(**cols: list) -> list[dict[str, str]]:
    n = len(next(iter(cols.values())))
    return [{k: str(v[i]) for k, v in cols.items()} for i in range(n)]


def test_loss_gaps_definitions():
    rows = _rows(
        end_val_loss=[3.0, 3.3, 3.6, 3.1],
        wan_latency_ms=[0, 100, 200, 0.0],
        partition=["iid", "iid", "dirichlet", "dirichlet"],
        ref=[3.0, 3.0, 3.5, 3.0],
        gap=[0.0, 0.1, 0.2, 0.3],
    )
    best = loss_gaps(rows, "r.csv")
    np.testing.assert_allclose(best.gap, [0.0, 0.3, 0.6, 0.1])
    assert best.baseline_rows.tolist() == [True, False, False, False]
    where = loss_gaps(rows, "r.csv", where=["wan_latency_ms=0"], relative=True)
    np.testing.assert_allclose(where.gap, np.array([-0.05, 0.25, 0.55, 0.05]) / 3.05)
    assert where.baseline_rows.tolist() == [True, False, False, True]
    both = loss_gaps(rows, "r.csv", where=["wan_latency_ms=0", "partition=iid"])
    assert both.baseline_rows.tolist() == [True, False, False, False]
    np.testing.assert_allclose(loss_gaps(rows, "r.csv", baseline_col="ref").gap, [0.0, 0.3, 0.1, 0.1])
    np.testing.assert_allclose(loss_gaps(rows, "r.csv", gap_col="gap").gap, [0.0, 0.1, 0.2, 0.3])
    use, notes = usable_rows(best, np.array([1.0, 2.0, 0.0, 3.0]), {})
    assert use.tolist() == [False, True, False, True] and len(notes) == 2


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"where": ["wan_latency_ms=7"]}, "no row"),
        ({"where": ["latency"]}, "COLUMN=VALUE"),
        ({"where": ["nope=1"]}, "no column 'nope'"),
        ({"loss_col": "val"}, "no column 'val'"),
        ({"where": ["wan_latency_ms=0"], "gap_col": "end_val_loss"}, "at most one"),
    ],
)
def test_loss_gap_errors_name_the_problem(kwargs, words):
    rows = _rows(end_val_loss=[3.0, 3.3], wan_latency_ms=[0, 100])
    with pytest.raises(UserError, match=words):
        loss_gaps(rows, "r.csv", **kwargs)


def _write_csv(path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_cli_prints_the_comparison_table_and_plots(tmp_path, capsys):
    b, gap, latency = synthetic(n=40)
    rng = np.random.default_rng(3)
    rows = [
        {
            "end_val_loss": 3.0 + g,
            "b_eff": bb,
            "wan_latency_ms": lat,
            "boundaries": int(rng.integers(2, 5)),
            "noniid_severity": rng.choice([0.0, 2.0, 10.0]),
            "cross_boundary_bytes": int(1e6 + 10 * bb),
        }
        for bb, g, lat in zip(b, gap, latency, strict=True)
    ]
    rows.append({**rows[0], "end_val_loss": 3.0, "b_eff": 0.0})  # the zero-divergence baseline
    path = tmp_path / "results.csv"
    _write_csv(path, rows)
    png = tmp_path / "law.png"
    code = main(["law", "fit", str(path), "--bootstrap", "200", "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    for words in (LAW, "Linear-Latency", "Linear-Boundary count", "Linear-Non-IID", "Linear-Bytes", "all 4"):
        assert words in out
    assert "1 baseline row(s) left out" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read_results(path)) == 41


def test_cli_errors_exit_2(tmp_path, capsys):
    path = tmp_path / "results.csv"
    _write_csv(path, [{"end_val_loss": 3.0, "b_eff": 1.0}, {"end_val_loss": 3.1, "b_eff": 2.0}])
    assert main(["law", "fit", str(path)]) == 2
    assert "at least 4 usable rows" in capsys.readouterr().err
    assert main(["law", "fit", str(path), "--b-col", "beff"]) == 2
    err = capsys.readouterr().err
    assert "results.csv" in err and "no column 'beff'" in err and "Traceback" not in err
    assert main(["law", "fit", str(tmp_path / "missing.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_b_ref_defaults_to_a_fixed_reference_whatever_the_rows():
    b, gap, _ = synthetic()
    first = compare(gap, b, {}, n_boot=20).law
    other = compare(gap[:40], 3 * b[:40], {}, n_boot=20).law
    assert first.b_ref == other.b_ref == 1.0  # not a statistic of the fitted rows
