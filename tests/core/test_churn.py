"""Churn in the simulator: devices joining late, leaving for good, a whole boundary offline and
back; and heavy churn on the real model (slow)."""

from __future__ import annotations

import pytest
import torch

from echelon.config import BudgetConfig, ChurnConfig, EchelonConfig, PrivacyConfig, RunConfig, SyncConfig
from tests.core.fleet import QuadraticTrainer, protocol_sim
from tests.helpers import small_run

DIM = 16


class Members:
    """Records every middle step's members and when its round opened (the simulator's truth)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float, float, set[str]]] = []  # boundary, opened, done, members

    def received(self, now, sender, message, data, frames) -> None: ...

    def submitted(self, now, device, boundary, delta) -> None: ...

    def outer_step(self, now, plane) -> None: ...

    def aggregated(self, now, boundary, step) -> None:
        self.steps.append((boundary, step.opened_at, now, {d.split("/", 1)[1] for d in step.weights}))

    def of(self, device: str) -> list[tuple[float, float]]:
        return [(opened, done) for _, opened, done, members in self.steps if device in members]


class ChurnLog:
    """Wraps `sim`'s churn and local-round events to log, from the simulator's own state, every
    change of a device's online status (time, device id, online) and every local round whose
    result the device kept (time, device id)."""

    def __init__(self, sim) -> None:
        self.online: list[tuple[float, str, bool]] = []
        self.rounds: list[tuple[float, str]] = []
        self._depth = 0
        for name in (
            "_on_leave",
            "_on_join",
            "_on_device_join",
            "_on_departure",
            "_on_outage",
            "_on_boundary_back",
        ):
            setattr(sim, name, self._watch(sim, getattr(sim, name)))
        local_done = sim._on_local_done

        def on_local_done(device, result, session):
            if session == sim._session[device] and sim._online[device]:
                self.rounds.append((sim.now, device.split("/", 1)[1]))
            local_done(device, result, session)

        sim._on_local_done = on_local_done

    def _watch(self, sim, handler):
        def wrapped(*args):
            self._depth += 1
            before = {a: up for a, up in sim._online.items() if a.startswith("device/")}
            try:
                handler(*args)
            finally:
                self._depth -= 1
            if self._depth == 0:  # log once, at the outermost event
                for address, up in sorted(sim._online.items()):
                    if address.startswith("device/") and before.get(address, False) != up:
                        self.online.append((sim.now, address.split("/", 1)[1], up))

        return wrapped

    def online_at(self, device: str, t: float) -> bool:
        """Whether `device` was online at time `t` (online from the start unless it joined later)."""
        events = [(when, up) for when, dev, up in self.online if dev == device]
        before = [up for when, up in events if when <= t]
        return before[-1] if before else not events or not events[0][1]

    def left_between(self, device: str, lo: float, hi: float) -> bool:
        return any(dev == device and not up and lo <= when <= hi for when, dev, up in self.online)


def assert_churn_invariants(members: Members, log: ChurnLog, edges: list[dict] | None) -> None:
    """What churn must never break, checked on every aggregated middle step:

    - no update of a device that had left is applied: each member finished the local round it
      contributed while online and stayed online from then until the round opened (an update it
      held when it went offline was lost with it, even if it came back before the round);
    - with fixed-membership windows (`edges`, the `membership_window` records), each member was
      in the cohort of its step's window: online at the window's opening edge.
    """
    for boundary, opened, _, devices in members.steps:
        for d in devices:
            finished = [t for t, dev in log.rounds if dev == d and t <= opened]
            assert finished, (boundary, d, opened)
            assert log.online_at(d, opened), (boundary, d, opened)
            assert not log.left_between(d, finished[-1], opened), (boundary, d, finished[-1], opened)
            if edges is not None:
                edge = max(
                    e["time"] for e in edges if boundary.endswith("/" + e["boundary"]) and e["time"] <= opened
                )
                assert log.online_at(d, edge), (boundary, d, edge, opened)


def _run(churn: ChurnConfig, fleet=None, seconds: float = 120.0, joining=None, window: int | None = None):
    fleet = fleet or {"a": {"a0": 1000, "a1": 900, "a2": 800}, "b": {"b0": 1000, "b1": 700, "b2": 600}}
    cfg = EchelonConfig(
        buffer_size=2,
        buffer_timeout_s=3,
        aggregation="plain",
        sync=SyncConfig(interval=2, timeout_s=20),
        privacy=PrivacyConfig(membership_window=window, shuffle=True, status_counts="suppressed"),
    )
    members, records = Members(), []
    trainer = QuadraticTrainer(lambda d, r: torch.ones(DIM), lr=0.1, noise=0.01)
    sim = protocol_sim(
        fleet,
        cfg,
        trainer,
        lambda kind, f: records.append((kind, f)),
        dim=DIM,
        churn=churn,
        joining=joining,
        observer=members,
    )
    sim.churn_log = ChurnLog(sim)
    sim.run(BudgetConfig(virtual_seconds=seconds))
    return sim, members, records


def test_a_device_outside_the_initial_membership_joins_and_contributes_only_after():
    churn = ChurnConfig(joins=[{"at_s": 40, "boundary": "a", "device": {"id": "a3", "tokens_per_s": 2000}}])
    fleet = {"a": {"a0": 1000, "a1": 900, "a3": 2000}, "b": {"b0": 1000, "b1": 700}}
    sim, members, _ = _run(churn, fleet, joining={"a3": "a"})
    joined = members.of("a3")
    assert joined and min(opened for opened, _ in joined) >= 40
    assert sim.global_plane.finished


def test_a_device_that_leaves_for_good_is_never_aggregated_again():
    churn = ChurnConfig(departures=[{"at_s": 30, "device": "a0"}])
    sim, members, _ = _run(churn)
    before = members.of("a0")
    assert before and max(opened for opened, _ in before) < 30
    others = [s for s in members.steps if s[0].endswith("/a") and s[1] > 30]
    assert others  # the boundary goes on with the devices it has left
    assert sim.global_plane.finished


def test_a_whole_boundary_offline_comes_back_restarted_and_the_run_goes_on_meanwhile():
    churn = ChurnConfig(outages=[{"boundary": "b", "at_s": 30, "duration_s": 30}])
    sim, members, records = _run(churn)
    during = [s for s in members.steps if s[0].endswith("/b") and 30 <= s[1] < 60]
    assert not during  # its coordinator and devices were offline
    outer = [(f["time"], f["boundaries"]) for k, f in records if k == "outer_step" and f["outer_step"] > 0]
    assert any(30 < t < 60 and n == 1 for t, n in outer)  # outer steps went on with boundary a alone
    assert any(t > 60 and n == 2 for t, n in outer)  # and b is back in them after its restart
    after = [s for s in members.steps if s[0].endswith("/b") and s[1] >= 60]
    assert after and min(step for step in (s[1] for s in after)) >= 60
    assert sim.global_plane.finished


def test_cycling_devices_change_membership_only_at_window_edges():
    churn = ChurnConfig(mean_uptime_s=15, mean_downtime_s=5, cycling_fraction=0.5)
    sim, members, records = _run(churn, seconds=200, window=4)
    edges = [f for k, f in records if k == "membership_window"]
    assert any(e["joined"] for e in edges) and any(e["left"] for e in edges)
    assert len(sim.churn_log.online) > 6  # devices really left and came back
    assert_churn_invariants(members, sim.churn_log, edges)


def _heavy(churn: dict | None) -> RunConfig:
    run = small_run(
        budget={"tokens": 24_000},
        boundaries=[
            {
                "id": "b0",
                "devices": [
                    {"id": f"d{i}", "tokens_per_s": s} for i, s in enumerate((2000, 1500, 1000, 800))
                ],
            },
            {
                "id": "b1",
                "devices": [{"id": f"e{i}", "tokens_per_s": s} for i, s in enumerate((1800, 1200, 900, 700))],
            },
        ],
    )
    run["echelon"] = {**run["echelon"], "buffer_timeout_s": 1}
    run["budget"] = {"tokens": 24_000}  # the token budget alone (small_run's stops at 3 outer steps)
    if churn:
        run["churn"] = churn
    return RunConfig.model_validate(run)


@pytest.mark.slow
def test_heavy_churn_converges_within_a_margin_of_the_run_without_churn():
    """Half the devices cycle (up 0.3 s, down 0.1 s on average, a local round ~0.1-0.4 s), and one
    device of each boundary leaves for good mid-run, with the default fixed-membership windows."""
    from echelon.assembly import prepare
    from echelon.runner import build_simulation
    from echelon.strategies import effective_config

    heavy = {
        "mean_uptime_s": 0.3,
        "mean_downtime_s": 0.1,
        "cycling_fraction": 0.5,
        "departures": [{"at_s": 1.0, "device": "d1"}, {"at_s": 1.5, "device": "e2"}],
    }
    results = {}
    for label, churn in (("steady", None), ("churn", heavy)):
        cfg = effective_config(_heavy(churn))
        assert cfg.echelon.privacy.membership_window  # the windows are on by default
        prep = prepare(cfg)
        members, records = Members(), []
        emit = records.append
        sim = build_simulation(cfg, prep, lambda k, f, emit=emit: emit((k, f)), observer=members)
        log = ChurnLog(sim)
        sim.run(cfg.budget)
        assert sim.global_plane.finished
        loss = prep.trainer.evaluate(sim.global_plane.theta_g, 32, 16)
        results[label] = (loss, members, log, [f for k, f in records if k == "membership_window"])
    (steady, *_), (churned, members, log, edges) = results["steady"], results["churn"]
    # The stated margin: within 3% of the validation loss of the same run without churn.
    assert churned <= 1.03 * steady, (churned, steady)
    assert len(log.online) >= 20  # half the devices really cycled, many times
    assert any(e["left"] for e in edges) and any(e["joined"] for e in edges)
    assert_churn_invariants(members, log, edges)
    for device, left in (("d1", 1.0), ("e2", 1.5)):
        assert any(device in m for _, _, _, m in members.steps)
        assert all(opened < left for _, opened, _, m in members.steps if device in m)  # never after


def test_a_token_budget_is_not_overshot_while_the_final_outer_step_is_under_way():
    """The token budget is reached and the final outer step takes long (a 3 s WAN link each way;
    a stalled SecAgg+ round holds it the same way): no local round starts once the budget is
    spent, so the run trains at most the rounds already under way (it trained 32,000 tokens of a
    12,000 budget before)."""
    budget, round_tokens = 12_000, 1000
    fleet = {"a": {"a0": 1000, "a1": 900, "a2": 800}, "b": {"b0": 1000, "b1": 700}}
    cfg = EchelonConfig(buffer_size=2, buffer_timeout_s=3, aggregation="plain", sync=SyncConfig(interval=2))
    started: list[int] = []  # the run's trained tokens when each local round started

    class Recorded(QuadraticTrainer):
        def local_round(self, device, reference, anchor=None):
            started.append(sim.tokens)
            return super().local_round(device, reference, anchor)

    trainer = Recorded(lambda d, r: torch.ones(DIM), lr=0.1, noise=0.01, tokens=lambda d: round_tokens)
    sim = protocol_sim(fleet, cfg, trainer, lambda kind, f: None, dim=DIM, wan_ms=3000)
    sim.run(BudgetConfig(tokens=budget))
    assert sim.global_plane.final_reason == "tokens" and sim.global_plane.finished
    assert max(started) < budget  # no round started after the budget was spent
    assert budget <= sim.tokens <= budget + sum(len(d) for d in fleet.values()) * round_tokens
