"""Bad run files are refused with the file, the field and the problem; exit 2; no traceback."""

from __future__ import annotations

import pytest
import yaml

from echelon.cli import main
from echelon.errors import ConfigError
from echelon.yamlio import read_yaml
from tests.helpers import small_run


def _run(tmp_path, capsys, text: str) -> tuple[int, str]:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code = main(["train", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    return code, err


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda c: c["echelon"].update(buffer_size=0), "echelon.buffer_size", "greater than or equal to 1"),
        (lambda c: c["echelon"].update(bufer_size=2), "echelon.bufer_size", "unknown field"),
        (
            lambda c: c["boundaries"][0]["devices"][0].pop("tokens_per_s"),
            "boundaries[0].devices[0].tokens_per_s",
            "missing",
        ),
        (lambda c: c["boundaries"][1]["devices"][0].update(id="d0"), "(top level)", "used twice"),
        (lambda c: c.update(budget={}), "budget", "at least one"),
        (lambda c: c["data"].update(source="jsonl"), "data", "needs `path`"),
        (
            lambda c: c["model"].update(path="/nonexistent", preset="tiny"),
            "model",
            "either `preset` or `path`",
        ),
        (lambda c: c["echelon"]["sync"].update(h_min=50, h_max=10), "echelon.sync", "must not exceed"),
    ],
)
def test_invalid_field_names_file_field_and_problem(tmp_path, capsys, mutate, field, words):
    cfg = small_run()
    mutate(cfg)
    code, err = _run(tmp_path, capsys, yaml.safe_dump(cfg))
    assert code == 2
    assert "bad.yaml" in err and field in err and words in err


def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, "name: x\nboundaries: [\n  - id: b0\n")
    assert code == 2 and "not valid YAML" in err and "line" in err


def test_missing_file(tmp_path, capsys):
    code = main(["train", str(tmp_path / "nope.yaml"), "--no-progress"])
    assert code == 2 and "no such file" in capsys.readouterr().err


def test_model_path_that_is_not_a_checkpoint(tmp_path, capsys):
    cfg = small_run(model={"path": str(tmp_path), "preset": None})
    code, err = _run(tmp_path, capsys, yaml.safe_dump(cfg))
    assert code == 2 and "model.path" in err and "config.json" in err


def test_jsonl_line_without_text_field_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello world"}\n{"body": "no text field"}\n')
    cfg = small_run(data={"source": "jsonl", "path": str(data), "max_documents": None})
    code, err = _run(tmp_path, capsys, yaml.safe_dump(cfg))
    assert code == 2 and "data.jsonl:2" in err and "'text'" in err


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c["train"].update(lr=float("inf")), "train.lr"),
        (lambda c: c["train"].update(lr=float("nan")), "train.lr"),
        (lambda c: c["model"]["lora"].update(alpha=float("inf")), "model.lora.alpha"),
        (lambda c: c.update(network={"wan": {"latency_ms": float("inf")}}), "network.wan.latency_ms"),
        (lambda c: c.update(network={"wan": {"bandwidth_mbps": float("inf")}}), "network.wan.bandwidth_mbps"),
        (lambda c: c["echelon"].update(buffer_timeout_s=float("inf")), "echelon.buffer_timeout_s"),
        (
            lambda c: c["boundaries"][0]["devices"][0].update(tokens_per_s=float("inf")),
            "boundaries[0].devices[0].tokens_per_s",
        ),
        (lambda c: c["data"]["partition"].update(alpha=float("inf")), "data.partition.alpha"),
    ],
)
def test_a_non_finite_float_is_refused_naming_the_field(tmp_path, capsys, mutate, field):
    cfg = small_run()
    mutate(cfg)
    code, err = _run(tmp_path, capsys, yaml.safe_dump(cfg))  # YAML's .inf and .nan
    assert code == 2
    assert "bad.yaml" in err and f"{field}: must be a finite number" in err


def test_a_key_given_twice_is_refused_naming_the_key_and_its_line(tmp_path, capsys):
    text = yaml.safe_dump(small_run(), sort_keys=False).replace("seed: 0\n", "seed: 0\nseed: 5\n")
    line = text.splitlines().index("seed: 5") + 1
    code, err = _run(tmp_path, capsys, text)
    assert code == 2
    assert "bad.yaml" in err and f"line {line}" in err and "key 'seed' is given twice" in err


def test_a_key_given_twice_in_a_nested_or_flow_mapping_is_refused(tmp_path):
    path = tmp_path / "f.yaml"
    for text in ("a: {x: 1, x: 2}\n", "a:\n  b:\n    x: 1\n    x: 2\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="key 'x' is given twice"):
            read_yaml(path)


def test_a_merge_key_may_still_be_overridden(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  x: 3\n")
    assert read_yaml(path) == {"base": {"x": 1, "y": 2}, "run": {"x": 3, "y": 2}}
