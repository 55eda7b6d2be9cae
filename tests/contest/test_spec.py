"""Contest files: validation errors name the file, the field and the fix; spaces and draws."""

from __future__ import annotations

import pytest
import yaml

from echelon.cli import main
from echelon.config import RunConfig
from echelon.contest.space import default_space, trial_settings
from echelon.contest.spec import load_contest
from echelon.errors import ConfigError
from echelon.strategies import STRATEGIES, get_strategy
from tests.helpers import small_run


def _contest(**overrides) -> dict:
    base = {k: v for k, v in small_run().items() if k not in ("name", "budget")}
    contest = {
        "base": base,
        "strategies": ["echelon", "fedavg"],
        "budgets": {"syncs": {"outer_steps": 1}},
        "seeds": 1,
        "pilot": {"tokens": 200, "trials": 2},
    }
    contest.update(overrides)
    return contest


def _write(tmp_path, contest: dict):
    path = tmp_path / "contest.yaml"
    path.write_text(yaml.safe_dump(contest, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"strategies": ["echelon", "fedavgg"]}, "strategies", "unknown strategy 'fedavgg'"),
        ({"budgetz": {}}, "budgetz", "unknown field"),
        ({"budgets": {}}, "budgets", "at least 1"),
        ({"budgets": {"t": {"tokens": 0}}}, "budgets.t.tokens", "greater than or equal to 1"),
        ({"budgets": {"t": {}}}, "budgets.t", "set at least one of"),
        ({"strategies": ["fedavg"]}, "reference", "add it to `strategies` or set `reference`"),
        (
            {"spaces": {"diloco": {"train.lr": [0.1]}}},
            "spaces",
            "'diloco' is not among the contest's strategies",
        ),
        ({"spaces": {"echelon": {"seed": [1, 2]}}}, "spaces", "set by the contest, not tuned"),
        ({"spaces": {"echelon": {"train.lr": [-1.0]}}}, "spaces.echelon.train.lr", "greater than 0"),
        ({"spaces": {"echelon": {"train.lrr": [0.1]}}}, "spaces.echelon.train.lrr", "unknown field"),
        (
            {"spaces": {"fedavg": {"echelon.outer.lr": [0.5, 0.7]}}},
            "spaces.fedavg.echelon.outer.lr",
            "strategy fedavg fixes this knob",
        ),
        (
            {"pilot": {"tokens": 200, "trials": 2, "search": "grid"}},
            "spaces.echelon (the default space)",
            "raise pilot.trials, or use search: random",
        ),
        ({"seeds": [1, 1]}, "seeds", "listed twice"),
        ({"pilot": {"trials": 2}}, "pilot.tokens", "required field is missing"),
        ({"base": "missing.yaml"}, "missing.yaml", "no such file"),
        ({"base": {"boundaries": []}}, "base.boundaries", "at least 1"),
        ({"stressors": {"churn": {"churn.mean_uptime_s": -1}}}, "stressors.churn", "greater than 0"),
        ({"stressors": {"churn": {"budget.tokens": 5}}}, "stressors", "set by the contest"),
        ({"stressors": {"churn": {}}}, "stressors", "set at least one run-file field"),
        ({"stressors": {"a b": {"churn.mean_uptime_s": 4}}}, "stressors", "stressor name 'a b'"),
    ],
)
def test_bad_contest_file_exits_2_naming_file_and_field(tmp_path, capsys, overrides, field, words):
    path = _write(tmp_path, _contest(**overrides))
    out = tmp_path / "out"
    code = main(["contest", str(path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert "contest.yaml" in err or "missing.yaml" in err
    assert field in err and words in err
    assert not out.exists()


def test_default_spaces_follow_the_strategy_fields():
    base = RunConfig.model_validate(small_run())
    for name, s in STRATEGIES.items():
        space = default_space(s, base)
        # base lr 0.003 x {1/3, 1, 3} for AdamW inner steps; x {10, 30, 100} for SCAFFOLD's SGD
        sgd = s.local == "scaffold"
        assert space["train.lr"] == ([0.03, 0.09, 0.3] if sgd else [0.001, 0.003, 0.009]), name
        # A knob the strategy fixes is never searched: every value would train the same run.
        assert ("echelon.proximal_mu" in space) == ("echelon.proximal_mu" not in s.fixes), name
        assert ("echelon.outer.lr" in space) == ("echelon.outer.lr" not in s.fixes), name
        assert ("echelon.sync.kappa" in space) == (s.cadence == "drift_aware"), name
        if "echelon.sync.interval" in space:
            assert space["echelon.sync.interval"] == [1, 2, 4]  # base H 2 x {1/2, 1, 2}
    assert "echelon.sync.interval" not in default_space(get_strategy("centralised"), base)
    # Boundaries of two devices with a quorum of two leave buffer_size nothing to tune.
    assert "echelon.buffer_size" not in default_space(get_strategy("echelon"), base)


def test_random_draws_are_seeded_distinct_and_grid_is_complete():
    space = {"a": [1, 2, 3], "b": [10, 20]}
    draws = trial_settings(space, "random", 4, 7, "echelon")
    assert draws == trial_settings(space, "random", 4, 7, "echelon")  # same seed, same draws
    assert len({(d["a"], d["b"]) for d in draws}) == 4
    assert draws != trial_settings(space, "random", 4, 8, "echelon")
    assert len(trial_settings(space, "random", 10, 0, "x")) == 6  # never more than the grid
    assert trial_settings(space, "grid", 6, 0, "x")[:2] == [{"a": 1, "b": 10}, {"a": 1, "b": 20}]
    with pytest.raises(ValueError, match=r"pilot\.trials is 5"):
        trial_settings(space, "grid", 5, 0, "x")


def test_quick_caps_seeds_and_trials_and_every_pilot_shares_the_token_budget(tmp_path):
    path = _write(tmp_path, _contest(seeds=4, pilot={"tokens": 300, "trials": 5, "run_seed": 9}))
    full, quick = load_contest(path), load_contest(path, quick=True)
    assert full.seeds == (0, 1, 2, 3) and quick.seeds == (0, 1)
    assert {len(t) for t in full.pilots.values()} == {5} and {len(t) for t in quick.pilots.values()} == {2}
    for trials in full.pilots.values():
        for t in trials:
            assert t.config.budget.tokens == 300 and t.config.budget.outer_steps is None
            assert t.config.seed == 9 and t.config.strategy == t.strategy
            assert t.config.name == f"{t.strategy}-{t.run_id}"
    # A grid larger than the trials is an error, except under --quick, which samples it.
    grid = _write(tmp_path, _contest(pilot={"tokens": 300, "trials": 3, "search": "grid"}))
    with pytest.raises(ConfigError, match="shrink the space"):
        load_contest(grid)
    assert {len(t) for t in load_contest(grid, quick=True).pilots.values()} == {2}
    finals = full.finals({"echelon": {"train.lr": 0.01}})
    assert [(f.budget, f.seed) for f in finals] == [("syncs", s) for s in range(4)]
    assert all(f.config.train.lr == 0.01 and f.config.budget.outer_steps == 1 for f in finals)


def test_churn_is_a_stressor_every_contestant_runs_under(tmp_path):
    from echelon.contest.spec import load_contest
    from echelon.strategies import effective_config

    base = _contest()["base"]
    base["churn"] = {
        "mean_uptime_s": 30.0,
        "cycling_fraction": 0.5,
        "joins": [{"at_s": 5.0, "boundary": "b0", "device": {"id": "late", "tokens_per_s": 900}}],
        "departures": [{"at_s": 8.0, "device": "d1"}],
        "outages": [{"boundary": "b1", "at_s": 3.0, "duration_s": 4.0}],
    }
    contest = load_contest(
        _write(tmp_path, _contest(base=base, strategies=list(STRATEGIES), reference="echelon"))
    )
    for final in contest.finals({s: {} for s in STRATEGIES}):
        eff = effective_config(final.config)
        churn = eff.churn
        if get_strategy(final.config.strategy).topology == "centralised":
            assert churn.mean_uptime_s is None and not churn.outages  # one pooled worker does not churn
            continue
        assert churn.mean_uptime_s == 30.0 and churn.departures[0].device == "d1"
        boundaries = {b.id for b in eff.boundaries}
        assert all(o.boundary in boundaries for o in churn.outages)  # in each topology's own terms
        assert churn.joins[0].boundary in boundaries | {"late"}


def test_each_stressor_is_a_comparison_of_every_budget_tuned_on_the_base(tmp_path):
    stress = {"churn.mean_uptime_s": 4, "churn.mean_downtime_s": 1, "network.wan.latency_ms": 200}
    budgets = {"syncs": {"outer_steps": 1}, "tokens": {"tokens": 500}}
    contest = load_contest(_write(tmp_path, _contest(budgets=budgets, stressors={"hostile": stress})))
    assert list(contest.comparisons()) == ["syncs", "tokens", "syncs/hostile", "tokens/hostile"]
    for trials in contest.pilots.values():  # pilots tune on the base
        assert all(t.config.churn.mean_uptime_s is None for t in trials)
    finals = contest.finals({"echelon": {"train.lr": 0.01}, "fedavg": {}})
    assert len(finals) == 2 * 4 and len({f.run_id for f in finals}) == 8
    for f in finals:
        stressed = f.budget.endswith("/hostile")
        assert (f.config.churn.mean_uptime_s == 4) is stressed
        assert (f.config.network.wan.latency_ms == 200) is stressed
        assert f.settings == ({"train.lr": 0.01} if f.strategy == "echelon" else {})
        assert f.config.budget.outer_steps == (1 if f.budget.startswith("syncs") else None)
