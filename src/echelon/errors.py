"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a file, a field or a flag. The message names what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A run, fleet or sweep file failed validation."""

    def __init__(self, path: str, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = [f"{path}: invalid configuration"]
        lines += [f"  {field}: {problem}" for field, problem in problems]
        super().__init__("\n".join(lines))
