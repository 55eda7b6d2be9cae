"""The public Python API: `import echelon` names a small surface; a script brings its own model,
loss and data (examples/embed.py); run files read Hugging Face datasets from local files."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml

import echelon
from echelon.config import DataConfig
from echelon.train.data import load_documents
from tests.helpers import small_run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_every_public_name_resolves():
    assert sorted(dir(echelon)) == sorted(echelon.__all__)
    for name in echelon.__all__:
        assert getattr(echelon, name) is not None
    with pytest.raises(AttributeError):
        echelon.not_a_public_name  # noqa: B018


def test_a_mapping_with_a_typo_is_a_config_error_naming_the_field():
    with pytest.raises(echelon.ConfigError, match="boundaries"):
        echelon.load_config({"name": "x", "budget": {"outer_steps": 1}})


def test_the_embedding_example_trains_its_own_model_on_its_own_data(tmp_path, monkeypatch, capsys):
    out = tmp_path / "embed"
    monkeypatch.setattr(sys, "argv", ["embed.py", str(out)])
    runpy.run_path(str(EXAMPLES / "embed.py"), run_name="__main__")
    summary = echelon.read_summary(out)
    assert (summary.runtime, summary.outer_steps) == ("simulation", 2)
    assert summary.trainable_parameters == 260 * 16 + 16 * 260 + 260  # the Bigram's, not the preset's
    assert summary.end_val_loss < summary.start_val_loss
    assert (out / "model" / "model.safetensors").is_file()
    assert echelon.read_metrics(out, "outer_step")[-1]["val_loss"] == summary.end_val_loss
    assert "validation loss" in capsys.readouterr().out


def test_a_lora_run_of_an_own_module_is_refused_with_the_fix(tmp_path):
    from torch import nn

    from tests.helpers import small_run

    with pytest.raises(echelon.UserError, match="trainable: full"):
        echelon.simulate(small_run(), tmp_path / "r", model=nn.Linear(2, 2))


def _rows() -> list[dict]:
    return [{"text": f"document {i} " * 20, "topic": f"t{i % 3}"} for i in range(6)]


@pytest.mark.parametrize("form", ["jsonl", "parquet", "saved"])
def test_hf_dataset_source_reads_local_files(tmp_path, form):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(_rows())
    path = {"jsonl": tmp_path / "d.jsonl", "parquet": tmp_path / "d.parquet", "saved": tmp_path / "saved"}[
        form
    ]
    if form == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    elif form == "parquet":
        ds.to_parquet(str(path))
    else:
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    cfg = DataConfig(source="hf_dataset", path=path, domain_field="topic")
    docs = load_documents(cfg, seed=0)
    assert [(d.text, d.domain) for d in docs] == [(r["text"], r["topic"]) for r in _rows()]


def test_hf_dataset_without_the_text_field_names_the_row_and_the_fix(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    with pytest.raises(echelon.UserError, match=r"row 0: field 'text' is missing.*data.text_field"):
        load_documents(DataConfig(source="hf_dataset", path=path), seed=0)


class _Frozen(torch.optim.Optimizer):
    """An inner optimiser that counts its steps and never moves a parameter."""

    steps = 0

    def __init__(self, params, cfg) -> None:
        super().__init__(params, {"lr": cfg.lr})

    def step(self, closure=None) -> None:
        type(self).steps += 1


def test_an_inner_optimizer_of_your_own_makes_every_inner_step(tmp_path):
    from tests.helpers import small_run

    cfg = small_run(budget={"outer_steps": 1})
    summary = echelon.simulate(cfg, tmp_path / "r", optimizer=_Frozen)
    assert _Frozen.steps > 0 and _Frozen.steps % cfg["train"]["inner_steps"] == 0
    # Nothing moved on any device, so no boundary delta and no outer step changed the model.
    assert summary.end_val_loss == summary.start_val_loss  # AdamW moves it: the embedding test


def test_scaffold_refuses_an_inner_optimizer_of_your_own_before_writing_anything(tmp_path):
    from tests.helpers import small_run

    with pytest.raises(echelon.UserError, match="SCAFFOLD"):
        echelon.simulate(small_run(strategy="scaffold"), tmp_path / "r", optimizer=_Frozen)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("out", ["", ".", "x" * 300])
def test_a_malformed_out_is_refused_before_anything_is_written(tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("the caller's data")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run()))
    with pytest.raises(echelon.UserError, match="out '"):
        echelon.simulate(echelon.load_config(run_file), out, force=True)
    with pytest.raises(echelon.UserError, match="out '"):
        echelon.launch(run_file, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "run.yaml"]


@pytest.mark.parametrize("threads", [0, -1, 10**6, True, 2.0])
def test_launch_refuses_threads_no_host_has(tmp_path, threads):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run()))
    with pytest.raises(echelon.UserError, match="threads"):
        echelon.launch(run_file, tmp_path / "run", threads=threads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
