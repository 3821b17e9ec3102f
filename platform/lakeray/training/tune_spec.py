"""Tune specs: a train spec, a search space over its model, how to search; checked before any trial runs.

A ``TuneSpec`` (``jobs/training/*_tune.yaml``) names a base :class:`~lakeray.training.spec.TrainSpec`
(a path relative to the tune spec's own file, or the spec inline) and a search space over its model::

    space:
      max_depth: {int: [3, 10]}          # inclusive
      eta: {loguniform: [0.01, 0.3]}
      subsample: {uniform: [0.5, 1.0]}
      rounds: {choice: [100, 200]}

A key is a model field (``rounds``, ``seed``; torch also ``batch_size``, ``learning_rate``) or one of
the model's params (XGBoost's booster parameters; the torch module's keyword arguments). Every trial
trains ``base spec + sampled values`` with the same code as ``lakeray train``. :func:`resolve_tune_spec`
turns a spec into a :class:`TuneSetup` (the base spec with the search metric applied, a sample spec
validated) without touching data or Ray; every problem is a ConfigError naming the field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lakeray.errors import ConfigError
from lakeray.training.spec import MetricSpec, TrainSpec

__all__ = ["TuneSpec", "ParamRange", "SearchSpec", "SchedulerSpec", "TuneSetup", "load_tune_spec",
           "resolve_tune_spec", "trial_spec", "EVALUATED_METRICS", "MIN_TRIAL_BUDGET_S"]

# What the driver's held-out evaluation computes (training.evaluate.metrics_of): the best trial is
# scored and registered on these, so a search may only optimise one of them.
EVALUATED_METRICS = ("auc", "aucpr", "logloss", "error")

# The smallest time_budget_s a search can finish one trial in, [one worker, several workers]: the
# fixed start-up measured on 2 cores (bench/train_xgboost.py: a task ~5 s cold, a Ray Train worker
# group 17-21 s), plus rounds. A smaller budget would spend cluster time and register nothing.
MIN_TRIAL_BUDGET_S = (10, 30)

# XGBoost booster/task parameters a search may vary (xgboost.readthedocs.io, "XGBoost Parameters").
# XGBoost only warns about a name it does not know, and the search would then vary nothing: refuse it.
_XGB_PARAMS = frozenset({
    "eta", "learning_rate", "gamma", "min_split_loss", "max_depth", "min_child_weight", "max_delta_step",
    "subsample", "sampling_method", "colsample_bytree", "colsample_bylevel", "colsample_bynode", "lambda",
    "reg_lambda", "alpha", "reg_alpha", "scale_pos_weight", "grow_policy", "max_leaves", "max_bin",
    "num_parallel_tree", "max_cat_to_onehot", "max_cat_threshold", "booster", "rate_drop", "skip_drop",
    "sample_type", "normalize_type", "one_drop", "base_score", "tree_method", "multi_strategy"})
# Set by lakeray for every run (the spec's metric, the worker's threads and device).
_LAKERAY_SET = frozenset({"objective", "eval_metric", "nthread", "n_jobs", "device"})
_MODEL_FIELDS = {"xgboost": ("rounds", "seed"), "torch": ("rounds", "seed", "batch_size", "learning_rate")}
_INT_FIELDS = ("rounds", "seed", "batch_size")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ParamRange(_Model):
    """One dimension of the search space: exactly one of the keys."""

    uniform: list[float] | None = Field(None, description="[low, high]: a float drawn uniformly.")
    loguniform: list[float] | None = Field(None, description="[low, high], both > 0: uniform in log space.")
    int_: list[int] | None = Field(None, alias="int", description="[low, high]: an integer, both inclusive.")
    randint: list[int] | None = Field(None, description="Same as int: [low, high], both inclusive.")
    choice: list[Any] | None = Field(None, description="A list of values, one picked per trial.")

    @model_validator(mode="after")
    def _one_kind(self) -> ParamRange:
        given = [k for k in ("uniform", "loguniform", "int_", "randint", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, loguniform, int, randint, choice "
                             f"(got {', '.join(g.rstrip('_') for g in given) or 'none'})")
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice has no options: list at least one value")
            return self
        bounds = getattr(self, kind)
        if len(bounds) != 2:
            raise ValueError(f"{kind.rstrip('_')} takes [low, high], got {len(bounds)} value(s)")
        low, high = bounds
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{kind.rstrip('_')} bounds must be finite numbers")
        if low >= high:
            raise ValueError(f"{kind.rstrip('_')} range [{low}, {high}] is empty: low must be below high "
                             "(a fixed value belongs in the base train spec)")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform bound {low} must be > 0 (log of a non-positive number)")
        return self

    @property
    def kind(self) -> str:
        for k in ("uniform", "loguniform", "int_", "randint", "choice"):
            if getattr(self, k) is not None:
                return "int" if k in ("int_", "randint") else k
        raise AssertionError("validated")

    @property
    def bounds(self) -> list[Any]:
        return self.int_ if self.int_ is not None else self.randint if self.randint is not None else \
            self.uniform if self.uniform is not None else self.loguniform

    def low_sample(self) -> Any:
        """A value of the space (its low bound, or the first choice): what the sample spec is built from."""
        return self.choice[0] if self.choice is not None else self.bounds[0]

    def high_sample(self) -> Any:
        return self.choice[-1] if self.choice is not None else self.bounds[1]

    def tune_domain(self) -> Any:
        from ray import tune

        low, high = (self.bounds or [None, None])
        return {"uniform": lambda: tune.uniform(low, high), "loguniform": lambda: tune.loguniform(low, high),
                "int": lambda: tune.randint(low, high + 1),  # Tune's randint excludes high
                "choice": lambda: tune.choice(self.choice)}[self.kind]()


class SearchSpec(_Model):
    algorithm: Literal["random", "optuna"] = Field("random", description="random: independent draws; optuna: "
                                                    "Optuna's TPE sampler (the first 10 trials are random draws).")
    seed: int = Field(7, description="Seed of the sampler: the same seed draws the same configurations (optuna "
                      "after its first 10 trials also needs max_concurrent: 1, its later draws follow results).")


class SchedulerSpec(_Model):
    kind: Literal["asha", "none"] = Field("asha", description="asha: stop trials whose metric is in the worse "
                                          "part at each rung; none: every trial trains all its rounds.")
    grace_period: int = Field(10, ge=1, description="Rounds/epochs every trial gets before it can be stopped.")
    reduction_factor: float = Field(3, gt=1, description="At each rung (grace · factor^k rounds) the best "
                                    "1/factor of the trials go on.")
    max_rounds: int | None = Field(None, ge=1, description="The last rung (default: the most rounds a trial can "
                                   "get: the base spec's model.rounds, or the top of a `rounds` range).")


class TuneSpec(_Model):
    name: str = Field(description="The search's name: its folder <storage root>/tune_runs/<name> (what "
                      "`--resume` continues) and its MLflow parent run.")
    train: str | dict[str, Any] = Field(description="The base train spec: a path (relative to this file) or the "
                                        "spec inline. Each trial trains it with the sampled values.")
    space: dict[str, ParamRange] = Field(description="Search space: model field or model param → range.")
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    num_samples: int = Field(8, ge=1, description="Trials (configurations drawn).")
    max_concurrent: int | None = Field(None, ge=1, description="Trials running at once (default: as many as the "
                                       "cluster's CPUs hold; a local Ray counts its physical cores).")
    time_budget_s: float | None = Field(None, gt=0, description="Wall-clock budget of the search: trials still "
                                        "running then are stopped; the best finished trial is registered. At "
                                        "least 10 s (30 s with multi-worker trials): one trial's start-up.")
    metric: MetricSpec | None = Field(None, description="Metric to optimise (default: the base spec's).")
    report_every: int | None = Field(None, ge=1, description="Rounds between a trial's metric reports to Tune "
                                     "(default: the ASHA grace period, so every rung is a report; else the "
                                     "base spec's checkpoint_every).")
    checkpoint_every: int | None = Field(None, ge=1, description="Rounds between a trial's checkpoints (what a "
                                         "resumed search restarts an unfinished trial from; default: the base "
                                         "spec's checkpoint_every, rounded up to a multiple of report_every).")

    @field_validator("space")
    @classmethod
    def _space_not_empty(cls, value: dict[str, ParamRange]) -> dict[str, ParamRange]:
        if not value:
            raise ValueError("the space is empty: name at least one parameter to search")
        return value

    @classmethod
    def parse(cls, data: Any, where: str = "tune spec") -> TuneSpec:
        from lakeray.config import parse_spec

        return parse_spec(cls, data, where, "jobs/training/fraud_tune.yaml", 'fix the tune spec (docs/training.md, "Tuning")')


def load_tune_spec(path: str | os.PathLike[str]) -> TuneSpec:
    from lakeray.config import read_spec_file

    return TuneSpec.parse(read_spec_file(path, "tune spec", "jobs/training/fraud_tune.yaml"), str(path))


@dataclass(frozen=True)
class TuneSetup:
    """A tune spec resolved: its base train spec (search metric applied) and the numbers the search uses."""

    tune: TuneSpec
    where: str
    base: TrainSpec
    base_where: str
    metric: str  # the metric name (auc, logloss, ...)
    mode: str  # max | min
    report_every: int
    checkpoint_every: int
    max_rounds: int

    @property
    def metric_key(self) -> str:
        """What a trial reports to Tune: the validation metric the trainer computes."""
        return f"valid_{self.metric}"


def trial_spec(base: TrainSpec, config: dict[str, Any], report_every: int) -> TrainSpec:
    """The base spec with one trial's sampled values: model fields set, the rest merged into model.params."""
    model = base.model.model_dump()
    fields = _MODEL_FIELDS[base.model.kind]
    params = dict(model["params"])
    for key, value in config.items():
        if key in fields:
            model[key] = int(value) if key in _INT_FIELDS else value
        else:
            params[key] = value.item() if hasattr(value, "item") else value
    model["params"] = params
    return base.model_copy(update={"model": type(base.model).model_validate(model),
                                   "checkpoint_every": report_every})


def resolve_tune_spec(tune: TuneSpec, where: str = "tune spec") -> TuneSetup:
    """The base spec loaded and checked with the space (no data read, no Ray): ConfigError naming the field."""
    base, base_where = _base_spec(tune, where)
    floor = MIN_TRIAL_BUDGET_S[base.scaling.num_workers > 1]
    if tune.time_budget_s is not None and tune.time_budget_s < floor:
        raise ConfigError(f"{where}: time_budget_s: {tune.time_budget_s:g} s is too small for one trial: a "
                          f"{'multi' if base.scaling.num_workers > 1 else 'one'}-worker trial's start-up alone "
                          f"takes up to {floor} s here", f"give time_budget_s ≥ {floor}, or leave it out")
    if tune.metric is not None:
        try:
            base = TrainSpec.parse({**base.model_dump(mode="json"), "metric": tune.metric.model_dump(mode="json")},
                                   where)
        except ConfigError as exc:
            raise ConfigError(exc.headline.replace(f"{where}: metric", f"{where}: metric (with the base spec)"),
                              exc.fix) from None
    metric_field = "metric" if tune.metric is not None else "train: metric"
    if base.metric.name not in EVALUATED_METRICS:
        raise ConfigError(f"{where}: {metric_field}: {base.metric.name!r} is not a metric the trials report and "
                          "the held-out evaluation computes", f"optimise one of {', '.join(EVALUATED_METRICS)}")
    kind = base.model.kind
    fields = _MODEL_FIELDS[kind]
    for key in tune.space:
        if key in _LAKERAY_SET:
            raise ConfigError(f"{where}: space.{key}: lakeray sets {key} for every run (metric, threads, device)",
                              "drop it from the space; the metric is set with `metric:`")
        if kind == "xgboost" and key not in fields and key not in _XGB_PARAMS:
            raise ConfigError(f"{where}: space.{key}: unknown parameter for an xgboost model",
                              f"use a model field ({', '.join(fields)}) or an XGBoost parameter such as "
                              "max_depth, eta, subsample, colsample_bytree, min_child_weight, lambda, alpha")
        if key in _INT_FIELDS and key in fields:
            rng = tune.space[key]
            values = rng.choice if rng.choice is not None else rng.bounds
            if rng.kind in ("uniform", "loguniform") or not all(isinstance(v, int) and v >= 1 for v in values):
                raise ConfigError(f"{where}: space.{key}: {key} takes whole numbers ≥ 1", "use int or choice "
                                  "with whole numbers")
    # Both ends of the space must make a valid spec (torch: the module must take the params).
    for pick in ("low_sample", "high_sample"):
        sample = {k: getattr(r, pick)() for k, r in tune.space.items()}
        try:
            spec = trial_spec(base, sample, base.checkpoint_every)
        except (ValidationError, ValueError) as exc:
            raise ConfigError(f"{where}: space: the value(s) {sample} do not make a valid train spec ({exc})",
                              "narrow the space to values the model accepts") from None
        if kind == "torch":
            from lakeray.training.torch_trainer import validate_torch_spec

            validate_torch_spec(spec, f"{where}: space sample {sample} with {base_where}")
    if kind == "xgboost":
        _check_xgboost_values(base, tune, where)
    rounds = tune.space.get("rounds")
    top_rounds = int(rounds.high_sample() if rounds and rounds.choice is None else
                     max(rounds.choice) if rounds else base.model.rounds)
    sched = tune.scheduler
    max_rounds = sched.max_rounds or top_rounds
    if sched.kind == "asha" and sched.grace_period > max_rounds:
        raise ConfigError(f"{where}: scheduler.grace_period: {sched.grace_period} is above the {max_rounds} "
                          "rounds a trial trains", "lower grace_period (ASHA's first rung)")
    report_every = tune.report_every or (sched.grace_period if sched.kind == "asha" else base.checkpoint_every)
    checkpoint_every = tune.checkpoint_every or base.checkpoint_every
    checkpoint_every = -(-checkpoint_every // report_every) * report_every  # a report round, so it is saved
    return TuneSetup(tune, where, base, base_where, base.metric.name, base.metric.direction, report_every,
                     checkpoint_every, max_rounds)


def _base_spec(tune: TuneSpec, where: str) -> tuple[TrainSpec, str]:
    if isinstance(tune.train, dict):
        return TrainSpec.parse(tune.train, f"{where}: train"), where
    folder = os.path.dirname(os.path.abspath(where)) if os.path.isfile(where) else os.getcwd()
    path = tune.train if os.path.isabs(tune.train) else os.path.join(folder, tune.train)
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: train: {tune.train!r} does not exist (looked for {path})",
                          "give a path relative to the tune spec's folder, or the train spec inline")
    from lakeray.config import read_spec_file

    return TrainSpec.parse(read_spec_file(path, "train spec", "fraud_xgboost.yaml"), path), path


def _check_xgboost_values(base: TrainSpec, tune: TuneSpec, where: str) -> None:
    """Each end of every param's range (each option of a choice) goes through XGBoost once, one round on
    four rows: a value XGBoost refuses (``subsample: 1.5``, ``max_depth: -1``, a string) fails here,
    naming the field, instead of failing every trial that draws it after the cluster started."""
    import numpy as np
    import xgboost

    data = xgboost.DMatrix(np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 1.0]], dtype=np.float32),
                           label=np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float32))
    fields = _MODEL_FIELDS["xgboost"]
    for key, rng in tune.space.items():
        if key in fields:
            continue  # rounds and seed: checked by the spec model
        values = rng.choice if rng.choice is not None else rng.bounds
        for value in values:
            params = {"objective": "binary:logistic", "tree_method": "hist", **base.model.params, key: value,
                      "eval_metric": base.metric.name, "nthread": 1, "device": "cpu"}
            try:
                xgboost.train(params, data, num_boost_round=1)
            except (xgboost.core.XGBoostError, ValueError, TypeError) as exc:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"{where}: space.{key}: XGBoost refuses {key}={value!r} ({reason})",
                                  "narrow the range to values XGBoost accepts (xgboost.readthedocs.io, "
                                  "\"XGBoost Parameters\")") from None
