"""Run directories that are never half-written and never silently overwritten.

A run is built in `<dir>.partial/` and renamed to `<dir>` only when it completed. An existing
`<dir>` is refused unless the caller forces its replacement; an interrupted run leaves only the
clearly marked `.partial` directory, which the next run of the same name replaces (or continues,
for a deployment resumed with `echelon launch --resume`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from echelon.errors import UserError


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDirectory:
    def __init__(self, path: str | Path, force: bool = False, resume: bool = False) -> None:
        """Stage the run at `path` in `<path>.partial/` (replaced, or kept with `resume`); UserError
        naming the path when it exists (without `force`), is not a directory or cannot be written."""
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} exists and is not a directory; choose another --out")
        if self.path.exists() and not force:
            raise UserError(
                f"run directory {self.path} already exists; pass --force to replace it, or choose --out"
            )
        self.staging = self.path.with_name(self.path.name + ".partial")
        if resume and not self.staging.is_dir():
            raise UserError(f"cannot resume: there is no interrupted run at {self.staging}")
        try:
            if not resume and self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir(parents=True, exist_ok=resume)
            self._metrics = (self.staging / "metrics.jsonl").open("a")
        except OSError as e:
            raise UserError(f"cannot write the run directory {self.staging}: {e.strerror or e}") from None

    def __truediv__(self, name: str) -> Path:
        return self.staging / name

    def write_json(self, name: str, obj: object) -> None:
        write_atomic(self.staging / name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_yaml(self, name: str, obj: object) -> None:
        write_atomic(self.staging / name, yaml.safe_dump(obj, sort_keys=False))

    def metric(self, record: dict) -> None:
        """Append one record to metrics.jsonl (one line, flushed)."""
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
        self._metrics.flush()

    def commit(self) -> Path:
        """Move the finished run into place (replacing an old one only when forced)."""
        self._metrics.close()
        if self.path.exists():
            trash = self.path.with_name(self.path.name + ".replaced")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.path, trash)
            shutil.rmtree(trash)
        os.replace(self.staging, self.path)
        return self.path

    def abandon(self) -> None:
        """Close files after a failure; the `.partial` directory stays for inspection."""
        self._metrics.close()
