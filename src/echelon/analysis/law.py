"""The candidate effective-divergence law dL = a * B~^alpha, scored against linear baselines.

Definitions (ARCHITECTURE.md §2, paper §8.5 and Table 13):

- B~ = B_eff / B_ref with a fixed B_ref, by default B_REF = 1: B_eff (echelon.planes.coordinator)
  is already dimensionless, the token-weighted mean over synchronisation intervals of (interval
  length in middle steps x scale-free drift), so B~ = 1 is a run that synchronises after every
  middle step at a drift of one update norm (docs/fidelity.md). B_ref only rescales a
  (a' = a * B_ref^-alpha): alpha and every score are unaffected.
- The linear baselines are the paper's Table 13 set: latency, boundary count, non-IID severity
  (1 / Dirichlet alpha, 0 for IID: `noniid_severity` in sweep results) and bytes, alone and all
  four together.
- dL is a row's validation-loss gap to a baseline (see `loss_gaps`), optionally relative.
- The law is fitted by least squares in log-log space, log dL = log a + alpha * log B~, so only
  rows with dL > 0 and B~ > 0 take part. Linear models dL = c0 + c . x are fitted by least squares
  on standardised predictors. Everything is numpy least squares.
- CV RMSE: K-fold with a seeded shuffle; every model is scored on the dL scale (the law's
  prediction is a * B~^alpha), so the numbers are comparable. R^2 is in-sample on the dL scale.
- Bootstrap (seeded): the out-of-fold residuals are resampled, paired across models, giving each
  model's RMSE mean, 95% percentile interval and Pr(law better) = the share of resamples where the
  law's RMSE is lower; rows are resampled and the law refitted for the mean and 95% CI of a, alpha.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echelon.errors import UserError

LAW = "Normalised law"
B_REF = 1.0


# ---------------------------------------------------------------- reading a results table


def read_results(path: str | Path) -> list[dict[str, str]]:
    """The rows of a results CSV (e.g. `echelon sweep`'s results.csv); UserError if unreadable or empty."""
    p = Path(path)
    try:
        with p.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise UserError(f"{p}: no such file; pass the results.csv an `echelon sweep` wrote") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{p}: cannot read it as CSV ({e})") from None
    if not rows:
        raise UserError(f"{p}: no data rows; run the sweep first (`echelon sweep SWEEP.yaml`)")
    return rows


def column(rows: list[dict[str, str]], name: str, path: str | Path) -> np.ndarray:
    """Column `name` as floats (empty cells are NaN); UserError naming the file, column and row."""
    if name not in rows[0]:
        raise UserError(f"{path}: no column {name!r}; columns are: {', '.join(rows[0])}")
    out = np.empty(len(rows))
    for i, row in enumerate(rows):
        cell = (row.get(name) or "").strip()
        try:
            out[i] = float(cell) if cell else math.nan
        except ValueError:
            raise UserError(f"{path}: row {i + 2}, column {name!r}: {cell!r} is not a number") from None
    return out


def _matches(cell: str, wanted: str) -> bool:
    try:
        return float(cell) == float(wanted)
    except ValueError:
        return cell.strip() == wanted.strip()


@dataclass(frozen=True)
class Gaps:
    """dL per row, which rows are the baseline (left out of the fit), and how dL was defined."""

    gap: np.ndarray
    baseline_rows: np.ndarray
    description: str


def loss_gaps(
    rows: list[dict[str, str]],
    path: str | Path,
    *,
    loss_col: str = "end_val_loss",
    where: list[str] | None = None,
    baseline_col: str | None = None,
    gap_col: str | None = None,
    relative: bool = False,
) -> Gaps:
    """The loss gap dL of every row, by one of four definitions (at most one option given):

    - default: dL = loss - the lowest loss in the table (the best row is the baseline);
    - `where` ["COL=VALUE", ...]: dL = loss - the mean loss of the rows matching every condition
      (e.g. wan_latency_ms=0 and partition=iid: the zero-latency IID baseline); those rows are
      the baseline and are left out of the fit;
    - `baseline_col`: dL = loss - that column, row by row (e.g. a matched reference run's loss);
    - `gap_col`: that column already is dL.
    `relative` divides dL by the baseline loss (not with `gap_col`).
    """
    if sum(x is not None and x != [] for x in (where, baseline_col, gap_col)) > 1:
        raise UserError("give at most one of --baseline-where, --baseline-col, --gap-col")
    none = np.zeros(len(rows), dtype=bool)
    if gap_col is not None:
        if relative:
            raise UserError("--relative needs a baseline loss; it does not apply to --gap-col")
        return Gaps(column(rows, gap_col, path), none, f"dL = column {gap_col!r}")
    loss = column(rows, loss_col, path)
    if baseline_col is not None:
        base = column(rows, baseline_col, path)
        mask, what = none, f"{loss_col} - {baseline_col} (row by row)"
    elif where:
        mask = np.ones(len(rows), dtype=bool)
        for cond in where:
            col, sep, value = cond.partition("=")
            if not sep or not col:
                raise UserError(f"--baseline-where {cond!r}: write COLUMN=VALUE, e.g. wan_latency_ms=0")
            if col not in rows[0]:
                raise UserError(
                    f"{path}: no column {col!r} (in --baseline-where); columns are: {', '.join(rows[0])}"
                )
            mask &= np.array([_matches(r[col], value) for r in rows])
        if not mask.any() or np.isnan(loss[mask]).all():
            raise UserError(f"{path}: no row with a {loss_col} matches --baseline-where {' '.join(where)}")
        base = np.full(len(rows), float(np.nanmean(loss[mask])))
        what = f"{loss_col} - mean {loss_col} of the {int(mask.sum())} rows where {' and '.join(where)}"
    else:
        if np.isnan(loss).all():
            raise UserError(f"{path}: column {loss_col!r} is empty")
        best = int(np.nanargmin(loss))
        mask = np.zeros(len(rows), dtype=bool)
        mask[best] = True
        base = np.full(len(rows), loss[best])
        what = f"{loss_col} - the best row's {loss_col} ({loss[best]:.6g}, row {best + 2})"
    gap = loss - base
    if relative:
        gap = gap / base
        what = f"({what}) / baseline"
    return Gaps(gap, mask, f"dL = {what}")


def usable_rows(
    gaps: Gaps, b_eff: np.ndarray, predictors: dict[str, tuple[str, np.ndarray]]
) -> tuple[np.ndarray, list[str]]:
    """Rows the fit can use (not baseline, dL > 0, B_eff > 0, predictors known) and why others are out."""
    use = ~gaps.baseline_rows
    notes = []
    if gaps.baseline_rows.any():
        notes.append(f"{int(gaps.baseline_rows.sum())} baseline row(s) left out")
    checks = [
        ("dL is not > 0 (no degradation, or missing loss)", ~(gaps.gap > 0)),
        ("B_eff is not > 0 or missing", ~(b_eff > 0)),
        *((f"{col} is missing", np.isnan(v)) for col, v in predictors.values()),
    ]
    for why, bad in checks:
        dropped = int((use & bad).sum())
        if dropped:
            notes.append(f"{dropped} row(s) left out: {why}")
        use &= ~bad
    return use, notes


# ---------------------------------------------------------------- fitting and scoring


def _lstsq(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(design, y, rcond=None)[0]


def fit_power_law(b_norm: np.ndarray, gap: np.ndarray) -> tuple[float, float]:
    """(a, alpha) of gap = a * b_norm^alpha by least squares in log-log space (all values > 0)."""
    x, y = np.log(b_norm), np.log(gap)
    log_a, alpha = _lstsq(np.column_stack([np.ones_like(x), x]), y)
    return float(math.exp(log_a)), float(alpha)


def _law_fit_predict(b_norm: np.ndarray, gap: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        a, alpha = fit_power_law(b_norm[train], gap[train])
        return a * b_norm[test] ** alpha

    return fit_predict


def _linear_fit_predict(x: np.ndarray, gap: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """dL = c0 + c . x on predictors standardised with the training rows' mean and spread."""

    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        std[std == 0] = 1.0
        design = np.column_stack([np.ones(len(train)), (x[train] - mean) / std])
        coef = _lstsq(design, gap[train])
        return np.column_stack([np.ones(len(test)), (x[test] - mean) / std]) @ coef

    return fit_predict


def kfold_predictions(
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int, folds: int, rng: np.random.Generator
) -> np.ndarray:
    """Out-of-fold predictions for n rows: each fold is predicted by a fit on the other folds."""
    order = rng.permutation(n)
    pred = np.empty(n)
    for test in np.array_split(order, folds):
        train = np.setdiff1d(order, test)
        pred[test] = fit_predict(train, test)
    return pred


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else math.nan


@dataclass(frozen=True)
class ModelScore:
    """One row of the comparison table; RMSEs are on the dL scale."""

    name: str
    predictors: str
    cv_rmse: float
    r2: float
    boot_mean: float
    ci: tuple[float, float]
    pr_law_better: float | None


@dataclass(frozen=True)
class LawFit:
    """The law's coefficients on all rows, and their row-bootstrap mean and 95% interval."""

    a: float
    alpha: float
    b_ref: float
    r2_log: float
    a_mean: float
    a_ci: tuple[float, float]
    alpha_mean: float
    alpha_ci: tuple[float, float]
    resamples: int


@dataclass(frozen=True)
class Comparison:
    law: LawFit
    scores: list[ModelScore]
    rows: int
    folds: int


def _ci(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def compare(
    gap: np.ndarray,
    b_eff: np.ndarray,
    predictors: dict[str, tuple[str, np.ndarray]],
    *,
    b_ref: float = B_REF,
    folds: int = 5,
    n_boot: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Fit the law and the linear models on the given rows and score them (see the module doc).

    `predictors` maps a model name (e.g. "Latency") to (its column name, its values); each gives
    a single-predictor linear model, and all of them together a multivariate one (two or more).
    All inputs must be finite with gap > 0 and b_eff > 0; at least 4 rows.
    """
    n = len(gap)
    if n < 4:
        raise UserError(f"the law fit needs at least 4 usable rows (got {n}); widen the sweep")
    if np.unique(b_eff).size < 2:
        raise UserError("B_eff is the same in every usable row: the law needs rows with different B_eff")
    b_norm = b_eff / b_ref
    folds = max(2, min(folds, n))
    rng = np.random.default_rng(seed)

    models: list[tuple[str, str, Callable[[np.ndarray, np.ndarray], np.ndarray]]] = [
        (LAW, "B~ = B_eff / B_ref", _law_fit_predict(b_norm, gap))
    ]
    for name, (col, values) in predictors.items():
        models.append((f"Linear-{name}", col, _linear_fit_predict(values[:, None], gap)))
    if len(predictors) >= 2:
        stacked = np.column_stack([v for _, v in predictors.values()])
        models.append(
            (f"Multivariate linear (all {len(predictors)})", "all above", _linear_fit_predict(stacked, gap))
        )

    everything = np.arange(n)
    residuals = {name: gap - kfold_predictions(fp, n, folds, rng) for name, _, fp in models}
    boot_idx = rng.integers(0, n, size=(n_boot, n))
    boot_rmse = {name: np.sqrt((res[boot_idx] ** 2).mean(axis=1)) for name, res in residuals.items()}
    scores = []
    for name, label, fp in models:
        res, boot = residuals[name], boot_rmse[name]
        scores.append(
            ModelScore(
                name=name,
                predictors=label,
                cv_rmse=float(np.sqrt((res**2).mean())),
                r2=_r2(gap, fp(everything, everything)),
                boot_mean=float(boot.mean()),
                ci=_ci(boot),
                pr_law_better=None if name == LAW else float((boot_rmse[LAW] < boot).mean()),
            )
        )

    a, alpha = fit_power_law(b_norm, gap)
    log_pred = math.log(a) + alpha * np.log(b_norm)
    coef = []
    for idx in rng.integers(0, n, size=(n_boot, n)):
        if np.unique(b_norm[idx]).size >= 2:
            coef.append(fit_power_law(b_norm[idx], gap[idx]))
    boot = np.array(coef)
    law = LawFit(
        a=a,
        alpha=alpha,
        b_ref=b_ref,
        r2_log=_r2(np.log(gap), log_pred),
        a_mean=float(boot[:, 0].mean()),
        a_ci=_ci(boot[:, 0]),
        alpha_mean=float(boot[:, 1].mean()),
        alpha_ci=_ci(boot[:, 1]),
        resamples=len(boot),
    )
    return Comparison(law=law, scores=scores, rows=n, folds=folds)
