"""+SA: the outer round encodes Delta_b in the boundary's own range, and any clipping is counted."""

from __future__ import annotations

import numpy as np
import torch

from echelon.assembly import make_aggregator, outer_range
from echelon.config import EchelonConfig, PrivacyConfig, RunConfig
from echelon.contract.provenance import AggregateResult
from echelon.planes.aggregation import PlainAggregator
from echelon.planes.boundary import BoundaryPlane
from echelon.sansio import Emit
from echelon.secagg import SecAggPlusAggregator
from echelon.tensors import encode
from echelon.v1 import boundary_pb2, device_pb2, tensor_pb2
from tests.helpers import small_run
from tests.secagg.harness import run_round


def _cfg(strategy: str, **echelon) -> RunConfig:
    run = small_run(strategy=strategy)
    run["echelon"] = {**run["echelon"], **echelon}
    return RunConfig.model_validate(run)


def test_the_range_is_the_longest_interval_times_eta_mid_times_the_clip():
    assert outer_range(_cfg("echelon+sa", clip=1.0, middle_lr=0.5, sync={"interval": 6})) == 3.0
    assert outer_range(_cfg("echelon-da+sa", clip=2.0, sync={"interval": 6, "h_max": 40})) == 80.0


def test_a_boundary_delta_beyond_the_clip_crosses_the_outer_round_unclipped():
    # Four middle steps of ||delta_b|| <= C = 1 can move one coordinate by 4 > C.
    cfg = _cfg("echelon+sa", clip=1.0, sync={"interval": 4})
    vectors = {"boundary/x": np.array([3.5, -4.0, 0.25]), "boundary/y": np.array([-2.0, 1.0, 0.5])}
    weights = {"boundary/x": 0.75, "boundary/y": 0.25}
    expected = sum(weights[b] * v for b, v in vectors.items())
    wide = run_round(make_aggregator(cfg, outer=True), vectors, weights)  # in the range outer_range(cfg)
    narrow = run_round(
        SecAggPlusAggregator(min_quorum=1, clip=cfg.echelon.clip), vectors, weights
    )  # the per-device C
    assert isinstance(wide.server.outcome, AggregateResult)
    np.testing.assert_allclose(wide.server.outcome.weighted_sum, expected, atol=1e-5)
    assert not np.allclose(narrow.server.outcome.weighted_sum, expected, atol=1e-2)  # clipped silently


def test_the_boundary_counts_coordinates_beyond_the_range():
    cfg = EchelonConfig(
        aggregation="plain", buffer_size=1, min_quorum=1, privacy=PrivacyConfig(membership_window=None)
    )
    plane = BoundaryPlane(
        "b",
        ["d1"],
        "global",
        cfg,
        PlainAggregator(),
        dim=3,
        outer_aggregator=SecAggPlusAggregator(min_quorum=1, clip=1.0),
        outer_range=1.0,
    )
    plane.receive(0.0, "d1", device_pb2.Hello(device_id="d1"))
    plane.receive(
        0.0, "global", boundary_pb2.GlobalReference(parameters=encode(torch.zeros(3), tensor_pb2.GLOBAL))
    )
    plane.model.since_sync = torch.tensor([3.0, -0.5, 1.5])  # as if several middle steps had added up
    plane.model.contributors = [1]
    plane.receive(2.0, "global", boundary_pb2.SyncRequest(outer_step=1))
    request = device_pb2.AggregationRequest(round_id=1, weight=0.5, participants=1)
    actions = plane.receive(3.0, "global", boundary_pb2.OuterAggregation(outer_step=1, request=request))
    (clipped,) = [a.fields for a in actions if isinstance(a, Emit) and a.kind == "outer_input_clipped"]
    assert clipped == {"boundary": "b", "outer_step": 1, "coordinates": 1}  # only 0.5 * 3.0 exceeds 1
