"""Contest files: which strategies meet, on which base run, tuned how, under which budgets.

A contest file (YAML):

    base: run.yaml              # a run file (relative to the contest file) or an inline run;
                                # its strategy, seed and budget are the contest's to set
    strategies: [echelon, fedavg, diloco]   # default: every registered strategy
    reference: echelon          # the relative table compares every strategy with this one
    budgets:                    # each is a separate budget-matched comparison of the finals;
      tokens: {tokens: 40000}   # a budget with several fields stops at the first reached
      bytes: {cross_boundary_bytes: 3000000}
      time: {virtual_seconds: 12}
      syncs: {outer_steps: 10}
    seeds: 3                    # final seeds: a count (0, 1, 2) or a list
    target_loss: 4.6            # time-to-target threshold (validation loss)
    pilot:
      tokens: 20000             # training tokens of each pilot run
      trials: 4                 # pilot runs per strategy, at most: the same budget for all
      search: random            # or grid (the whole product; it must fit in `trials`)
      seed: 0                   # seed of the random search's draws
      run_seed: 100             # seed of the pilot runs (default: the base run's); pick one
                                # outside `seeds` so the finals do not rerun a tuned seed
      tie_tolerance: 0.0        # pilot losses this close count as tied (fewer bytes wins)
    spaces:                     # a strategy's whole search space; default: `space.default_space`
      diloco: {train.lr: [0.001, 0.003], echelon.outer.lr: [0.5, 0.7]}
    stressors:                  # optional: every budget is compared once on the base and once
      churn:                    # under each stressor (run-file fields set on the base for the
        churn.mean_uptime_s: 4  # finals; pilots tune on the base, as a user tunes before
        churn.mean_downtime_s: 1  # the fleet misbehaves): a comparison named `tokens/churn`

`load_contest` validates the file and every pilot's run config, so mistakes surface as a
ConfigError (file, field, fix) before anything trains.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from echelon.analysis.sweep import GRID_KEY, OnBaseRun, apply_point, run_id
from echelon.config import BudgetConfig, RunConfig, Strict, load_run
from echelon.contest.space import Space, default_space, describe, trial_settings
from echelon.errors import ConfigError
from echelon.strategies import STRATEGIES, effective_config, get_strategy
from echelon.yamlio import load_model, validation_problems

BUDGET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
# Fields the contest sets itself: never part of a search space.
RESERVED = ("name", "seed", "strategy", "budget")
QUICK_SEEDS = 2
QUICK_TRIALS = 2


class PilotConfig(Strict):
    """The tuning budget: up to `trials` pilot runs of `tokens` training tokens per strategy."""

    tokens: int = Field(ge=1, description="training tokens of each pilot run")
    trials: int = Field(4, ge=1, description="pilot runs per strategy, at most")
    search: Literal["random", "grid"] = "random"
    seed: int = Field(0, description="seed of the random search's draws")
    run_seed: int | None = Field(None, description="seed of the pilot runs; default: the base run's seed")
    tie_tolerance: float = Field(0.0, ge=0, description="pilot losses this close are tied")


class ContestFile(OnBaseRun):
    """The contest file's fields (see the module docstring)."""

    strategies: list[str] | None = Field(None, min_length=1, description="default: every registered strategy")
    reference: str = Field("echelon", validate_default=True)
    budgets: dict[str, BudgetConfig] = Field(min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    target_loss: float | None = Field(None, gt=0)
    pilot: PilotConfig
    spaces: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    stressors: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, names: list[str] | None) -> list[str] | None:
        for name in names or []:
            if name not in STRATEGIES:
                raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
        if names is not None and len(set(names)) != len(names):
            raise ValueError("a strategy is listed twice")
        return names

    @field_validator("budgets")
    @classmethod
    def _budget_names(cls, budgets: dict[str, BudgetConfig]) -> dict[str, BudgetConfig]:
        for name in budgets:
            if not BUDGET_NAME.match(name):
                raise ValueError(f"budget name {name!r}: use letters, digits, - and _ (e.g. tokens, bytes)")
        return budgets

    @field_validator("seeds", mode="before")
    @classmethod
    def _count_or_list(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("give a seed count of at least 1, or a list of seeds")
            return list(range(value))
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("a seed is listed twice")
        return seeds

    @field_validator("spaces")
    @classmethod
    def _knob_paths(cls, spaces: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for strategy, space in spaces.items():
            for knob, values in space.items():
                where = f"{strategy}.{knob}"
                _check_field(where, knob)
                if not values:
                    raise ValueError(f"{where}: give at least one value")
                if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                    raise ValueError(f"{where}: a value is listed twice")
        return spaces

    @field_validator("stressors")
    @classmethod
    def _stressor_fields(cls, stressors: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, fields in stressors.items():
            if not BUDGET_NAME.match(name):
                raise ValueError(f"stressor name {name!r}: use letters, digits, - and _ (e.g. churn, wan200)")
            if not fields:
                raise ValueError(f"{name}: set at least one run-file field, e.g. churn.mean_uptime_s: 4")
            for knob in fields:
                _check_field(f"{name}.{knob}", knob)
        return stressors

    @field_validator("reference")
    @classmethod
    def _reference_competes(cls, reference: str, info: ValidationInfo) -> str:
        names = _contestants(info)
        if names is not None and reference not in names:
            raise ValueError(
                f"{reference!r} is not among the strategies ({', '.join(names)}); "
                "add it to `strategies` or set `reference` to one of them"
            )
        return reference

    @field_validator("spaces")
    @classmethod
    def _spaces_of_contestants(
        cls, spaces: dict[str, dict[str, list[Any]]], info: ValidationInfo
    ) -> dict[str, dict[str, list[Any]]]:
        names = _contestants(info)
        for strategy in spaces:
            if names is not None and strategy not in names:
                raise ValueError(
                    f"{strategy!r} is not among the contest's strategies ({', '.join(names)}); "
                    "remove its space or add it to `strategies`"
                )
        return spaces


def _check_field(where: str, knob: str) -> None:
    """ValueError (naming `where`) unless `knob` is a dotted run-file field the contest leaves to
    its file: a search space's knob or a stressor's field."""
    if not GRID_KEY.match(knob):
        raise ValueError(f"{where}: not a dotted run-file field such as train.lr")
    if knob.split(".")[0] in RESERVED:
        raise ValueError(f"{where}: {', '.join(RESERVED)} are set by the contest, not tuned or stressed")


def _contestants(info: ValidationInfo) -> list[str] | None:
    """The strategies of the contest being validated (None when `strategies` itself was invalid)."""
    if "strategies" not in info.data:
        return None
    names = info.data["strategies"]
    return list(STRATEGIES) if names is None else names


@dataclass(frozen=True)
class Trial:
    """One pilot run: its strategy, trial index, knob settings, run id and run config."""

    strategy: str
    index: int
    settings: dict[str, Any]
    run_id: str
    config: RunConfig


@dataclass(frozen=True)
class FinalRun:
    """One final run: strategy, comparison (`Contest.comparisons`), seed, the chosen settings, run
    id and config."""

    strategy: str
    budget: str
    seed: int
    settings: dict[str, Any]
    run_id: str
    config: RunConfig


@dataclass(frozen=True)
class Contest:
    """A validated contest: the file, its base run, and every strategy's space and pilot trials."""

    path: Path
    spec: ContestFile
    base: RunConfig
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    trials: int
    pilot_seed: int
    quick: bool
    spaces: dict[str, Space]
    space_source: dict[str, Literal["default", "contest file"]]
    pilots: dict[str, list[Trial]]

    def comparisons(self) -> dict[str, tuple[BudgetConfig, dict[str, Any]]]:
        """Each budget-matched comparison by name: every budget on the base (`tokens`), then every
        budget under every stressor (`tokens/churn`), with its limits and the run-file fields the
        stressor sets."""
        out = {b: (limits, {}) for b, limits in self.spec.budgets.items()}
        for stressor, fields in self.spec.stressors.items():
            out |= {f"{b}/{stressor}": (limits, fields) for b, limits in self.spec.budgets.items()}
        return out

    def finals(self, chosen: dict[str, dict[str, Any]]) -> list[FinalRun]:
        """Every final run for the strategies in `chosen` (strategy -> settings): comparison x seed."""
        runs = []
        for strategy in self.strategies:
            if strategy not in chosen:
                continue
            for name, (limits, stress) in self.comparisons().items():
                for seed in self.seeds:
                    settings = {**chosen[strategy], **stress}
                    cfg = make_config(self.base, self.path, strategy, settings, limits, seed)
                    runs.append(FinalRun(strategy, name, seed, chosen[strategy], run_id(cfg), cfg))
        return runs


def make_config(
    base: RunConfig,
    contest_path: Path,
    strategy: str,
    settings: dict[str, Any],
    budget: BudgetConfig,
    seed: int,
) -> RunConfig:
    """`base` with `strategy`, knob `settings`, `budget` and `seed`, named `<strategy>-<run id>`
    (a `+` in the strategy's name becomes `_`: run names are identifiers).

    Raises pydantic's ValidationError when the result is not a valid run.
    """
    limits = budget.model_dump(mode="json", exclude_none=True)
    values = {"strategy": strategy, **settings, "budget": limits, "seed": seed}
    cfg = RunConfig.model_validate(
        apply_point(base.model_dump(mode="json"), values), context={"base_dir": contest_path.resolve().parent}
    )
    return cfg.model_copy(update={"name": f"{strategy[:51].replace('+', '_')}-{run_id(cfg)}"})


def _load_base(path: Path, spec: ContestFile) -> RunConfig:
    if isinstance(spec.base, Path):
        return load_run(spec.base)
    first = next(iter(spec.budgets.values())).model_dump(mode="json", exclude_none=True)
    data = {"name": "contest", "budget": first, **spec.base}
    try:
        return RunConfig.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as e:
        raise ConfigError(str(path), [(f"base.{f}", m) for f, m in validation_problems(e)]) from None


def _check_space(contest_path: Path, base: RunConfig, strategy: str, space: Space, field: str) -> None:
    """Every value of every knob gives a valid run, and a knob with several values changes the run
    the strategy actually trains (a knob the strategy fixes cannot be tuned)."""
    base_dict = base.model_dump(mode="json")
    ctx = {"base_dir": contest_path.resolve().parent}
    for knob, values in space.items():
        effective = set()
        for value in values:
            try:
                cfg = RunConfig.model_validate(
                    apply_point(base_dict, {"strategy": strategy, knob: value}), context=ctx
                )
            except ValidationError as e:
                problems = [
                    (f"{field}.{knob}", f"value {json.dumps(value)} makes {f} invalid: {m}")
                    for f, m in validation_problems(e)
                ]
                raise ConfigError(str(contest_path), problems) from None
            except ValueError as e:
                raise ConfigError(str(contest_path), [(f"{field}.{knob}", str(e))]) from None
            eff = effective_config(cfg).model_dump(mode="json")
            effective.add(json.dumps(eff, sort_keys=True))
        if len(values) > 1 and len(effective) == 1:
            raise ConfigError(
                str(contest_path),
                [
                    (
                        f"{field}.{knob}",
                        f"strategy {strategy} fixes this knob (every value trains the same run); "
                        "remove it from the space",
                    )
                ],
            )


def load_contest(path: str | Path, *, quick: bool = False) -> Contest:
    """Read and validate a contest file and expand each strategy's pilot trials.

    `quick` keeps at most the first QUICK_SEEDS seeds and QUICK_TRIALS pilot trials per strategy
    (a grid larger than that is sampled at random instead). Every problem is a ConfigError naming
    the contest file and the field.
    """
    p = Path(path)
    spec = load_model(p, ContestFile, context={"base_dir": p.resolve().parent})
    base = _load_base(p, spec)
    strategies = tuple(spec.strategies if spec.strategies is not None else STRATEGIES)
    seeds = tuple(spec.seeds[:QUICK_SEEDS] if quick else spec.seeds)
    trials = min(spec.pilot.trials, QUICK_TRIALS) if quick else spec.pilot.trials
    spaces: dict[str, Space] = {}
    source: dict[str, Literal["default", "contest file"]] = {}
    pilots: dict[str, list[Trial]] = {}
    pilot_budget = BudgetConfig(tokens=spec.pilot.tokens)
    pilot_seed = base.seed if spec.pilot.run_seed is None else spec.pilot.run_seed
    for strategy in strategies:
        given = strategy in spec.spaces
        spaces[strategy] = spec.spaces[strategy] if given else default_space(get_strategy(strategy), base)
        source[strategy] = "contest file" if given else "default"
        field = f"spaces.{strategy}" if given else f"spaces.{strategy} (the default space)"
        _check_space(p, base, strategy, spaces[strategy], field)
        try:
            settings = trial_settings(spaces[strategy], spec.pilot.search, trials, spec.pilot.seed, strategy)
        except ValueError as e:
            if not quick:
                raise ConfigError(str(p), [(field, str(e))]) from None
            settings = trial_settings(spaces[strategy], "random", trials, spec.pilot.seed, strategy)
        pilots[strategy] = []
        for i, s in enumerate(settings):
            try:
                cfg = make_config(base, p, strategy, s, pilot_budget, pilot_seed)
            except ValidationError as e:
                problems = [
                    (f"{field} (trial {describe(s)})", f"{f}: {m}") for f, m in validation_problems(e)
                ]
                raise ConfigError(str(p), problems) from None
            pilots[strategy].append(Trial(strategy, i, s, run_id(cfg), cfg))
        for stressor, fields in spec.stressors.items():
            try:
                make_config(base, p, strategy, fields, pilot_budget, pilot_seed)
            except ValidationError as e:
                problems = [(f"stressors.{stressor}", f"{f}: {m}") for f, m in validation_problems(e)]
                raise ConfigError(str(p), problems) from None
            except ValueError as e:
                raise ConfigError(str(p), [(f"stressors.{stressor}", f"with {strategy}: {e}")]) from None
    return Contest(p, spec, base, strategies, seeds, trials, pilot_seed, quick, spaces, source, pilots)
