"""What a deployed party restarts from, and what it refuses on arrival: plane state dicts (no
pickled objects), a boundary delta of the wrong size or with NaN, the end of a run on patience."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from echelon.config import (
    BudgetConfig,
    ChurnConfig,
    DeviceConfig,
    EchelonConfig,
    LinkConfig,
    OuterConfig,
    SyncConfig,
)
from echelon.contract.guard import EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.parties import GLOBAL, boundary_address, device_address, party_of
from echelon.planes.aggregation import PlainAggregator
from echelon.planes.boundary import BoundaryPlane
from echelon.planes.controller import Cadence
from echelon.planes.coordinator import GlobalPlane
from echelon.planes.device import DevicePlane
from echelon.runtime.sim.engine import Simulation
from echelon.sansio import Emit, LocalResult, Send
from echelon.tensors import payload
from echelon.v1 import boundary_pb2, tensor_pb2

X, Y = "boundary/x", "boundary/y"


def _roundtrip(state: dict) -> dict:
    """`state` through torch.save and torch.load(weights_only=True): only tensors and plain values pass."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return a == b


def _global_plane(dim: int = 4) -> GlobalPlane:
    return GlobalPlane([X, Y], torch.zeros(dim), OuterConfig(), Cadence(SyncConfig(interval=1), False), 60.0)


def _delta(step: int, values: list[float], contributors: int = 2) -> boundary_pb2.BoundaryDelta:
    delta = payload(np.array(values), tensor_pb2.BOUNDARY_AGGREGATE, contributors, tensor_pb2.FLOAT32)
    return boundary_pb2.BoundaryDelta(outer_step=step, tokens=100, delta=delta, contributors=contributors)


def _outer_step(plane: GlobalPlane, step: int, scale: float) -> None:
    """Drive `plane` through outer step `step`: a status from x, then both deltas."""
    plane.receive(0.0, X, boundary_pb2.BoundaryStatus(middle_step=step, tokens_total=100 * step, drift=0.1))
    plane.receive(0.0, X, _delta(step, [scale, -scale, 0.5, 0.0]))
    plane.receive(0.0, Y, _delta(step, [0.0, scale, 0.25, -1.0]))


def test_a_global_plane_restored_from_its_state_dict_continues_identically():
    original = _global_plane()
    original.start(0.0)
    _outer_step(original, 1, 0.3)
    saved = _roundtrip(original.state_dict())
    restored = _global_plane()
    restored.load_state_dict(saved)
    assert _same(restored.state_dict(), saved)
    for plane in (original, restored):
        _outer_step(plane, 2, -0.7)  # momentum carries over: a fresh optimizer would diverge here
    assert original.outer_step == restored.outer_step == 2
    torch.testing.assert_close(restored.theta_g, original.theta_g, rtol=0, atol=0)
    assert _same(restored.state_dict(), original.state_dict())


def test_a_global_state_dict_of_another_run_is_refused():
    plane = _global_plane()
    plane.start(0.0)
    with pytest.raises(ValueError, match="another run"):
        _global_plane(dim=5).load_state_dict(plane.state_dict())


def test_a_boundary_delta_of_the_wrong_size_or_with_nan_is_refused_and_changes_nothing():
    plane = _global_plane()
    plane.start(0.0)
    plane.receive(0.0, X, boundary_pb2.BoundaryStatus(middle_step=1, tokens_total=100, drift=0.1))
    for bad, match in (
        (_delta(1, [0.1, 0.2, 0.3, 0.4, 0.5]), "5 elements where 4"),
        (_delta(1, [0.1, float("nan"), 0.3, 0.4]), "NaN"),
        (_delta(1, [0.1, float("inf"), 0.3, 0.4]), "NaN or infinite"),
    ):
        (refusal,) = plane.receive(0.0, X, bad)
        assert isinstance(refusal, Emit) and refusal.kind == "refused" and match in refusal.fields["reason"]
    # The refusals did not count as answers: the sync completes with the two good deltas.
    plane.receive(0.0, X, _delta(1, [0.1, 0.2, 0.3, 0.4]))
    plane.receive(0.0, Y, _delta(1, [0.0, 0.0, 0.0, 0.0]))
    assert plane.outer_step == 1 and bool(torch.isfinite(plane.theta_g).all())


def test_ending_on_patience_sends_the_last_synchronised_model_final_and_whole():
    plane = _global_plane()
    plane.start(0.0)
    _outer_step(plane, 1, 0.3)
    plane.receive(0.0, X, boundary_pb2.BoundaryStatus(middle_step=2, tokens_total=200, drift=0.1))  # a sync
    theta = plane.theta_g.clone()
    actions = plane.end(5.0, "patience")
    refs = [a.message for a in actions if isinstance(a, Send)]
    assert {a.to for a in actions if isinstance(a, Send)} == {X, Y}
    assert all(r.final and r.outer_step == 1 and r.fragments == 1 for r in refs)
    assert plane.finished and plane.final_reason == "patience" and plane.outer_step == 1
    torch.testing.assert_close(plane.theta_g, theta)
    assert [a.kind for a in actions if isinstance(a, Emit)] == ["run_ended"]
    assert plane.end(6.0, "patience") == []  # once


def test_tokens_applied_count_only_what_the_outer_steps_aggregated():
    plane = _global_plane()
    plane.start(0.0)
    _outer_step(plane, 1, 0.3)
    plane.receive(0.0, Y, boundary_pb2.BoundaryStatus(middle_step=5, tokens_total=10_000, drift=0.1))
    assert plane.tokens_reported == 10_100  # what the boundaries aggregated
    assert plane.tokens_applied == 200  # what reached the global model: both deltas of outer step 1


def test_only_the_sync_request_of_a_spent_budget_is_final():
    plane = GlobalPlane([X, Y], torch.zeros(4), OuterConfig(), Cadence(SyncConfig(interval=2), False), 60.0)
    plane.start(0.0)

    def requests(actions) -> list[boundary_pb2.SyncRequest]:
        return [
            a.message for a in actions if isinstance(a, Send) and a.message.DESCRIPTOR.name == "SyncRequest"
        ]

    status = boundary_pb2.BoundaryStatus(middle_step=2, tokens_total=100, drift=0.1)
    (request, _) = requests(plane.receive(0.0, X, status))  # H = 2 reached: an ordinary outer step
    assert request.outer_step == 1 and not request.final
    for boundary, values in ((X, [0.1, 0.0, 0.0, 0.0]), (Y, [0.0, 0.1, 0.0, 0.0])):
        delta = _delta(1, values)
        delta.middle_step = 2
        plane.receive(0.0, boundary, delta)
    assert plane.outer_step == 1
    status = boundary_pb2.BoundaryStatus(middle_step=2, tokens_total=350, drift=0.1)
    assert requests(plane.receive(0.0, X, status)) == []  # no middle step since outer step 1
    budget = BudgetConfig(tokens=300)
    assert plane.check_budget(0.0, budget, 299, 0) == []
    final = requests(plane.check_budget(0.0, budget, plane.tokens_reported, 0))  # 350 reported
    assert len(final) == 2 and all(r.final and r.outer_step == 2 for r in final)


def test_a_budget_spent_during_a_sync_makes_that_outer_step_the_last():
    plane = GlobalPlane([X, Y], torch.zeros(4), OuterConfig(), Cadence(SyncConfig(interval=2), False), 60.0)
    plane.start(0.0)
    plane.receive(0.0, X, boundary_pb2.BoundaryStatus(middle_step=2, tokens_total=100, drift=0.1))
    plane.receive(0.0, X, _delta(1, [0.1, 0.0, 0.0, 0.0]))  # x answered; y has not yet
    actions = plane.check_budget(0.0, BudgetConfig(tokens=100), 100, 0)
    (again,) = [a for a in actions if isinstance(a, Send)]
    assert again.to == Y and again.message.final and again.message.outer_step == 1
    refs = [a.message for a in plane.receive(0.0, Y, _delta(1, [0.0, 0.1, 0.0, 0.0])) if isinstance(a, Send)]
    assert plane.finished and plane.outer_step == 1 and plane.final_reason == "tokens"
    assert refs and all(r.final for r in refs if r.DESCRIPTOR.name == "GlobalReference")


def test_an_outer_step_that_applies_the_token_budget_is_the_last():
    """The boundaries' reports may lag (coarse counts): the step whose deltas spend the budget ends
    the run, instead of asking for one more."""
    plane = GlobalPlane([X, Y], torch.zeros(4), OuterConfig(), Cadence(SyncConfig(interval=2), False), 60.0)
    plane.start(0.0)
    assert plane.check_budget(0.0, BudgetConfig(tokens=150), 0, 0) == []  # nothing reported yet
    plane.receive(0.0, X, boundary_pb2.BoundaryStatus(middle_step=2, tokens_total=0, drift=0.1))
    plane.receive(0.0, X, _delta(1, [0.1, 0.0, 0.0, 0.0]))
    plane.receive(0.0, Y, _delta(1, [0.0, 0.1, 0.0, 0.0]))
    assert plane.tokens_applied == 200 and plane.finished and plane.final_reason == "tokens"


class _FixedStepTrainer:
    def __init__(self, dim: int) -> None:
        self.dim = dim

    def local_round(self, device, reference, anchor=None):
        return LocalResult(reference + 0.01 * torch.arange(self.dim, dtype=torch.float32), 1000, 1.0)


def _one_boundary_sim(on_emit) -> tuple[Simulation, BoundaryPlane]:
    cfg = EchelonConfig(buffer_size=2, buffer_timeout_s=5, aggregation="plain", sync=SyncConfig(interval=3))
    dim = 6
    gp = GlobalPlane([boundary_address("b")], torch.zeros(dim), cfg.outer, Cadence(cfg.sync, False), 60)
    bp = BoundaryPlane("b", [device_address(d) for d in "pq"], GLOBAL, cfg, PlainAggregator(2, 60), dim)
    devices = {d: DevicePlane(d, boundary_address("b"), PlainAggregator(2, 60), cfg.clip, None) for d in "pq"}
    parties = (GLOBAL, party_of(boundary_address("b")))
    terms = Terms(min_quorum=2, dim=dim)
    sim = Simulation(
        global_plane=gp,
        boundaries={"b": bp},
        devices=devices,
        device_boundary=dict.fromkeys("pq", "b"),
        device_profiles={d: DeviceConfig(id=d, tokens_per_s=1000) for d in "pq"},
        trainer=_FixedStepTrainer(dim),
        lan=LinkConfig(latency_ms=1),
        # A slow WAN: middle steps go on while the boundary awaits the global reference.
        wan={"b": LinkConfig(latency_ms=3000)},
        churn=ChurnConfig(),
        guards={
            GLOBAL: (EgressGuard(GLOBAL, terms, None), IngressGuard(GLOBAL, terms, None)),
            parties[1]: (
                EgressGuard(parties[1], terms, None, bp.ledger),
                IngressGuard(parties[1], terms, None),
            ),
        },
        seed=0,
        on_emit=on_emit,
    )
    return sim, bp


def test_a_boundary_restored_from_its_state_dict_keeps_its_middle_steps_and_resends_its_delta():
    saved: dict = {}
    bp = None

    def on_emit(kind, fields):
        # The last state after a delta was sent and before the global reference came back.
        if kind == "middle_step" and bp.awaiting_global is not None and "state" not in saved:
            saved["state"] = _roundtrip(bp.state_dict())
            saved["awaiting"] = bp.awaiting_global

    sim, bp = _one_boundary_sim(on_emit)
    sim.run(BudgetConfig(outer_steps=2))
    assert "state" in saved
    cfg = bp.cfg
    restored = BoundaryPlane("b", [device_address(d) for d in "pq"], GLOBAL, cfg, PlainAggregator(2, 60), 6)
    restored.load_state_dict(saved["state"])
    assert _same(restored.state_dict(), saved["state"])
    assert restored.middle_step == saved["state"]["middle_step"] > 0  # not lost with the restart
    # The global plane, bringing the boundary up to date, asks again: the same delta goes out.
    step = saved["awaiting"]
    (resend,) = restored.receive(0.0, GLOBAL, boundary_pb2.SyncRequest(outer_step=step))
    assert (resend.message.SerializeToString(), bytes(resend.data)) == saved["state"]["last_delta"]


def test_a_boundary_checkpoint_cannot_launder_a_lone_update_into_an_aggregate():
    sim, bp = _one_boundary_sim(lambda kind, fields: None)
    sim.run(BudgetConfig(outer_steps=1))
    state = bp.state_dict()
    state["model"]["contributors"] = [1]  # one device's update, below the quorum of 2
    fresh = BoundaryPlane("b", [device_address(d) for d in "pq"], GLOBAL, bp.cfg, PlainAggregator(2, 60), 6)
    with pytest.raises(ValueError, match="quorum"):
        fresh.load_state_dict(state)


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    from echelon.rundir import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoints" / "global.pt"
    assert save_checkpoint(path, {"step": 1, "theta": torch.ones(3)})

    def full_disk(obj, f):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    assert not save_checkpoint(path, {"step": 2, "theta": torch.zeros(3)})
    assert [p.name for p in path.parent.iterdir()] == ["global.pt"]  # no torn temporary file left
    assert load_checkpoint(path)["step"] == 1


@pytest.mark.slow
def test_a_simulation_that_cannot_write_its_model_keeps_its_last_checkpoint(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from echelon.config import RunConfig
    from echelon.errors import UserError
    from echelon.rundir import load_checkpoint
    from echelon.runner import train
    from echelon.train.model import ModelBundle
    from tests.helpers import small_run

    def full_disk(self, out_dir, theta):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(ModelBundle, "save", full_disk)
    with pytest.raises(UserError, match="the last synchronised model \\(outer step 2\\) is in"):
        train(
            RunConfig.model_validate(small_run(budget={"outer_steps": 2})), tmp_path / "run", progress=False
        )
    state = load_checkpoint(tmp_path / "run.partial" / "checkpoints" / "global.pt")
    assert state["plane"]["outer_step"] == 2 and len(state["evals"]) == 3
