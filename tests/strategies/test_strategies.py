"""Baselines on the planes' runtime: each strategy's defining rule, and the contract's verdict on it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from echelon.assembly import prepare
from echelon.config import RunConfig
from echelon.contract.guard import ContractViolation, EgressGuard
from echelon.planes.aggregation import PlainAggregator
from echelon.planes.device import DevicePlane
from echelon.runner import build_simulation
from echelon.strategies import STRATEGIES, effective_config, get_strategy
from echelon.train.scaffold import control_update, corrected_gradient
from echelon.v1 import device_pb2, tensor_pb2
from tests.helpers import small_run


def _simulate(cfg: RunConfig, **build):
    cfg = effective_config(cfg)
    prep = prepare(cfg)
    sim = build_simulation(cfg, prep, lambda kind, fields: None, **build)
    sim.run(cfg.budget)
    return sim, prep


def _config(strategy: str, **overrides) -> RunConfig:
    return RunConfig.model_validate(small_run(strategy=strategy, **overrides))


def test_fedavg_equals_diloco_with_outer_lr_one_and_momentum_zero():
    knobs = {"echelon": {"buffer_size": 2, "proximal_mu": 0.0, "outer": {"lr": 1.0, "momentum": 0.0}}}
    fedavg, _ = _simulate(_config("fedavg", **knobs))
    diloco, _ = _simulate(_config("diloco", **knobs))
    assert fedavg.global_plane.outer_step == diloco.global_plane.outer_step == 3
    assert torch.equal(fedavg.global_plane.theta_g, diloco.global_plane.theta_g)
    # And the outer optimizer matters: DiLoCo's own defaults (lr 0.7, Nesterov 0.9) differ.
    default, _ = _simulate(_config("diloco"))
    assert not torch.equal(default.global_plane.theta_g, diloco.global_plane.theta_g)


def _quadratic_rounds(local, h, a, rounds=300, steps=10, lr=0.05):
    """Federated rounds on f_i(x) = h_i/2 (x - a_i)^2, full participation, server averaging."""
    x, c = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    c_i = [torch.zeros(1, dtype=torch.float64) for _ in h]
    for _ in range(rounds):
        ys, dcs = [], []
        for i, (hi, ai) in enumerate(zip(h, a, strict=True)):
            y = x.clone()
            for _ in range(steps):
                g = hi * (y - ai)
                y = y - lr * (corrected_gradient(g, c, c_i[i]) if local == "scaffold" else g)
            if local == "scaffold":
                new = control_update(c_i[i], c, x, y, steps, lr)
                dcs.append(new - c_i[i])
                c_i[i] = new
            ys.append(y)
        x = torch.stack(ys).mean(0)
        if dcs:
            c = c + torch.stack(dcs).mean(0)
    return float(x)


def test_scaffold_control_variates_remove_client_drift_on_a_quadratic():
    h, a = [1.0, 10.0], [0.0, 1.0]
    optimum = sum(hi * ai for hi, ai in zip(h, a, strict=True)) / sum(h)
    fedavg = _quadratic_rounds("fedavg", h, a)
    scaffold = _quadratic_rounds("scaffold", h, a)
    assert abs(scaffold - optimum) < 1e-9
    # FedAvg with many local steps converges to a biased point (client drift).
    assert abs(fedavg - optimum) > 1e-2


def test_scaffold_run_keeps_server_control_equal_to_the_mean_of_device_controls():
    cfg = _config("scaffold", echelon={"clip": None, "aggregation": "plain"})
    sim, prep = _simulate(cfg)
    d = prep.bundle.dim
    assert sim.global_plane.theta_g.numel() == 2 * d
    c = sim.global_plane.theta_g[d:]
    mean_c_i = torch.stack(list(prep.trainer._controls.values())).mean(0)
    assert c.abs().max() > 0
    torch.testing.assert_close(c, mean_c_i, rtol=1e-4, atol=1e-6)


def test_fedprox_anchors_the_proximal_term_at_the_round_start_reference():
    cfg = effective_config(_config("fedprox", echelon={"proximal_mu": 0.1, "reference_ema": 0.9}))
    assert cfg.echelon.proximal_mu == 0.1 and cfg.echelon.reference_ema is None
    assert effective_config(_config("fedavg", echelon={"proximal_mu": 0.1})).echelon.proximal_mu == 0.0
    device = DevicePlane("d0", "boundary/d0", PlainAggregator(), None, cfg.echelon.reference_ema)
    for version, value in [(1, 1.0), (2, 3.0)]:
        reference = torch.full((4,), value)
        payload = tensor_pb2.TensorPayload(
            provenance=tensor_pb2.GLOBAL, dtype=tensor_pb2.FLOAT32, numel=4, data=reference.numpy().tobytes()
        )
        actions = device.receive(
            0.0, "boundary/d0", device_pb2.BoundaryReference(version=version, parameters=payload)
        )
        start = [a for a in actions if hasattr(a, "anchor")]
        if start:
            assert torch.equal(start[0].anchor, reference)
        assert torch.equal(device._anchor, reference)


@pytest.mark.parametrize(
    ("budget", "reason"),
    [
        ({"tokens": 3000}, "tokens"),
        ({"outer_steps": 2}, "outer_steps"),
        ({"virtual_seconds": 2.0}, "virtual_seconds"),
        ({"cross_boundary_bytes": 50_000}, "cross_boundary_bytes"),
    ],
)
def test_a_run_stops_at_the_first_budget_reached_and_records_which(budget, reason):
    sim, _ = _simulate(_config("echelon", budget={**budget, "outer_steps": budget.get("outer_steps", 50)}))
    g = sim.global_plane
    assert g.final_reason == reason
    if reason == "tokens":
        assert sim.tokens >= 3000
    if reason == "cross_boundary_bytes":
        assert sim.cross_boundary_bytes >= 50_000
    assert g.outer_step < 50 or reason == "outer_steps"


class _Recording(EgressGuard):
    def __init__(self, inner: EgressGuard, sent: list) -> None:
        super().__init__(inner.party, inner.terms, None, inner.ledger)
        self.sent = sent

    def send(self, now, body, peer, data=None):
        frames = super().send(now, body, peer, data)
        self.sent.append((self.party, body, data))
        return frames


def _update_tensor(body):
    """The update tensor a boundary's message carries: Delta_b in the clear, or masked (+SA)."""
    if body.DESCRIPTOR.name == "BoundaryDelta" and body.HasField("delta"):
        return body.delta
    if body.DESCRIPTOR.name == "OuterAggregation" and body.secagg.HasField("masked_input"):
        return body.secagg.masked_input.masked
    return None


@pytest.mark.parametrize("name", [s.name for s in STRATEGIES.values() if s.topology == "flat"])
def test_flat_strategies_are_not_admissible_and_a_real_boundary_guard_refuses_them(name):
    strategy = get_strategy(name)
    assert not strategy.admissible and "not admissible" in strategy.label
    cfg = _config(name, budget={"outer_steps": 1})
    eff = effective_config(cfg)
    prep = prepare(eff)
    sim = build_simulation(eff, prep, lambda kind, fields: None)
    sent: list = []
    sim._guards = {p: (_Recording(e, sent), i) for p, (e, i) in sim._guards.items()}
    sim.run(eff.budget)
    updates = [(party, body, data) for party, body, data in sent if _update_tensor(body) is not None]
    assert updates, "every device's update crossed its (one-device) boundary"
    strict = cfg.echelon.min_quorum
    assert strict >= 2
    for party, body, data in updates:
        assert _update_tensor(body).contributors == 1
        egress = sim._guards[party][0]
        guard = EgressGuard(party, dataclasses.replace(egress.terms, min_quorum=strict), None, egress.ledger)
        with pytest.raises(ContractViolation, match="quorum"):
            guard.send(0.0, body, "global", data)


def test_admissible_strategies_are_hierarchical():
    for s in STRATEGIES.values():
        assert s.admissible == (s.topology == "hierarchical"), s.name


def test_a_strategy_is_data_resolved_the_same_way_for_all():
    from echelon.strategies.base import Strategy, resolve

    # A new strategy needs no code beyond its entry: topology, mechanisms, fixed fields, defaults.
    custom = Strategy(
        "custom",
        "a test strategy",
        admissible=True,
        fixes={"echelon.outer.lr": 0.3},
        defaults={"echelon.clip": 0.5},
    )
    cfg = _config("echelon")
    resolved = resolve(custom, cfg)
    assert resolved.echelon.outer.lr == 0.3 and resolved.echelon.clip == 0.5
    set_clip = _config("echelon", echelon={"buffer_size": 2, "clip": 2.0})
    assert resolve(custom, set_clip).echelon.clip == 2.0  # a default yields to the run file
    for s in STRATEGIES.values():
        eff = effective_config(_config(s.name))
        assert effective_config(eff) == eff, s.name  # resolving is idempotent
        for dotted, value in s.fixes.items():
            node = eff
            for key in dotted.split("."):
                node = getattr(node, key)
            assert node == value, (s.name, dotted)


def test_strategies_do_not_import_the_configuration_module():
    import subprocess
    import sys

    code = "import sys, echelon.strategies; print('echelon.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # config imports the catalog; never the other way round


def test_diloco_sa_has_an_admissible_form_that_a_deployment_accepts():
    from echelon.errors import UserError
    from echelon.preflight import require_admissible

    flat, boundary = get_strategy("diloco+sa"), get_strategy("diloco+sa-boundary")
    assert not flat.admissible and "not admissible" in flat.label
    assert boundary.admissible and boundary.topology == "hierarchical"
    assert boundary.secure_outer and boundary.lockstep and boundary.tunes("echelon.outer.lr")
    require_admissible(_config("diloco+sa-boundary"))  # no refusal
    with pytest.raises(UserError, match="not admissible"):
        require_admissible(_config("diloco+sa"))
    eff = effective_config(_config("diloco+sa-boundary"))
    assert eff.echelon.proximal_mu == 0.0 and not eff.echelon.sync.overlap
    assert [len(b.devices) for b in eff.boundaries] == [2, 2]  # devices aggregate inside their boundary


def test_admissible_diloco_sa_sends_no_delta_in_the_clear():
    cfg = effective_config(_config("diloco+sa-boundary", budget={"outer_steps": 2}))
    prep = prepare(cfg)
    sim = build_simulation(cfg, prep, lambda kind, fields: None)
    sent: list = []
    sim._guards = {p: (_Recording(e, sent), i) for p, (e, i) in sim._guards.items()}
    sim.run(cfg.budget)
    assert sim.global_plane.outer_step == 2
    deltas = [body for _, body, _ in sent if body.DESCRIPTOR.name == "BoundaryDelta"]
    assert deltas and not any(d.HasField("delta") for d in deltas)  # Delta_b crosses only masked
    masked = [body for _, body, _ in sent if body.DESCRIPTOR.name == "OuterAggregation"]
    assert masked and all(_update_tensor(b) is None or _update_tensor(b).contributors >= 2 for b in masked)
