"""`echelon redteam RUN`: attack a finished run from the global coordinator's seat (paper §8.6).

The attacks use only what crossed to the global plane, checked message by message against the
run's signed audit log, and are scored against the simulator's private ground truth. A run
trained with the recordings (`echelon.runner.train(..., observer=Recorder(...))`, as benchmarks/redteam.py
does) is attacked as it is; any other simulated run is replayed first from its config.yaml (the
simulation is bit-for-bit deterministic, and the audit check proves the replay is the same run).
See echelon.analysis.redteam for the attacks and their success metrics.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from echelon.cliargs import count, real


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("run", type=Path, help="a finished run directory (echelon train --out DIR)")
    parser.add_argument(
        "--threshold", type=real(0, 1), default=0.9, help="an attempt succeeds at this score (default: 0.9)"
    )
    parser.add_argument(
        "--sc-k",
        type=count(),
        default=1,
        help="small cohort: aggregates of at most k device rounds (default: 1)",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from echelon.analysis import redteam
    from echelon.audit.verify import verify_run
    from echelon.config import load_run
    from echelon.errors import UserError
    from echelon.runner import train
    from echelon.strategies import effective_config

    run_dir: Path = args.run
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "summary.json").is_file():
        raise UserError(f"{run_dir} is not a finished run directory (no config.yaml or summary.json)")
    report = verify_run(run_dir)
    if report.violations:
        raise UserError(
            f"{run_dir}: the audit logs do not verify ({len(report.violations)} findings; see `echelon audit "
            f"{run_dir}`): the red-team attacks only an audited view"
        )
    cfg = load_run(run_dir / "config.yaml")
    console = Console(width=max(Console().width, 240))
    if (run_dir / redteam.VIEW_FILE).is_file() and (run_dir / redteam.TRUTH_FILE).is_file():
        view, truth = redteam.load_recordings(run_dir)
        checked = redteam.check_view_against_audit(view, run_dir)
        how = "each matched to the global audit log"
    else:
        console.print(f"{run_dir} has no recordings: replaying it from its config.yaml", highlight=False)
        with tempfile.TemporaryDirectory() as tmp:
            replay = Path(tmp) / "replay"
            train(cfg, replay, progress=False, observer=redteam.Recorder(effective_config(cfg)))
            view, truth = redteam.load_recordings(replay)
            checked = redteam.check_view_against_audit(view, replay)
            redteam.check_same_crossings(run_dir, replay)
        how = "replayed: each matched to the replay's audit log, whose crossings are the run's"
    console.print(f"coordinator's view: {checked} messages, {how}", highlight=False)
    result = redteam.attack(effective_config(cfg), view, truth, threshold=args.threshold, sc_k=args.sc_k)
    console.print(redteam.table14([(cfg.name, effective_config(cfg), result)]))
    return 0
