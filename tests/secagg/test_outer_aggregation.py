"""Secure outer aggregation (+SA): the global plane learns only sum_b omega_b Delta_b."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from echelon.assembly import prepare
from echelon.cli import main
from echelon.config import RunConfig
from echelon.planes.boundary import BoundaryPlane
from echelon.planes.coordinator import GlobalPlane
from echelon.runner import build_simulation
from echelon.strategies import get_strategy
from tests.helpers import small_run
from tests.secagg.test_boundary_integration import _arrays


@pytest.mark.parametrize("name", ["echelon+sa", "echelon-da+sa"])
def test_outer_step_applies_the_secure_sum_and_the_global_never_holds_a_boundary_delta(name):
    assert get_strategy(name).admissible and get_strategy(name).secure_outer
    cfg = RunConfig.model_validate(small_run(strategy=name, budget={"outer_steps": 3}))
    prep = prepare(cfg)
    deltas: dict[tuple[int, str], np.ndarray] = {}  # (outer step, boundary) -> Delta_b
    applied: list[tuple[int, dict[str, float], np.ndarray]] = []

    class RecordingBoundary(BoundaryPlane):
        def _on_outer_aggregation(self, now, msg):
            if msg.WhichOneof("body") == "request" and self._outer_input is not None:
                deltas[msg.outer_step, f"boundary/{self.boundary_id}"] = self._outer_input[1].numpy().copy()
            return super()._on_outer_aggregation(now, msg)

    class InspectedGlobal(GlobalPlane):
        def receive(self, now, sender, message, data=None):
            actions = super().receive(now, sender, message, data)
            for a in _arrays(self._outer_round):
                for d in deltas.values():
                    if a.dtype.kind == "f" and a.shape == d.shape:
                        assert not np.allclose(a, d, atol=1e-6), (
                            "a boundary's Delta_b sits in the global plane"
                        )
            return actions

        def _apply_outer(self, now, pseudo_gradient):
            applied.append((self._syncing, self._omega(), pseudo_gradient.numpy().copy()))
            return super()._apply_outer(now, pseudo_gradient)

    sim = build_simulation(cfg, prep, lambda kind, fields: None)
    sim.global_plane.__class__ = InspectedGlobal
    for plane in sim.boundary_planes.values():
        plane.__class__ = RecordingBoundary
    sim.run(cfg.budget)
    assert len(applied) == 3
    scale = 2.0**cfg.echelon.secagg.scale_bits
    for step, omega, pseudo_gradient in applied:
        expected = -sum(w * deltas[step, b] for b, w in omega.items() if (step, b) in deltas)
        # Fixed-point decoding: at most n / (2 scale) per coordinate for n contributors.
        assert np.max(np.abs(pseudo_gradient - expected)) <= len(omega) / (2 * scale) + 1e-6


def test_a_secure_outer_run_passes_the_audit_and_only_masked_aggregates_cross(tmp_path, capsys):
    import json

    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run(strategy="echelon+sa")))
    out = tmp_path / "out"
    assert main(["train", str(run_file), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["audit", str(out), "--json", "--trust-run-keys"]) == 0
    report = json.loads(capsys.readouterr().out)
    types = report["traffic"]["by_type"]
    assert "echelon.v1.OuterAggregation" in types
    assert report["per_device_payload_bytes"] == 0
    summary = json.loads((out / "summary.json").read_text())
    # No Delta_b crossed in the clear: BoundaryDelta messages carry metadata only.
    assert summary["cross_boundary_bytes"]["echelon.v1.BoundaryDelta"] < 100 * summary["outer_steps"] * 2


@pytest.mark.slow
def test_a_simulation_with_the_malicious_server_defences_reaches_the_same_model():
    """Signed keys, the consistency round and t > m/2 (inside the boundaries and in the +SA round)
    change what a malicious server can do, not the sums: the same run reaches the same model."""
    thetas = []
    for defended in (False, True):
        spec = small_run(strategy="echelon+sa", budget={"outer_steps": 2})
        spec["echelon"] = {**spec["echelon"], "secagg": {"malicious_server": defended}}
        cfg = RunConfig.model_validate(spec)
        events: list[str] = []
        sim = build_simulation(cfg, prepare(cfg), lambda kind, fields, seen=events: seen.append(kind))
        sim.run(cfg.budget)
        assert sim.global_plane.outer_step == 2
        assert not [k for k in events if any(w in k for w in ("failure", "refused", "aborted", "violation"))]
        thetas.append(sim.global_plane.theta_g)
    assert torch.equal(thetas[0], thetas[1])
