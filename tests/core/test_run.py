"""End-to-end runs in simulation: equivalence with a plain loop, determinism, run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from echelon.assembly import prepare
from echelon.cli import main
from echelon.config import RunConfig
from echelon.runner import build_simulation, train
from echelon.train.data import partition, partition_skew
from echelon.train.model import build_model
from echelon.train.trainer import DeviceStream, derived_seed
from tests.helpers import small_run


def _one_device_config(steps: int) -> RunConfig:
    return RunConfig.model_validate(
        small_run(
            train={"inner_steps": 1, "micro_batch": 4, "lr": 0.003},
            echelon={
                "buffer_size": 1,
                "min_quorum": 1,
                "clip": None,
                "aggregation": "plain",
                "proximal_mu": 0.01,
                "middle_lr": 1.0,
                "outer": {"lr": 1.0, "momentum": 0.0},
                "sync": {"interval": 1, "overlap": False},
            },
            boundaries=[{"id": "b0", "devices": [{"id": "only", "tokens_per_s": 1000}]}],
            budget={"outer_steps": steps},
        )
    )


def test_one_boundary_one_device_k_h_one_equals_plain_training_loop():
    steps = 5
    cfg = _one_device_config(steps)
    prep = prepare(cfg)
    losses = []
    sim = build_simulation(
        cfg, prep, lambda k, f: losses.append(f["train_loss"]) if k == "middle_step" else None
    )
    sim.run(cfg.budget)
    echelon_theta = sim.global_plane.theta_g

    # The same model, data order and optimizer, as an ordinary PyTorch loop.
    bundle = build_model(cfg.model, cfg.seed)
    opt = torch.optim.AdamW(bundle.trainable, lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=0.0)
    stream = DeviceStream(
        prep.shards["only"], cfg.train.micro_batch, np.random.default_rng(derived_seed(cfg.seed, 1, 0))
    )
    plain_losses = []
    for _ in range(steps):
        batch = torch.from_numpy(prep.corpus.train[stream.next()]).long()
        loss = bundle.model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        plain_losses.append(loss.item())
    assert len(losses) == steps
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
    torch.testing.assert_close(echelon_theta, bundle.get_vector(), rtol=1e-5, atol=1e-6)


def _final_state(cfg: RunConfig):
    prep = prepare(cfg)
    records = []
    sim = build_simulation(cfg, prep, lambda k, f: records.append((k, f)))
    sim.run(cfg.budget)
    return sim.global_plane.theta_g, records, sim.cross_boundary_by_type(), sim.now


def test_same_config_and_seed_repeat_bit_for_bit():
    cfg = RunConfig.model_validate(small_run(network={"wan": {"latency_ms": 20, "jitter_pct": 50}}))
    theta_a, rec_a, bytes_a, t_a = _final_state(cfg)
    theta_b, rec_b, bytes_b, t_b = _final_state(cfg)
    assert torch.equal(theta_a, theta_b)
    assert rec_a == rec_b
    assert bytes_a == bytes_b and t_a == t_b


def test_a_different_seed_gives_a_different_run():
    theta_a, *_ = _final_state(RunConfig.model_validate(small_run(seed=0)))
    theta_b, *_ = _final_state(RunConfig.model_validate(small_run(seed=1)))
    assert not torch.equal(theta_a, theta_b)


def test_dirichlet_skew_grows_as_alpha_falls():
    from echelon.config import PartitionConfig

    rng = np.random.default_rng(0)
    domains = rng.integers(0, 30, size=6000)
    skews = []
    for alpha in [100.0, 1.0, 0.1, 0.01]:
        parts = partition(domains, 8, PartitionConfig(kind="dirichlet", alpha=alpha), seed=0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(domains)))  # a true partition
        skews.append(partition_skew(domains, parts))
    assert skews == sorted(skews)
    assert skews[0] < 0.1 < 0.5 < skews[-1]
    iid = partition(domains, 8, PartitionConfig(kind="iid"), seed=0)
    assert partition_skew(domains, iid) < 0.1


def test_train_writes_run_directory_and_loadable_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = RunConfig.model_validate(small_run(budget={"outer_steps": 2}))
    out = tmp_path / "run"
    summary = train(cfg, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "audit",
        "base",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
    ]
    assert not (tmp_path / "run.partial").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    outer = [r for r in records if r["kind"] == "outer_step"]
    assert [r["outer_step"] for r in outer] == [0, 1, 2]
    assert all("val_loss" in r for r in outer)
    assert {r["kind"] for r in records} >= {"middle_step", "outer_step"}
    assert json.loads((out / "summary.json").read_text())["end_val_loss"] == summary["end_val_loss"]
    assert summary["cross_boundary_bytes"]["echelon.v1.BoundaryDelta"] > 0
    # The adapter loads with peft onto its base, and gives the run's final validation loss.
    base = AutoModelForCausalLM.from_pretrained(out / "base", local_files_only=True)
    model = PeftModel.from_pretrained(base, out / "adapter")
    prep = prepare(cfg)
    val = torch.from_numpy(prep.corpus.val[: cfg.eval.sequences]).long()
    with torch.no_grad():
        loss = model.eval()(input_ids=val, labels=val).loss.item()
    assert loss == pytest.approx(summary["end_val_loss"], rel=1e-4)


def test_existing_run_directory_is_never_overwritten_without_force(tmp_path, capsys):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run(budget={"outer_steps": 1})))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["train", str(run_file), "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["train", str(run_file), "--out", str(out), "--no-progress", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "summary.json").exists()


def test_local_checkpoint_directory_trains_with_its_own_tokenizer(tmp_path):
    # A checkpoint on disk: the tiny Llama saved with save_pretrained, tokenizer included.
    tiny = build_model(
        RunConfig.model_validate(small_run()).model.model_copy(update={"trainable": "full"}), 0
    )
    tiny.model.save_pretrained(tmp_path / "ckpt")
    tiny.tokenizer.save_pretrained(tmp_path / "ckpt")
    cfg = RunConfig.model_validate(
        small_run(model={"path": str(tmp_path / "ckpt"), "preset": None}, budget={"outer_steps": 1})
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["outer_steps"] == 1
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((tmp_path / "ckpt").resolve())
    assert not (tmp_path / "run" / "base").exists()  # the base is the user's checkpoint, not copied
