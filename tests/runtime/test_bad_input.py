"""Bad run files and CLI misuse get a clear error before any work starts: exit 2, the file, the
field and the fix, no traceback, and nothing half-written (no `.partial`, no certificates)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

from echelon.cli import main
from echelon.config import RunConfig
from echelon.preflight import artefact_bytes, model_shape, preflight
from tests.helpers import small_run


def _run_file(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_run(**overrides)))
    return path


def _fails(argv: list[str], capsys, *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in " ".join(err.split()), err
    return err


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"seed": 10**30}, "seed", "less than or equal to"),
        ({"data": {**small_run()["data"], "seq_len": 8192}}, "data.seq_len", "at most 512"),
        (
            {"model": {**small_run()["model"], "lora": {"r": 100_000, "alpha": 8, "dropout": 0.0}}},
            "model.lora.r",
            "at most 256",
        ),
        (
            {"train": {**small_run()["train"], "inner_steps": 10**12}, "budget": {"tokens": 100_000}},
            "train.inner_steps",
            "at most",
        ),
        ({"data": {"source": "jsonl", "path": "nowhere.jsonl"}}, "data.path", "is not a file"),
        ({"model": {"preset": None, "path": "no-such-model"}}, "model.path", "no config.json"),
        ({"train": {**small_run()["train"], "lr": float("inf")}}, "train.lr", "must be a finite number"),
    ],
)
@pytest.mark.parametrize("command", ["train", "launch"])
def test_a_bad_run_file_is_refused_before_anything_is_written(
    tmp_path, capsys, overrides, field, hint, command
):
    run_file = _run_file(tmp_path, **overrides)
    out = tmp_path / "out"
    _fails([command, str(run_file), "--out", str(out), "--no-progress"], capsys, str(run_file), field, hint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # no .partial, no keys


def test_a_deployment_refuses_a_non_admissible_strategy_naming_the_run_file(tmp_path, capsys):
    run_file = _run_file(tmp_path, strategy="fedavg")
    out = tmp_path / "out"
    _fails(
        ["launch", str(run_file), "--out", str(out), "--no-progress"], capsys, str(run_file), "not admissible"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_a_deployment_refuses_only_a_device_joining_as_a_boundary_of_its_own(tmp_path, capsys):
    joiner = {"id": "d9", "tokens_per_s": 1000.0}
    churn = {
        "mean_uptime_s": 5,
        "cycling_fraction": 0.5,
        "joins": [{"at_s": 1, "boundary": "b0", "device": joiner}],
        "departures": [{"at_s": 2, "device": "d0"}],
        "outages": [{"boundary": "b1", "at_s": 3, "duration_s": 2}],
    }
    preflight(
        RunConfig.model_validate(small_run(churn=churn)), "run.yaml", None, deploy=True
    )  # all of it runs
    alone = {**churn, "joins": [{"at_s": 1, "boundary": "d9", "device": joiner}]}
    run_file = _run_file(tmp_path, churn=alone)
    out = tmp_path / "out"
    argv = ["launch", str(run_file), "--out", str(out), "--no-progress"]
    _fails(argv, capsys, str(run_file), "churn.joins[0].boundary", "'d9' is no boundary of the run", "b0, b1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_out_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    run_file = _run_file(tmp_path)
    _fails(["launch", str(run_file), "--out", str(locked / "run"), "--no-progress"], capsys, "not writable")


@pytest.mark.parametrize("command", ["train", "launch"])
def test_an_out_below_a_file_is_refused(tmp_path, capsys, command):
    blocker = tmp_path / "file"
    blocker.write_text("")
    run_file = _run_file(tmp_path)
    _fails(
        [command, str(run_file), "--out", str(blocker / "run"), "--no-progress"], capsys, "is not a directory"
    )
    assert not (tmp_path / "file.partial").exists()


def test_too_little_disk_for_the_checkpoints_and_the_model_is_refused_with_the_numbers(
    monkeypatch, tmp_path, capsys
):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=3 << 20))  # a 3 MiB filesystem
    run_file = _run_file(tmp_path)
    _fails(
        ["train", str(run_file), "--out", str(tmp_path / "out"), "--no-progress"],
        capsys,
        "--out",
        "MiB for checkpoints and the final model",
        "3 MiB free",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


@pytest.mark.slow
def test_the_disk_estimate_covers_what_a_run_writes(tmp_path):
    cfg = RunConfig.model_validate(small_run(budget={"outer_steps": 1}))
    from echelon.runner import train

    train(cfg, tmp_path / "run", progress=False)
    written = sum(p.stat().st_size for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert artefact_bytes(cfg, model_shape(cfg)) >= written


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--threads", "-1"], "--threads: must be from 1 to 1,024, got -1"),
        (["--threads", "0"], "--threads: must be from 1 to 1,024, got 0"),
        (["--threads", "99999999999"], "--threads: must be from 1 to 1,024, got 99,999,999,999"),
    ],
)
def test_launch_flags_are_checked(tmp_path, capsys, argv, expected):
    run_file = _run_file(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["launch", str(run_file), "--out", str(tmp_path / "o"), *argv])
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.fixture
def certs(tmp_path) -> Path:
    from echelon.runtime.grpc.tls import init_certs

    cfg = RunConfig.model_validate(small_run())
    init_certs(tmp_path / "certs", {b.id: [d.id for d in b.devices] for b in cfg.boundaries})
    return tmp_path / "certs"


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, f"127.0.0.1:{s.getsockname()[1]}"


def test_serve_checks_its_flags_before_any_work(tmp_path, capsys, certs):
    run_file = str(_run_file(tmp_path))
    base = ["serve", "--config", run_file, "--certs", str(certs)]
    _fails(
        ["serve", "device", *base[1:], "--id", "nobody", "--boundary", "127.0.0.1:1"],
        capsys,
        "--id 'nobody' is not a device of",
        "devices: d0, d1, d2, d3",
    )
    _fails(
        [
            "serve",
            "boundary",
            *base[1:],
            "--id",
            "zz",
            "--global",
            "127.0.0.1:1",
            "--run-dir",
            str(tmp_path / "r"),
        ],
        capsys,
        "--id 'zz' is not a boundary",
    )
    _fails(
        ["serve", "global", *base[1:], "--listen", "localhost:abc", "--run-dir", str(tmp_path / "r")],
        capsys,
        "--listen 'localhost:abc' is not host:port",
    )
    _fails(
        ["serve", "device", *base[1:], "--id", "d0", "--boundary", "127.0.0.1:99999"],
        capsys,
        "--boundary '127.0.0.1:99999' is not host:port",
    )
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    _fails(
        ["serve", "global", *base[1:], "--run-dir", str(blocker / "run")],
        capsys,
        "--run-dir",
        "cannot create it",
    )
    _fails(
        [
            "serve",
            "device",
            "--config",
            run_file,
            "--certs",
            str(blocker),
            "--id",
            "d0",
            "--boundary",
            "127.0.0.1:1",
        ],
        capsys,
        "is not a directory",
        "echelon certs init",
    )


def test_serve_on_a_busy_port_is_a_clear_error(tmp_path, capsys, certs):
    run_file = str(_run_file(tmp_path))
    sock, busy = _busy_port()
    with sock:
        _fails(
            [
                "serve",
                "global",
                "--config",
                run_file,
                "--certs",
                str(certs),
                "--listen",
                busy,
                "--run-dir",
                str(tmp_path / "r"),
            ],
            capsys,
            f"--listen {busy}: cannot listen there: the port is in use by another process",
        )


def test_certificates_cannot_go_below_a_file(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    run_file = str(_run_file(tmp_path))
    _fails(["certs", "init", run_file, "--out", str(blocker)], capsys, "exists and is not a directory")
    _fails(["certs", "init", run_file, "--out", str(blocker / "certs")], capsys, "cannot write certificates")


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--deploy"],
        ["serve", "device", "--config", "RUN", "--certs", "certs", "--id", "d0", "--boundary", "127.0.0.1:1"],
        ["execute", "plan.json"],
    ],
)
def test_threads_are_bounded_on_every_command_that_takes_them(tmp_path, capsys, argv):
    run_file = str(_run_file(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        main([*(run_file if a == "RUN" else a for a in argv), "--threads", "99999999999"])
    assert exit_.value.code == 2
    assert "--threads: must be from 1 to 1,024, got 99,999,999,999" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag", "value", "problem"),
    [
        (["execute", "plan.json"], "--lr", "nan", "must be a finite number"),
        (["execute", "plan.json"], "--lr", "-1", "must be greater than 0 and at most 10, got -1"),
        (["execute", "plan.json"], "--timeout", "inf", "must be a finite number"),
        (["execute", "plan.json"], "--timeout", "0", "must be greater than 0"),
        (["execute", "plan.json"], "--seed", "-1", "must be from 0 to"),
        (["execute", "plan.json"], "--seed", str(2**64), "must be from 0 to"),
        (["execute", "plan.json"], "--max-restarts", "-3", "must be from 0 to 1,000"),
        (["law", "fit", "r.csv"], "--seed", "-1", "must be from 0 to"),
        (["law", "fit", "r.csv"], "--b-ref", "nan", "must be a finite number"),
        (["law", "fit", "r.csv"], "--folds", "1", "must be from 2 to 1,000"),
        (["law", "fit", "r.csv"], "--bootstrap", "0", "must be from 1 to 1,000,000"),
        (["profile"], "--seconds", "-1", "must be greater than 0 and at most 60"),
        (["profile"], "--seconds", "nan", "must be a finite number"),
        (["profile"], "--ranks", "0", "must be from 1 to 1,024"),
        (["profile", "--model", "tiny"], "--seq-len", "0", "must be from 1 to"),
        (["profile", "--model", "tiny"], "--lora-rank", "-1", "must be from 1 to 4,096"),
        (["profile", "--model", "tiny"], "--micro-batch", "0", "must be from 1 to 4,096"),
        (["redteam", "run"], "--threshold", "1.5", "must be greater than 0 and at most 1"),
        (["redteam", "run"], "--sc-k", "0", "must be at least 1"),
        (["report", "run"], "--target", "nan", "must be a finite number"),
        (["sweep", "sweep.yaml"], "--workers", "0", "must be from 1 to 1,024"),
        (["contest", "contest.yaml"], "--workers", "100000", "must be from 1 to 1,024"),
    ],
)
def test_numeric_flags_are_bounded_before_any_work(tmp_path, monkeypatch, capsys, argv, flag, value, problem):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, f"{flag}={value}"])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and f"argument {flag}: {problem}" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "the path is empty"),
        (".", "does not end in a name"),
        ("x" * 300, "is too long (300 bytes"),
        ("/".join(["x" * 200] * 25), "the path is too long"),
    ],
)
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "RUN", "--no-progress"],
        ["launch", "RUN", "--no-progress"],
        ["demo", "--no-progress"],
        ["certs", "init", "RUN"],
        ["execute", "plan.json"],
        ["profile"],
    ],
)
def test_a_malformed_out_is_refused_naming_the_flag(tmp_path, monkeypatch, capsys, argv, value, problem):
    monkeypatch.chdir(tmp_path)
    run_file = str(_run_file(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        main([*(run_file if a == "RUN" else a for a in argv), "--out", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "argument --out: " in err and problem in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # no .partial, no certificates


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["serve", "global", "--config", "RUN", "--certs", "certs"], "--run-dir"),
        (["sweep", "sweep.yaml"], "--out"),
        (["contest", "contest.yaml"], "--out"),
        (["plan", "fleet.yaml"], "--out"),
    ],
)
@pytest.mark.parametrize(("value", "problem"), [("", "the path is empty"), ("x" * 300, "is too long (300")])
def test_a_malformed_output_directory_is_refused_naming_the_flag(
    tmp_path, monkeypatch, capsys, argv, flag, value, problem
):
    monkeypatch.chdir(tmp_path)
    run_file = str(_run_file(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        main([*(run_file if a == "RUN" else a for a in argv), flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"argument {flag}: " in err and problem in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_certs_init_refuses_what_an_interrupted_init_left_and_fills_an_empty_directory(tmp_path, capsys):
    run_file = str(_run_file(tmp_path))
    out = tmp_path / "certs"
    (out / "global").mkdir(parents=True)
    _fails(["certs", "init", run_file, "--out", str(out)], capsys, f"--out {out} exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["global"]
    (out / "global").rmdir()
    assert main(["certs", "init", run_file, "--out", str(out)]) == 0
    assert (out / "ca.pem").is_file() and (out / "audit-keys.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certs", "run.yaml"]  # no certs.partial


def test_an_interrupted_certs_init_leaves_nothing_half_made(tmp_path, monkeypatch, capsys):
    from echelon.runtime.grpc import tls

    real, made = tls._key, []

    def interrupted_key():  # Ctrl-C while the third key is being made
        made.append(1)
        if len(made) == 3:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(tls, "_key", interrupted_key)
    run_file = str(_run_file(tmp_path))
    assert main(["certs", "init", run_file, "--out", str(tmp_path / "certs")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
