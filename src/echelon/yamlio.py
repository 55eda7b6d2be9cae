"""Load YAML files into pydantic models, turning every failure into a ConfigError.

A ConfigError names the file, the dotted field path and the problem, so the user can fix it
without reading a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from echelon.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validation_problems(err: ValidationError) -> list[tuple[str, str]]:
    """(field path, message) pairs from a pydantic ValidationError, in a user's words."""
    problems = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see examples/)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        problems.append((_field_path(tuple(e["loc"])), msg))
    return problems


def read_yaml(path: str | Path) -> object:
    """Parse a YAML file; a missing file or a syntax error becomes a ConfigError."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(str(p), [("(file)", "no such file")]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), [("(file)", f"cannot read: {e}")]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(
            str(p), [("(syntax)", f"not valid YAML{where}: {getattr(e, 'problem', e)}")]
        ) from None


def load_model(path: str | Path, model: type[M], *, context: dict | None = None) -> M:
    """Read `path` and validate it as `model`; raise ConfigError naming file and fields."""
    data = read_yaml(path)
    if data is None:
        raise ConfigError(str(path), [("(file)", "the file is empty")])
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("(top level)", "expected a mapping of fields")])
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError(str(path), validation_problems(e)) from None
