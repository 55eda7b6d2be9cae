"""Streaming DiLoCo (Douillard et al. 2025): strided layer fragments synced in turn every H/P
middle steps, low-bit pseudo-gradients, overlap tau, mixing alpha."""

from __future__ import annotations

import itertools
import re
import statistics

import torch

from echelon.assembly import prepare
from echelon.config import RunConfig
from echelon.contract.provenance import BoundaryModel, fragment_bounds
from echelon.planes.boundary import BoundaryPlane
from echelon.planes.coordinator import GlobalPlane
from echelon.runner import build_simulation
from echelon.strategies import effective_config
from echelon.v1 import tensor_pb2
from tests.helpers import small_run


def test_fragments_partition_the_vector():
    bounds = fragment_bounds(10, 3)
    assert bounds[0][0] == 0 and bounds[-1][1] == 10
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_mixing_merges_the_global_fragment_with_the_local_one():
    model = BoundaryModel(torch.zeros(6), min_quorum=1, fragments=2)
    seal = model.open_round(1, invited=1)
    model.apply_aggregate(seal.seal(torch.arange(6.0).numpy().astype("f8"), 1.0, 1), lr=1.0)
    model.start_sync(fragment=1)  # fragment 1 (elements 3..5) sent: base there is theta_b
    model.adopt(torch.full((3,), 10.0), keep_since_send=True, fragment=1, mixing=0.25)
    # (1 - alpha) * global + alpha * local-as-sent; fragment 0 keeps its own state untouched.
    torch.testing.assert_close(model.theta_b[3:], 0.75 * 10.0 + 0.25 * torch.tensor([3.0, 4.0, 5.0]))
    torch.testing.assert_close(model.theta_b[:3], torch.tensor([0.0, 1.0, 2.0]))
    assert model.contributors == [1, 0]


def test_fragments_are_strided_whole_layers():
    cfg = effective_config(RunConfig.model_validate(small_run(strategy="streaming-diloco")))
    prep = prepare(cfg)
    bounds = prep.fragments
    assert len(bounds) == 4 and bounds[0][0] == 0 and bounds[-1][1] == prep.bundle.dim
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    offset = 0
    for name, p in zip(prep.bundle.names, prep.bundle.trainable, strict=True):
        fragment = next(f for f, (lo, hi) in enumerate(bounds) if lo <= offset < hi)
        assert offset + p.numel() <= bounds[fragment][1]  # a parameter never straddles fragments
        layer = int(re.search(r"\.layers\.(\d+)\.", name).group(1))
        assert layer % 4 == fragment, name  # the tiny model has 4 layers: one per fragment
        offset += p.numel()


def test_streaming_diloco_syncs_fragments_in_turn_every_h_over_p_in_bfloat16_after_tau():
    run = small_run(strategy="streaming-diloco", budget={"outer_steps": 8})
    run["echelon"] = {**run["echelon"], "sync": {"interval": 8}}  # H = 8, P = 4: a sync every 2
    cfg = effective_config(RunConfig.model_validate(run))
    s = cfg.echelon.streaming
    assert (s.fragments, s.overlap_steps, s.mixing, s.pseudo_gradient_dtype) == (4, 1, 0.5, "bfloat16")
    prep = prepare(cfg)
    changed: list[set[int]] = []
    deltas: list[tuple[int, int]] = []
    sent_at: dict[str, list[int]] = {}
    applied_after: list[int] = []

    class WatchedGlobal(GlobalPlane):
        def _apply_outer(self, now, pseudo_gradient):
            before = self.theta_g.clone()
            actions = super()._apply_outer(now, pseudo_gradient)
            diff = (self.theta_g != before).nonzero().flatten().tolist()
            changed.append({next(f for f, (lo, hi) in enumerate(self.bounds) if lo <= i < hi) for i in diff})
            return actions

        def receive(self, now, sender, message, data=None):
            if message.DESCRIPTOR.name == "BoundaryDelta":
                sent_at.setdefault(sender, []).append(message.middle_step)
                if message.HasField("delta"):
                    deltas.append((message.delta.dtype, message.delta.numel))
            return super().receive(now, sender, message, data)

    class WatchedBoundary(BoundaryPlane):
        def _on_global_reference(self, now, msg, data):
            actions = super()._on_global_reference(now, msg, data)
            if (
                msg.outer_step > 0
                and self._awaiting_global is None
                and self._deferred is None
                and not msg.final
            ):
                applied_after.append(self.middle_step - self._middle_at_send)
            return actions

    sim = build_simulation(cfg, prep, lambda kind, fields: None)
    sim.global_plane.__class__ = WatchedGlobal
    for plane in sim.boundary_planes.values():
        plane.__class__ = WatchedBoundary
    sim.run(cfg.budget)
    bounds = sim.global_plane.bounds
    assert len(changed) == 8
    for k, fragments in enumerate(changed, start=1):
        assert fragments <= {(k - 1) % 4}, f"outer step {k} touched fragments {fragments}"
    # An outer step every H/P = 2 middle steps of the slowest worker (a barrier strategy waits for
    # it; faster ones do more meanwhile), so each fragment is synced every H, not every P * H.
    gaps = {b: [y - x for x, y in itertools.pairwise([0, *steps])] for b, steps in sent_at.items()}
    assert all(min(g) >= 2 for g in gaps.values()), gaps
    assert min(statistics.fmean(g) for g in gaps.values()) == 2, gaps
    assert deltas and all(dtype == tensor_pb2.BFLOAT16 for dtype, _ in deltas)
    assert {numel for _, numel in deltas} <= {hi - lo for lo, hi in bounds}
    assert applied_after and min(applied_after) >= 1  # tau = 1 middle step of overlap
