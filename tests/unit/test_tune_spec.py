"""Tune spec errors a user can make fail with a ConfigError naming the field, with no data and no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lakeray.errors import ConfigError
from lakeray.training.tune_spec import TuneSpec, load_tune_spec, resolve_tune_spec, trial_spec

REPO = Path(__file__).resolve().parents[2]

BASE = {"name": "base", "model": {"kind": "xgboost", "rounds": 50, "params": {"max_depth": 4}},
        "training_set": "t", "label": "label", "features": ["a", "b"], "split": {"kind": "hash", "column": "id"}}


def _tune(**overrides):
    body = {"name": "s", "train": BASE, "space": {"eta": {"loguniform": [0.01, 0.3]}}, **overrides}
    return body


def _error(body) -> str:
    with pytest.raises(ConfigError) as err:
        resolve_tune_spec(TuneSpec.parse(body, "t.yaml"), "t.yaml")
    return err.value.headline


@pytest.mark.parametrize(("space", "field", "words"), [
    ({"eta": {"uniform": [0.3, 0.1]}}, "space.eta", "empty"),
    ({"eta": {"uniform": [0.1, 0.1]}}, "space.eta", "empty"),
    ({"max_depth": {"int": [8, 3]}}, "space.max_depth", "empty"),
    ({"eta": {"loguniform": [0, 0.3]}}, "space.eta", "> 0"),
    ({"eta": {"loguniform": [-1, 0.3]}}, "space.eta", "> 0"),
    ({"max_depth": {"choice": []}}, "space.max_depth", "no options"),
    ({"eta": {"uniform": [0.1]}}, "space.eta", "[low, high]"),
    ({"eta": {"uniform": [0.1, 0.2], "choice": [1]}}, "space.eta", "exactly one"),
    ({"eta": {"between": [0.1, 0.2]}}, "space.eta.between", "Extra inputs"),
    ({"max_dpth": {"int": [3, 8]}}, "space.max_dpth", "unknown parameter"),
    ({"objective": {"choice": ["binary:hinge"]}}, "space.objective", "lakeray sets"),
    ({"rounds": {"uniform": [10, 100]}}, "space.rounds", "whole numbers"),
    # Values the space can draw but XGBoost refuses: caught before any trial, not in every trial.
    ({"subsample": {"uniform": [0.5, 1.5]}}, "space.subsample", "XGBoost refuses subsample=1.5"),
    ({"max_depth": {"choice": [4, "deep"]}}, "space.max_depth", "XGBoost refuses max_depth='deep'"),
])
def test_space_errors_name_the_field(space, field, words):
    headline = _error(_tune(space=space))
    assert headline.startswith(f"t.yaml: {field}") and words in headline, headline


def test_an_empty_space_and_unknown_top_level_keys_are_refused():
    assert "space: the space is empty" in _error(_tune(space={}))
    assert "samples" in _error(_tune(samples=3))  # extra="forbid": typo of num_samples


def test_a_metric_the_trainer_does_not_report_is_refused():
    assert "metric.name: unknown metric 'f1'" in _error(_tune(metric={"name": "f1"}))
    # rmse is an XGBoost metric, but the held-out evaluation (and so the registry) does not compute it.
    assert "metric: 'rmse' is not a metric the trials report" in _error(_tune(metric={"name": "rmse"}))
    torch = {**BASE, "model": {"kind": "torch", "rounds": 3}}
    assert "torch trainer is a binary classifier" in _error(_tune(train=torch, space={"learning_rate": {
        "loguniform": [1e-4, 1e-2]}}, metric={"name": "mae"}))


def test_a_budget_too_small_for_one_trial_and_a_grace_period_above_the_rounds_are_refused():
    assert "scheduler.grace_period: 80" in _error(_tune(scheduler={"grace_period": 80}))
    assert "time_budget_s: 5 s is too small for one trial" in _error(_tune(time_budget_s=5))
    two = {**BASE, "scaling": {"num_workers": 2}}
    assert "time_budget_s: 20 s is too small for one trial: a multi-worker" in _error(
        _tune(train=two, time_budget_s=20))
    assert "time_budget_s" in _error(_tune(time_budget_s=0))


def test_a_multi_worker_base_spec_is_a_valid_search():
    two = {**BASE, "scaling": {"num_workers": 2, "cpus_per_worker": 1}}
    setup = resolve_tune_spec(TuneSpec.parse(_tune(train=two, time_budget_s=60), "t.yaml"), "t.yaml")
    assert setup.base.scaling.num_workers == 2
    assert trial_spec(setup.base, {"eta": 0.1}, setup.report_every).scaling.num_workers == 2


def test_the_base_spec_path_is_relative_to_the_tune_spec(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(_tune(train="base.yaml")))
    setup = resolve_tune_spec(load_tune_spec(tmp_path / "tune.yaml"), str(tmp_path / "tune.yaml"))
    assert setup.base.name == "base" and setup.metric == "auc" and setup.mode == "max"
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(_tune(train="missing.yaml")))
    with pytest.raises(ConfigError, match="train: 'missing.yaml' does not exist"):
        resolve_tune_spec(load_tune_spec(tmp_path / "tune.yaml"), str(tmp_path / "tune.yaml"))


def test_the_example_tune_spec_resolves_from_the_checkout_and_the_package():
    for path in (REPO / "jobs/training/fraud_tune.yaml",
                 REPO / "platform/lakeray/examples/project/jobs/training/fraud_tune.yaml"):
        setup = resolve_tune_spec(load_tune_spec(path), str(path))
        assert setup.base.name == "fraud_xgboost" and setup.report_every == setup.tune.scheduler.grace_period
        assert setup.checkpoint_every % setup.report_every == 0


def test_a_trial_spec_merges_sampled_values():
    setup = resolve_tune_spec(TuneSpec.parse(_tune(space={"rounds": {"int": [10, 40]}, "eta": {"uniform": [0.1, 0.2]}}),
                                             "t.yaml"), "t.yaml")
    spec = trial_spec(setup.base, {"rounds": 30, "eta": 0.15}, setup.report_every)
    assert spec.model.rounds == 30 and spec.model.params == {"max_depth": 4, "eta": 0.15}
    assert spec.checkpoint_every == setup.report_every == 10 and setup.max_rounds == 40
