"""The command line's own surface: version, log level, a description for every command."""

from __future__ import annotations

import pytest

import echelon
from echelon.cli import COMMANDS, build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"echelon {echelon.__version__}"


def test_every_command_has_a_description():
    _, subparsers = build_parser()
    assert set(subparsers) == set(COMMANDS)
    for name, parser in subparsers.items():
        assert parser.description and name in parser.description


def test_log_level_defaults_to_echelon_log_and_a_bad_one_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("ECHELON_LOG", "warning")
    parser, _ = build_parser()
    assert parser.parse_args([]).log_level == "WARNING"
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--log-level", "chatty"])
    assert done.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
