"""`echelon law fit RESULTS.csv`: fit dL = a * B~^alpha and compare it with linear predictors.

The loss gap dL defaults to each row's end_val_loss minus the table's best end_val_loss (that
row is the baseline); --baseline-where picks baseline rows (e.g. zero latency, IID), and
--baseline-col / --gap-col take the reference from a column. See `echelon.analysis.law`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from echelon.cliargs import MAX_SEED, count, real, whole

if TYPE_CHECKING:
    from echelon.analysis.law import Comparison


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="law_command", metavar="ACTION", required=True)
    fit = sub.add_parser("fit", help="fit the effective-divergence law to a results table (CSV)")
    fit.add_argument("results", type=Path, help="results CSV, e.g. an `echelon sweep` DIR/results.csv")
    fit.add_argument(
        "--loss-col", default="end_val_loss", help="validation loss column (default: end_val_loss)"
    )
    base = fit.add_mutually_exclusive_group()
    base.add_argument(
        "--baseline-where",
        action="append",
        metavar="COL=VALUE",
        help="baseline = mean loss of the rows matching every COL=VALUE (repeat the flag: "
        "--baseline-where wan_latency_ms=0 --baseline-where partition=iid); default: the lowest-loss row",
    )
    base.add_argument("--baseline-col", metavar="COL", help="baseline loss per row, from this column")
    base.add_argument("--gap-col", metavar="COL", help="this column already holds dL")
    fit.add_argument("--relative", action="store_true", help="dL as a fraction of the baseline loss")
    fit.add_argument("--b-col", default="b_eff", help="effective divergence budget column (default: b_eff)")
    fit.add_argument("--b-ref", type=real(0), default=1.0, help="B_ref for B~ = B_eff/B_ref (default: 1)")
    fit.add_argument("--latency-col", default="wan_latency_ms", help="WAN latency (default: wan_latency_ms)")
    fit.add_argument("--boundaries-col", default="boundaries", help="boundary count (default: boundaries)")
    fit.add_argument(
        "--noniid-col",
        default="noniid_severity",
        help="non-IID severity (default: noniid_severity = 1/Dirichlet alpha, 0 for IID)",
    )
    fit.add_argument(
        "--bytes-col",
        default="cross_boundary_bytes",
        help="cross-boundary bytes (default: cross_boundary_bytes)",
    )
    fit.add_argument(
        "--folds", type=whole(2, 1000), default=5, help="K of the K-fold cross-validation (default: 5)"
    )
    fit.add_argument(
        "--bootstrap", type=count(10**6), default=2000, help="bootstrap resamples (default: 2000)"
    )
    fit.add_argument("--seed", type=whole(0, MAX_SEED), default=0, help="seed of the folds and the bootstrap")
    fit.add_argument(
        "--plot", type=Path, default=None, metavar="PNG", help="also plot dL against B~ (log-log)"
    )


def run(args: argparse.Namespace) -> int:
    from echelon.analysis import law

    rows = law.read_results(args.results)
    gaps = law.loss_gaps(
        rows,
        args.results,
        loss_col=args.loss_col,
        where=args.baseline_where,
        baseline_col=args.baseline_col,
        gap_col=args.gap_col,
        relative=args.relative,
    )
    b_eff = law.column(rows, args.b_col, args.results)
    console = Console()
    predictors = {}
    named = [
        ("Latency", args.latency_col),
        ("Boundary count", args.boundaries_col),
        ("Non-IID", args.noniid_col),
        ("Bytes", args.bytes_col),
    ]
    notes = []
    for name, col in named:
        if col in rows[0]:
            predictors[name] = (col, law.column(rows, col, args.results))
        else:
            notes.append(f"no column {col!r}: Linear-{name} left out")
    use, dropped = law.usable_rows(gaps, b_eff, predictors)
    result = law.compare(
        gaps.gap[use],
        b_eff[use],
        {name: (col, v[use]) for name, (col, v) in predictors.items()},
        b_ref=args.b_ref,
        folds=args.folds,
        n_boot=args.bootstrap,
        seed=args.seed,
    )
    print_comparison(console, result, gaps.description, [*notes, *dropped])
    if args.plot is not None:
        from echelon.analysis.plots import plot_law

        fit = result.law
        b_norm = b_eff[use] / fit.b_ref
        plot_law(b_norm.tolist(), gaps.gap[use].tolist(), fit.a, fit.alpha, args.plot)
        console.print(f"plot: {args.plot}", highlight=False)
    return 0


def print_comparison(console: Console, result: Comparison, gap_description: str, notes: list[str]) -> None:
    """The law's coefficients, then the model table (in the spirit of the paper's Table 13)."""
    fit = result.law
    console.print(gap_description, highlight=False)
    for note in notes:
        console.print(f"  {note}", highlight=False)
    console.print(
        f"{result.rows} rows, {result.folds}-fold CV. Law: dL = a * (B_eff / {fit.b_ref:.6g})^alpha with "
        f"a = {fit.a:.4g} (bootstrap {fit.a_mean:.4g}, 95% CI [{fit.a_ci[0]:.4g}, {fit.a_ci[1]:.4g}]), "
        f"alpha = {fit.alpha:.4f} (bootstrap {fit.alpha_mean:.4f}, 95% CI "
        f"[{fit.alpha_ci[0]:.4f}, {fit.alpha_ci[1]:.4f}]), log-log R^2 = {fit.r2_log:.3f}",
        highlight=False,
    )
    table = Table(title="Effective-divergence law against linear predictors (cf. paper Table 13)")
    for col in ("Model", "Predictors", "CV RMSE", "R^2", "Bootstrap mean", "95% CI", "Pr(law better)"):
        table.add_column(
            col, justify="left" if col in ("Model", "Predictors") else "right", no_wrap=col == "Model"
        )
    for s in result.scores:
        table.add_row(
            s.name,
            s.predictors,
            f"{s.cv_rmse:.4g}",
            f"{s.r2:.3f}",
            f"{s.boot_mean:.4g}",
            f"[{s.ci[0]:.4g}, {s.ci[1]:.4g}]",
            "—" if s.pr_law_better is None else f"{100 * s.pr_law_better:.1f}%",
        )
    console.print(table)
