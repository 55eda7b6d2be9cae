"""The executor's pure parts: plan checks, backups carried out, 1F1B orders, stages of the model."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from echelon.config import LoraSettings, ModelConfig
from echelon.errors import UserError
from echelon.train.model import build_model
from echelon.yellowstone.execute.cluster import PeerTimeout, wait
from echelon.yellowstone.execute.handmade import HandLayout
from echelon.yellowstone.execute.job import model_config
from echelon.yellowstone.execute.schedule import BACKWARD, FORWARD, rank_orders, stage_order
from echelon.yellowstone.execute.stages import (
    UnitRange,
    canonical_name,
    causal_lm_of,
    predicted_tokens,
    token_loss_sum,
)
from echelon.yellowstone.execute.topology import check_executable, plan_devices, topology
from echelon.yellowstone.plan import SCHEMA_VERSION, Backup, read_plan
from tests.yellowstone.execution import write_hand_plan

U = HandLayout((("cpu0", "cpu1"), ("cpu2", "cpu3")), "U", ((0, 3), (3, 5)))


@pytest.fixture
def u_plan(tmp_path):
    return write_hand_plan(tmp_path / "plan.json", [U])


def test_hand_plan_is_executable_and_shares_follow_speed(u_plan, tmp_path):
    check_executable(u_plan, "plan.json")
    c0, c1 = u_plan.boundaries[0].replicas[0].clusters
    assert c0.shares == [3, 1] and c1.shares == [2, 2]
    assert [s.cluster for s in u_plan.boundaries[0].replicas[0].stages] == [c0.id, c1.id, c0.id]
    assert read_plan(tmp_path / "plan.json") == u_plan


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [
        (lambda r: r.clusters[0].shares.__setitem__(0, 2), "clusters[0].shares", "summing to micro_batch 4"),
        (lambda r: setattr(r.clusters[1], "head", "cpu0"), "clusters[1].head", "not one of the cluster's"),
        (lambda r: setattr(r.stages[1], "index", 2), "stages[1].index", "pipeline order"),
        (lambda r: setattr(r.stages[1], "units", (4, 5)), "stages[1].units", "does not continue"),
        (lambda r: setattr(r.stages[2], "cluster", "lab/r0/c9"), "stages[2].cluster", "unknown cluster"),
        (lambda r: setattr(r.stages[2], "cluster", "lab/r0/c1"), "stages", "U replica runs its stages"),
        (lambda r: setattr(r.clusters[0], "parallelism", "ZeRO"), "clusters[0].parallelism", "not one of"),
        (lambda r: r.clusters[1].devices.__setitem__(0, "cpu0"), "clusters[1].devices", "also in"),
        (lambda r: setattr(r, "stages", r.stages[:2]), "stages", "cover units [0, 5)"),
    ],
)
def test_a_hand_edited_plan_is_refused_naming_the_field(u_plan, edit, field, problem):
    edit(u_plan.boundaries[0].replicas[0])
    with pytest.raises(UserError, match=r"plan\.json") as e:
        check_executable(u_plan, "plan.json")
    assert f"boundaries[0].replicas[0].{field}" in str(e.value) and problem in str(e.value)


def test_another_schema_version_is_refused(u_plan, tmp_path):
    path = tmp_path / "old.json"
    path.write_text(
        u_plan.model_dump_json().replace(f'"schema_version":{SCHEMA_VERSION}', '"schema_version":1')
    )
    with pytest.raises(UserError, match=f"reads schema_version {SCHEMA_VERSION} plans"):
        read_plan(path)


def test_failures_without_backup_entries_shrink_then_drop(u_plan):
    topo = topology(u_plan, ["cpu1"])
    (rep,) = topo.replicas
    assert rep.clusters[0].devices == ("cpu0",) and rep.clusters[0].shares == (4,)
    assert "shrink (fallback)" in topo.applied[0]
    # cpu0 was alone in cluster 0 now: the replica stops, its other devices become idle.
    topo = topology(u_plan, ["cpu1", "cpu0"])
    assert topo.replicas == () and set(topo.idle) == {"cpu2", "cpu3", "cpu1", "cpu0"}


def test_a_failed_head_hands_its_share_and_the_head_role_over(u_plan):
    (rep,) = topology(u_plan, ["cpu2"]).replicas
    c1 = rep.clusters[1]
    assert c1.devices == ("cpu3",) and c1.head == "cpu3" and c1.shares == (4,)
    assert c1.parallelism.startswith("DDP")  # nothing left to shard over


def test_standby_backups_swap_in_and_replacements_are_used_when_free(tmp_path):
    plan = write_hand_plan(
        tmp_path / "plan.json",
        [HandLayout((("cpu0", "cpu1"), ("cpu2",)), "U", ((0, 3), (3, 5)))],
        devices=5,
        cleared=2,
    )
    b = plan.boundaries[0]
    assert b.standby == ["cpu3", "cpu4"]
    b.backups = [
        Backup(device="cpu2", kind="standby", replica="lab/r0", standby="cpu3", tokens_per_s_after=1.0)
    ]
    (rep,) = topology(plan, ["cpu2"]).replicas
    assert rep.clusters[1].devices == ("cpu3",) and rep.clusters[1].head == "cpu3"
    # The standby itself failed first: the entry cannot be carried out, the fallback applies.
    topo = topology(plan, ["cpu3", "cpu2"])
    assert topo.replicas == () and "drop_replica (fallback)" in topo.applied[-1]
    # A replacement replica naming only free devices is used as written.
    replacement = b.replicas[0].model_copy(deep=True)
    replacement.clusters[1].devices = ["cpu4"]
    replacement.clusters[1].head = "cpu4"
    b.backups = [
        Backup(
            device="cpu2", kind="replan", replica="lab/r0", replacement=replacement, tokens_per_s_after=1.0
        )
    ]
    (rep,) = topology(plan, ["cpu2"]).replicas
    assert rep.clusters[1].devices == ("cpu4",)
    assert "cpu3" in topology(plan, ["cpu2"]).idle


def test_plan_devices_are_replica_devices_then_standby(tmp_path):
    plan = write_hand_plan(tmp_path / "p.json", [HandLayout((("cpu0",),), "single", ((0, 6),))], devices=3)
    assert plan_devices(plan) == ["cpu0", "cpu1", "cpu2"]


@settings(max_examples=60, deadline=None)
@given(
    clusters=st.integers(1, 5),
    micro_batches=st.integers(1, 9),
    u=st.booleans(),
)
def test_1f1b_orders_are_complete_and_respect_dependencies(clusters, micro_batches, u):
    stage_rank = list(range(clusters)) + ([0] if u and clusters > 1 else [])
    orders = rank_orders(stage_rank, micro_batches)
    stages = len(stage_rank)
    seen = []
    for rank, actions in orders.items():
        assert all(stage_rank[a.stage_index] == rank for a in actions)
        seen += [(a.stage_index, a.computation_type, a.microbatch_index) for a in actions]
    assert sorted(seen) == sorted(
        (s, k, i) for s in range(stages) for k in (FORWARD, BACKWARD) for i in range(micro_batches)
    )
    # Per stage: forwards and backwards in micro-batch order, each backward after its forward,
    # and no stage holds more micro-batches than 1F1B allows.
    for s in range(stages):
        own = [(k, i) for (t, k, i) in seen if t == s]
        order = next(
            [(a.computation_type, a.microbatch_index) for a in acts if a.stage_index == s]
            for acts in orders.values()
            if any(a.stage_index == s for a in acts)
        )
        expect = [(FORWARD if k == "F" else BACKWARD, i) for k, i in stage_order(s, stages, micro_batches)]
        assert order == expect and len(own) == 2 * micro_batches


def test_u_shaped_orders_run_without_deadlock_in_torch_simulator():
    from torch.distributed.pipelining.schedules import _add_send_recv, _simulate_comms_compute

    stage_rank = [0, 1, 2, 0]
    orders = rank_orders(stage_rank, 6)
    lowered = _add_send_recv(orders, stage_to_rank=lambda s: stage_rank[s], num_stages=4)
    _simulate_comms_compute(lowered, lambda s: stage_rank[s], 4)  # raises on a deadlock


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_unit_ranges_compose_to_the_whole_model(trainable):
    bundle = build_model(
        ModelConfig(preset="tiny", trainable=trainable, lora=LoraSettings(r=4, dropout=0.0)), 0
    )
    lm = causal_lm_of(bundle.model)
    tokens = torch.randint(0, 256, (3, 16))
    reference = bundle.model(input_ids=tokens, labels=tokens).loss
    stages = [UnitRange(lm, 0, 2), UnitRange(lm, 2, 5, checkpointing=True), UnitRange(lm, 5, 6)]
    h = tokens
    for stage in stages:
        h = stage(h)
    loss = token_loss_sum(h, tokens) / predicted_tokens(3, 16)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(loss, bundle.trainable, retain_graph=True)
    expected = torch.autograd.grad(reference, bundle.trainable)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    trainable_names = {canonical_name(n) for n in bundle.names}
    assert {n for s in stages for n, p in s.named_parameters() if p.requires_grad} == trainable_names
    with pytest.raises(ValueError, match="outside a model of 6 units"):
        UnitRange(lm, 2, 7)


def test_a_checkpoint_directory_is_planned_from_its_own_config_and_built_from_it(tmp_path):
    from echelon.yellowstone.cli_plan import configure, run

    bundle = build_model(ModelConfig(preset="tiny", trainable="full"), 0)
    bundle.model.save_pretrained(tmp_path / "ckpt")
    bundle.tokenizer.save_pretrained(tmp_path / "ckpt")
    import argparse

    from tests.yellowstone.execution import cpu_fleet

    (tmp_path / "fleet.yaml").write_text(json.dumps(cpu_fleet().model_dump(mode="json")))
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(
        [str(tmp_path / "fleet.yaml"), "--model", str(tmp_path / "ckpt"), "--full", "--seq-len", "32",
         "--dtype", "fp32", "--out", str(tmp_path / "plan")]
    )  # fmt: skip
    assert run(args) == 0
    plan = read_plan(tmp_path / "plan" / "plan.json")
    assert plan.model.source == str((tmp_path / "ckpt").resolve())
    assert (plan.model.hidden, plan.model.layers, plan.model.vocab) == (256, 4, 260)
    cfg = model_config(plan, 0.0)
    assert cfg.path == tmp_path.resolve() / "ckpt" and cfg.preset is None and cfg.trainable == "full"
    rebuilt = build_model(cfg, 0)
    assert torch.equal(rebuilt.get_vector(), bundle.get_vector())


def test_a_transfer_that_fails_names_the_peer_device():
    class Broken:
        def wait(self):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")

    with pytest.raises(PeerTimeout, match="could not receive from device cpu7"):
        wait(Broken(), "cpu7", "receive from")


def test_a_taken_standby_uses_the_fallback_and_a_second_failure_the_then_entries(tmp_path):
    plan = write_hand_plan(
        tmp_path / "plan.json",
        [HandLayout((("cpu0", "cpu1"), ("cpu2",)), "U", ((0, 3), (3, 5)))],
        devices=5,
        cleared=2,
    )
    b = plan.boundaries[0]

    def on(device: str):
        replica = b.replicas[0].model_copy(deep=True)
        replica.clusters[1].devices, replica.clusters[1].head = [device], device
        return replica

    fallback = Backup(
        device="cpu2", kind="replan", replica="lab/r0", replacement=on("cpu4"), tokens_per_s_after=1.0
    )
    # cpu3 heads cluster 1 after the standby swap: the entry plans for its failure too.
    then = Backup(
        device="cpu3", kind="replan", replica="lab/r0", replacement=on("cpu4"), tokens_per_s_after=1.0
    )
    b.backups = [
        Backup(device="cpu2", kind="standby", replica="lab/r0", standby="cpu3", replacement=on("cpu3"),
               tokens_per_s_after=1.0, fallback=fallback, then=[then]),
    ]  # fmt: skip
    (rep,) = topology(plan, ["cpu2"]).replicas
    assert rep.clusters[1].devices == ("cpu3",)
    topo = topology(plan, ["cpu3", "cpu2"])  # the standby was lost first: the fallback
    assert topo.replicas[0].clusters[1].devices == ("cpu4",) and topo.applied[-1].startswith("cpu2: replan")
    topo = topology(plan, ["cpu2", "cpu3"])  # the new head fails too: its `then` entry
    assert topo.replicas[0].clusters[1].devices == ("cpu4",)
    assert [line.split(": ")[1] for line in topo.applied] == ["standby", "replan"]
