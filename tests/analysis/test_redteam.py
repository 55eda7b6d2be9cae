"""The privacy red-team: each attack's precondition and score, the audit check of the view, and
`echelon redteam RUN` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from echelon.analysis.redteam import (
    Aggregate,
    AttackStats,
    Recorder,
    check_view_against_audit,
    difference_of_sums,
    membership,
    small_cohort,
)
from echelon.cli import main
from echelon.config import RunConfig
from echelon.errors import UserError
from tests.helpers import small_run

G = torch.Generator().manual_seed(0)
U1, U2, U3 = (torch.randn(64, generator=G) for _ in range(3))


def test_small_cohort_recovers_a_lone_update_and_needs_a_small_count():
    alone = Aggregate(U1.clone(), steps=1, count=1, bound=2, truth={"d1": U1})
    pair = Aggregate(U1 + U2, steps=1, count=2, bound=2, truth={"d1": U1, "d2": U2})
    tried, blind = small_cohort([alone, pair], k=1)
    assert tried == [pytest.approx(1.0), None] and blind == [False, False]  # the bound alone says 2
    (score,) = small_cohort([pair], k=2)[0]  # a pair is still close to each member, but not equal
    assert 0.5 < score < 0.9


def test_small_cohort_without_metadata_still_falls_on_a_buffer_of_one():
    # Counts hidden (the estimate says 3) but the run file's buffer of one bounds every middle step.
    alone = Aggregate(U1.clone(), steps=1, count=1, bound=1, truth={"d1": U1})
    assert small_cohort([alone], k=1) == ([pytest.approx(1.0)], [True])


def test_difference_of_sums_needs_adjacent_counts_differing_by_one():
    # d1's update persists between rounds (non-IID data): the difference isolates d2's.
    drifted = U1 + 0.05 * U3
    a = Aggregate((U1 + U2) / 2, steps=1, count=2, bound=2, truth={"d1": U1 / 2, "d2": U2 / 2})
    b = Aggregate(drifted, steps=1, count=1, bound=2, truth={"d1": drifted})
    (score,), blind = difference_of_sums([a, b])
    assert score > 0.95 and blind == [False]  # equal bounds: nothing to go on without the counts
    same = Aggregate((U1 + U3) / 2, steps=1, count=2, bound=2, truth={"d1": U1 / 2, "d3": U3 / 2})
    assert difference_of_sums([a, same]) == ([None], [False])  # equal counts: an opportunity, no attempt
    longer = Aggregate(drifted, steps=2, count=1, bound=4, truth={"d1": drifted})
    assert difference_of_sums([a, longer]) == ([], [])  # different intervals are not compared


def test_success_is_counted_over_opportunities_and_chance_is_the_blind_rate():
    stats = AttackStats.of([None, 0.95, 0.5, None], [True, False, False, False], threshold=0.9)
    assert (stats.opportunities, stats.attempts) == (4, 2)
    assert stats.mean == pytest.approx(0.725) and stats.max == pytest.approx(0.95)
    assert stats.success_rate == 0.25 and stats.chance == 0.25


def _mc_config(counts: str) -> RunConfig:
    run = small_run()
    run["echelon"] = {**run["echelon"], "privacy": {"status_counts": counts}}
    return RunConfig.model_validate(run)


def _mc_view(contributors: list[int], tokens_per_step: list[int]) -> tuple[dict, dict]:
    statuses, total = [], 0
    for step, (c, t) in enumerate(zip(contributors, tokens_per_step, strict=True), start=1):
        total += t
        statuses.append({"middle_step": step, "contributors": c, "tokens_total": total})
    truth_members = [{"d0": 0, "d1": 0}, {"d0": 0}, {"d1": 0}]  # step 2 d0 alone, step 3 d1 alone
    truth = {"steps": {"b0": [{"middle_step": i + 1, "members": m} for i, m in enumerate(truth_members)]}}
    return {"statuses": {"b0": statuses}, "deltas": {}, "sums": [], "hashes": []}, truth


def test_membership_guess_uses_what_crossed_and_falls_to_the_prior_without_it():
    # b0's roster, fastest first, is d0 (2000 tokens/s), d1 (1000); buffer 2 is the prior's guess.
    exact, truth = _mc_view([2, 1, 1], [512, 256, 256])
    scores, prior = membership(_mc_config("exact"), exact, truth)
    assert scores == [1.0, 1.0, 0.0]  # a count of one: the faster device, right once of twice
    assert prior == [True, False, False]
    hidden, _ = _mc_view([2, 2, 2], [0, 512, 0])  # the quorum floor and whole-cohort token quanta
    scores, prior = membership(_mc_config("suppressed"), hidden, truth)
    assert scores == prior  # nothing per step to go on: chance


def test_a_view_that_the_audit_log_does_not_hold_is_refused(tmp_path):
    (tmp_path / "audit").mkdir()
    line = {
        "kind": "message",
        "direction": "in",
        "outcome": "received",
        "peer": "boundary.b0",
        "payload_sha256": "ab" * 32,
    }
    (tmp_path / "audit" / "global.jsonl").write_text(json.dumps(line) + "\n")
    assert check_view_against_audit({"hashes": [("boundary.b0", "ab" * 32)]}, tmp_path) == 1
    with pytest.raises(UserError, match="not this run's"):
        check_view_against_audit({"hashes": [("boundary.b0", "cd" * 32)]}, tmp_path)


@pytest.mark.slow
def test_redteam_command_attacks_a_run_recorded_or_replayed_alike(tmp_path, capsys):
    from echelon.runner import train
    from echelon.strategies import effective_config

    run = small_run(budget={"tokens": 3000})
    run["echelon"] = {**run["echelon"], "min_quorum": 1, "buffer_size": 1, "sync": {"interval": 1}}
    cfg = RunConfig.model_validate(run)
    train(cfg, tmp_path / "recorded", progress=False, observer=Recorder(effective_config(cfg)))
    train(cfg, tmp_path / "plain", progress=False)
    assert (tmp_path / "recorded" / "private" / "README.txt").is_file()
    outputs = []
    for name in ("recorded", "plain"):
        assert main(["redteam", str(tmp_path / name)]) == 0
        outputs.append(capsys.readouterr().out)
    assert "replaying" in outputs[1] and "replaying" not in outputs[0]
    table = [o[o.index("Table 14") :] for o in outputs]
    assert table[0] == table[1]  # the replay is the same run, bit for bit
    assert "matched to the global audit log" in outputs[0]
    assert main(["redteam", str(tmp_path / "nothing-here")]) == 2
    assert "not a finished run directory" in capsys.readouterr().err
