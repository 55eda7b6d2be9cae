"""`echelon report RUN`: plots and report.md written into RUN/report/, atomically.

The report is built in RUN/.report.partial/ and renamed into place; a previous RUN/report/ is
replaced only once the new one is complete. Nothing else in the run directory is touched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from echelon.analysis import markdown, plots
from echelon.analysis.rundata import audit_byte_trace, load_run_dir
from echelon.errors import UserError

REPORT_DIR = "report"


def write_report(run_dir: str | Path, target: float | None = None) -> Path:
    """Write RUN/report/{loss,controller,bytes}.png and report.md; returns the report directory.

    controller.png is left out when the run recorded no controller ticks. `target` (a validation
    loss) adds time-to-target to the summary and a reference line to the loss plot.
    """
    run = load_run_dir(run_dir)
    trace = audit_byte_trace(run.path)
    final = run.path / REPORT_DIR
    staging = run.path / f".{REPORT_DIR}.partial"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        images = {"loss": "loss.png", "bytes": "bytes.png"}
        plots.plot_loss(run, staging / images["loss"], target)
        plots.plot_bytes(run, trace, staging / images["bytes"])
        if run.controller:
            images["controller"] = "controller.png"
            plots.plot_controller(run, staging / images["controller"])
        (staging / "report.md").write_text(markdown.render(run, trace, images, target))
        old = run.path / f".{REPORT_DIR}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write the report into {final}: {e}") from None
    return final
