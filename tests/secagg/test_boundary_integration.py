"""SecAgg+ as the boundary's aggregation in a running simulation: the coordinator never holds an
unmasked individual delta, and the run still learns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from echelon.assembly import prepare
from echelon.config import RunConfig
from echelon.planes.boundary import BoundaryPlane
from echelon.planes.device import DevicePlane
from echelon.runner import build_simulation
from echelon.secagg import SecAggPlusAggregator
from tests.helpers import small_run


def _arrays(obj, seen: set[int] | None = None):
    """Every numpy array and torch tensor reachable from `obj` (attributes, containers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, torch.Tensor):
        yield obj.detach().numpy()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _arrays(v, seen)
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
        fields = dict(getattr(obj, "__dict__", {}))
        for name in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, name):
                fields[name] = getattr(obj, name)
        for v in fields.values():
            yield from _arrays(v, seen)


def _inspect(aggregation: str) -> None:
    cfg = RunConfig.model_validate(small_run(budget={"outer_steps": 2}, echelon={"aggregation": aggregation}))
    prep = prepare(cfg)
    individual: list[np.ndarray] = []  # every device's delta and its weighted, encoded forms
    checked = []

    class RecordingDevice(DevicePlane):
        def receive(self, now, sender, message):
            if message.DESCRIPTOR.name == "AggregationRequest" and self.pending is not None:
                delta = self.pending.numpy().astype(np.float64)
                weighted = message.weight * delta
                individual.extend([delta, weighted])
                if isinstance(self._aggregator, SecAggPlusAggregator):
                    individual.append(
                        self._aggregator.parameters(message.participants).codec.encode(weighted)
                    )
            return super().receive(now, sender, message)

    class InspectedBoundary(BoundaryPlane):
        def receive(self, now, sender, message, data=None):
            actions = super().receive(now, sender, message, data)
            held = [a for a in _arrays(self) if a.ndim == 1 and a.size == prep.bundle.dim]
            for a in held:
                for x in individual:
                    if a.dtype == x.dtype and a.dtype.kind == "u":
                        assert not np.array_equal(a, x), "an encoded individual input sits in the coordinator"
                    elif a.dtype.kind == "f" and x.dtype.kind == "f":
                        assert not np.allclose(a, x, atol=1e-6), "an individual delta sits in the coordinator"
            checked.append(len(held))
            return actions

    sim = build_simulation(cfg, prep, lambda kind, fields: None)
    for plane in sim.boundary_planes.values():
        plane.__class__ = InspectedBoundary
    for address, actor in sim._actors.items():
        if address.startswith("device/"):
            actor.__class__ = RecordingDevice
    sim.run(cfg.budget)
    assert sim.global_plane.outer_step == 2
    assert individual and sum(checked) > 0  # arrays were there to inspect, none was individual


def test_the_coordinator_never_holds_an_unmasked_individual_delta():
    assert RunConfig.model_validate(small_run()).echelon.aggregation == "secagg"  # the default
    _inspect("secagg")


def test_the_inspection_does_find_individual_deltas_under_plain_aggregation():
    with pytest.raises(AssertionError, match="individual delta sits in the coordinator"):
        _inspect("plain")
