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
        elif e["type"] == "finite_number":
            msg = "must be a finite number, not .inf or .nan"
        problems.append((_field_path(tuple(e["loc"])), msg))
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so a second `seed:` would quietly win over the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[object, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys a `<<` merge brings in may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it itself
            if earlier is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first at line {earlier.line + 1}); keep only one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> object:
    """Parse a YAML file safely; a missing file, a syntax error or a key given twice in one
    mapping becomes a ConfigError naming the line."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(str(p), [("(file)", "no such file")]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), [("(file)", f"cannot read: {e}")]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
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
