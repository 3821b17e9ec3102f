"""The registry side of training: plots, input example and lineage tags in MLflow; the promotion gate
(champion moves only to a strictly better challenger on the same held-out rows, the comparison
recorded on both versions, --force); lineage down to the exact table versions and the feature job's
code version; `lakeray models list|show|lineage|promote`.

Two short trainings (one worker, 20 rounds and 1 round) on a small demo training set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import REPO

pytestmark = [pytest.mark.spark, pytest.mark.ray]

MODEL = "registry_test"


def _spec(name: str, features: Any, rounds: int, params: dict[str, Any]):
    from lakeray.training.spec import TrainSpec

    return TrainSpec.parse({
        "name": name, "model": {"kind": "xgboost", "rounds": rounds, "params": params},
        "training_set": "fraud_training_set", "label": "is_fraud", "features": features,
        "split": {"kind": "hash", "column": "transaction_id", "fraction": 0.2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False}, "checkpoint_every": 10,
        "metric": {"name": "auc"}, "registry": {"model_name": MODEL, "alias": "challenger"}})


@dataclass
class Story:
    source_version: int
    feature: Any  # FeatureRunResult of customer_aggregates
    built: Any  # TrainingSetResult
    good: Any  # TrainReport, v1
    bad: Any  # TrainReport, v2
    first: Any  # PromotionResult: v1 becomes champion (there was none)
    refused_cli: Any  # CliRunner result of `models promote` refusing v2
    forced: Any  # PromotionResult: v2 forced


def _invoke(settings, *args: str):
    from lakeray.cli.main import cli

    env = {"LAKERAY_STORAGE__ROOT": settings.profile.storage.root, "COLUMNS": "250", "LAKERAY_DEBUG": None,
           "LAKERAY_PROFILE": None, "LAKERAY_CONFIG": None}
    return CliRunner().invoke(cli, ["--config", str(REPO / "lakeray.yaml"), "--profile", "local", *args], env=env)


@pytest.fixture(scope="module")
def story(spark, settings, ray_handle) -> Story:
    from lakeray.demo import build_demo_training_set
    from lakeray.features.runner import run_feature_job
    from lakeray.features.synthetic import generate_transactions
    from lakeray.lakehouse.delta import write_table
    from lakeray.training.api import train
    from lakeray.training.promotion import promote

    source = write_table(generate_transactions(spark, 20_000, seed=5), settings.table_path("transactions"))
    feature = run_feature_job(spark, settings, "customer_aggregates")
    built, _ = build_demo_training_set(spark, settings, source, feature.version)
    good = train(settings, _spec("registry_good", {"all_except": ["customer_id"]}, 20, {"max_depth": 4}))
    first = promote(settings, MODEL)
    # One round of one split on a feature without signal: strictly worse on any reasonable sample.
    bad = train(settings, _spec("registry_bad", ["cust_txn_count_7d"], 1, {"max_depth": 1}))
    refused_cli = _invoke(settings, "models", "promote", MODEL, "--json")
    forced = promote(settings, MODEL, force=True)
    return Story(source, feature, built, good, bad, first, refused_cli, forced)


def _client(settings):
    from lakeray.registry import mlflow_client

    return mlflow_client(settings)


def _promotion_tags(settings, version: int) -> list[dict[str, Any]]:
    from lakeray.training.lineage import PROMOTION_TAG

    tags = _client(settings).get_model_version(MODEL, str(version)).tags
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(PROMOTION_TAG)]


def test_run_logs_plots_lineage_and_a_model_that_predicts_named_columns(settings, story):
    import mlflow.pyfunc
    import numpy as np

    client = _client(settings)
    run = client.get_run(story.good.model.run_id)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {f"plots/{n}.png" for n in ("learning_curve", "feature_importance", "roc_curve", "pr_curve")}
    tags = run.data.tags
    assert tags["lakeray.input"] == f"fraud_training_set@{story.built.version}"
    assert json.loads(tags["lakeray.inputs"]) == story.built.inputs
    assert json.loads(tags["lakeray.code_versions"]) == {"customer_aggregates": story.feature.code_version}
    assert tags["lakeray.manifest"] == f"_manifests/fraud_training_set/v{story.built.version}.json"
    root = str(settings.storage_root)
    assert not [k for k, v in tags.items() if k.startswith("lakeray.") and root in v], "absolute paths in tags"
    # The input example is real held-out rows with the feature names; pyfunc scores a DataFrame like the booster.
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{story.good.model.version}")
    example = model.input_example
    assert list(example.columns) == story.good.outcome.plan.features and len(example) == 5
    assert not np.all(example.to_numpy() == 0)
    scores = model.predict(example.astype("float64"))
    expected = story.good.outcome.model.inplace_predict(example.to_numpy(dtype=np.float32))
    np.testing.assert_allclose(np.asarray(scores).reshape(-1), expected, rtol=1e-6)


def test_first_promotion_makes_the_challenger_champion(settings, story):
    assert story.first.decision == "first champion" and story.first.promoted and story.first.champion is None
    assert story.first.challenger.version == story.good.model.version
    # Scored on the same rows as at training time: the same number as the run's own evaluation.
    assert story.first.challenger.value == pytest.approx(story.good.metric, abs=1e-9)
    assert story.first.rows == story.good.outcome.valid_rows
    records = _promotion_tags(settings, story.good.model.version)
    assert records[0]["decision"] == "first champion" and records[0]["champion"] is None


def test_a_worse_challenger_is_refused_and_the_comparison_is_on_both_versions(settings, story):
    from lakeray.training.promotion import PromotionRefused

    result = story.refused_cli
    assert result.exit_code == 1 and isinstance(result.exception, PromotionRefused)
    body = json.loads(result.stdout)
    assert body["decision"] == "refused" and not body["promoted"]
    good_v, bad_v = story.good.model.version, story.bad.model.version
    assert body["challenger"]["version"] == bad_v and body["champion"]["version"] == good_v
    # Both on the challenger's held-out rows: each equals that model's own held-out figure (same split).
    assert body["challenger"]["value"] == pytest.approx(story.bad.metric, abs=1e-9)
    assert body["champion"]["value"] == pytest.approx(story.good.metric, abs=1e-9)
    assert body["challenger"]["value"] < body["champion"]["value"]
    headline = result.exception.headline
    assert f"{body['challenger']['value']:.4f}" in headline and f"{body['champion']['value']:.4f}" in headline
    for version in (good_v, bad_v):
        refused = [r for r in _promotion_tags(settings, version) if r["decision"] == "refused"]
        assert len(refused) == 1
        assert refused[0]["rows"] == story.good.outcome.valid_rows
        assert refused[0]["evaluated_on"] == f"fraud_training_set@{story.built.version}"
        assert refused[0]["champion"]["value"] == body["champion"]["value"]


def test_force_moves_the_champion_and_is_recorded(settings, story):
    assert story.forced.decision == "forced" and story.forced.promoted
    assert story.forced.champion.version == story.good.model.version
    client = _client(settings)
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == story.bad.model.version
    for version in (story.good.model.version, story.bad.model.version):
        assert [r["decision"] for r in _promotion_tags(settings, version)][-1] == "forced"


def test_lineage_reaches_the_exact_table_versions_and_feature_code(settings, story):
    from lakeray.training.lineage import lineage

    found = lineage(settings, f"{MODEL}/{story.good.model.version}")
    assert found["model"]["version"] == story.good.model.version
    assert found["run"]["run_id"] == story.good.model.run_id
    ts = found["training_set"]
    assert (ts["table"], ts["version"]) == ("fraud_training_set", story.built.version)
    assert ts["inputs"] == story.built.inputs and ts["content_hash"] == story.built.content_hash
    nodes = {n["table"]: n for n in ts["upstream"]}
    features = nodes["customer_aggregates"]
    assert features["version"] == story.feature.version and features["written_by"] == "feature run"
    assert features["code_version"] == story.feature.code_version and features["run_id"] == story.feature.run_id
    assert [(u["table"], u["version"]) for u in features["upstream"]] == [("transactions", story.source_version)]


def test_cli_list_show_lineage(settings, story):
    listed = _invoke(settings, "models", "list", "--json")
    assert listed.exit_code == 0, listed.output
    model = next(m for m in json.loads(listed.stdout) if m["name"] == MODEL)
    good_v, bad_v = story.good.model.version, story.bad.model.version
    assert model["aliases"] == {"champion": bad_v, "challenger": bad_v}
    assert [v["version"] for v in model["versions"]] == [bad_v, good_v]
    assert model["versions"][1]["metric"] == "auc"
    assert model["versions"][1]["metric_value"] == pytest.approx(story.good.metric)

    shown = _invoke(settings, "models", "show", f"{MODEL}/{good_v}", "--json")
    assert shown.exit_code == 0, shown.output
    body = json.loads(shown.stdout)
    assert body["params"]["kind"] == "xgboost" and "valid_auc" in body["metrics"]
    assert [p["decision"] for p in body["promotions"]] == ["first champion", "refused", "forced"]

    traced = _invoke(settings, "models", "lineage", f"{MODEL}@champion", "--json")
    assert traced.exit_code == 0, traced.output
    assert json.loads(traced.stdout)["model"]["version"] == bad_v
    tree = _invoke(settings, "models", "lineage", f"{MODEL}@champion")
    assert tree.exit_code == 0, tree.output
    assert f"customer_aggregates@{story.feature.version}" in tree.stdout
    assert story.feature.code_version in tree.stdout


def test_promoting_a_missing_alias_is_a_clear_error(settings, story):
    from lakeray.errors import ModelRegistryError

    result = _invoke(settings, "models", "promote", MODEL, "--challenger", "nonexistent")
    assert result.exit_code == 1 and isinstance(result.exception, ModelRegistryError)
    assert "not in the registry" in result.exception.headline


def test_a_champion_that_cannot_be_scored_on_the_rows_is_not_replaced_without_force(settings, story, ray_handle):
    """Runs last: it moves the aliases. A champion trained on a column the challenger's training set
    lacks cannot be compared on those rows: refused (naming why), and --force still promotes."""
    import pyarrow.compute as pc

    from lakeray.lakehouse.delta import read_arrow, write_arrow
    from lakeray.training.api import train
    from lakeray.training.promotion import PromotionRefused, promote

    rows = read_arrow(settings.table_path("fraud_training_set"), story.built.version)
    wider = rows.append_column("amount_doubled", pc.multiply(rows.column("amount"), 2.0))
    write_arrow(wider, settings.table_path("registry_wider_set"), json.dumps({"test": "wider"}))
    spec = _spec("registry_wider", ["amount", "amount_doubled", "merchant_fraud_prior"], 5, {"max_depth": 2})
    wide = train(settings, spec.model_copy(update={"training_set": "registry_wider_set"}))
    promote(settings, MODEL, force=True)  # the wide model is champion now
    client = _client(settings)
    client.set_registered_model_alias(MODEL, "challenger", str(story.good.model.version))
    with pytest.raises(PromotionRefused, match="not comparable") as refused:
        promote(settings, MODEL)
    result = refused.value.result
    assert result.champion.version == wide.model.version and result.champion.value is None
    assert "amount_doubled" in result.champion.note
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == wide.model.version
    forced = promote(settings, MODEL, force=True)
    assert forced.decision == "forced"
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == story.good.model.version
