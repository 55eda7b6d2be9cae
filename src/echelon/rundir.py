"""Run directories that are never half-written and never silently overwritten, and the
checkpoints a run writes into them as it goes.

A run is built in `<dir>.partial/` and renamed to `<dir>` only when it completed. An existing
`<dir>` is refused unless the caller forces its replacement; an interrupted run leaves only the
clearly marked `.partial` directory, which the next run of the same name replaces (or continues,
for a deployment resumed with `echelon launch --resume`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from echelon.errors import UserError

log = logging.getLogger("echelon.run")


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
        except OSError as e:
            raise UserError(f"cannot write the run directory {self.staging}: {e.strerror or e}") from None

    @classmethod
    def resume(cls, path: str | Path) -> RunDirectory:
        """Continue filling the `.partial` directory an interrupted run left (it must exist)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.staging = self.path.with_name(self.path.name + ".partial")
        if not self.staging.is_dir():
            raise UserError(f"{self.staging} does not exist: there is no interrupted run to continue")
        return self

    def __truediv__(self, name: str) -> Path:
        return self.staging / name

    def write_json(self, name: str, obj: object) -> None:
        write_atomic(self.staging / name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_yaml(self, name: str, obj: object) -> None:
        write_atomic(self.staging / name, yaml.safe_dump(obj, sort_keys=False))

    def commit(self) -> Path:
        """Move the finished run into place (replacing an old one only when forced)."""
        if self.path.exists():
            trash = self.path.with_name(self.path.name + ".replaced")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.path, trash)
            shutil.rmtree(trash)
        os.replace(self.staging, self.path)
        return self.path


def checkpoint_path(run_dir: Path, party: str) -> Path:
    """Where `party`'s plane is checkpointed in `run_dir`."""
    return run_dir / "checkpoints" / f"{party}.pt"


def save_checkpoint(path: Path, state: dict) -> bool:
    """Write the state dict `state` (tensors and plain values) to `path` atomically; False (logged,
    the last good checkpoint kept) when writing fails, e.g. on a full disk."""
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        kept = "the last good checkpoint stays" if path.exists() else "no checkpoint yet"
        log.error("could not write the checkpoint %s (%s); %s", path, getattr(e, "strerror", None) or e, kept)
        return False
    return True


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `save_checkpoint`, loaded with `torch.load(weights_only=True)`: no
    pickled object is ever executed. UserError when missing or unreadable."""
    import torch

    if not path.is_file():
        raise UserError(f"cannot resume: {path} does not exist (start without --resume)")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a torn or foreign file: torch raises several kinds
        raise UserError(f"cannot resume from {path}: not a readable checkpoint ({e})") from None
