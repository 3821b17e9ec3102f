"""Training registers a model with lineage; the Serve endpoint answers over HTTP and rejects bad input."""

import httpx
import pytest

from lakeray.errors import ModelRegistryError

pytestmark = [pytest.mark.spark, pytest.mark.ray]


@pytest.fixture(scope="module")
def feature_version(spark, settings):
    from lakeray.features.runner import run_feature_job
    from lakeray.features.synthetic import generate_transactions
    from lakeray.lakehouse.delta import write_table

    from lakeray.demo import build_demo_training_set

    source = write_table(generate_transactions(spark, 30_000, seed=11), settings.table_path("transactions"))
    features = run_feature_job(spark, settings, "customer_aggregates").version
    built, columns = build_demo_training_set(spark, settings, source, features)
    return built.version, columns


@pytest.fixture(scope="module")
def report(settings, ray_handle, feature_version):
    from lakeray.training.api import train
    from lakeray.training.spec import TrainSpec

    version, columns = feature_version
    # Two workers: the Ray Train path (XGBoost's collective over both workers' file shards).
    spec = TrainSpec.parse({
        "name": "serve_test", "model": {"kind": "xgboost", "rounds": 30}, "training_set": f"fraud_training_set@{version}",
        "label": "is_fraud", "features": columns, "split": {"kind": "hash", "column": "transaction_id"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1}, "checkpoint_every": 10,
        "registry": {"alias": "champion"}})
    return train(settings, spec)


@pytest.fixture(scope="module")
def endpoint(settings, report):
    from lakeray.serving.deploy import deploy_model

    return deploy_model(settings, f"models:/{report.model.name}@champion")


def test_training_registers_model_with_alias_and_lineage(settings, report, feature_version):
    from lakeray.registry import mlflow_client

    client = mlflow_client(settings)
    version = client.get_model_version_by_alias(report.model.name, "champion")
    assert int(version.version) == report.model.version
    run = client.get_run(version.run_id)
    assert run.data.tags["lakeray.input"] == f"fraud_training_set@{feature_version[0]}"
    assert float(run.data.metrics["auc"]) == pytest.approx(report.evaluation.metrics["auc"])
    assert run.data.params["num_workers"] == "2" and report.outcome.path == "ray-train"
    # Both workers trained: the held-out rows plus the training rows are the whole table.
    assert report.outcome.train_rows + report.outcome.valid_rows == 30_000
    assert report.evaluation.rows == report.outcome.valid_rows
    assert report.evaluation.metrics["auc"] > 0.65  # the generator's signal is learnable from the features
    features = report.outcome.plan.features
    assert "customer_id" not in features and "is_fraud" not in features
    # Metrics at every checkpoint step (10, 20) plus the end reached MLflow as a history.
    history = mlflow_client(settings).get_metric_history(version.run_id, "valid_auc")
    assert [m.step for m in history if m.step] == [10, 20, 30]


def test_resolving_an_unknown_alias_is_a_clear_error(settings, report):
    from lakeray.registry import resolve_alias

    with pytest.raises(ModelRegistryError, match="not in the registry"):
        resolve_alias(settings, f"models:/{report.model.name}@nonexistent")


def test_healthz_reports_the_pinned_version(endpoint, report):
    body = httpx.get(f"{endpoint.url}/healthz", timeout=10).json()
    assert body["status"] == "ok" and body["model_version"] == report.model.version
    assert body["features"] == report.outcome.plan.features


def test_predict_returns_one_probability_per_instance(endpoint, report):
    rows = [{f: 1.0 for f in endpoint.features}, {f: None for f in endpoint.features}]
    reply = httpx.post(f"{endpoint.url}/predict", json={"instances": rows}, timeout=30)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert len(body["predictions"]) == 2 and all(0.0 <= p <= 1.0 for p in body["predictions"])
    assert body["model_version"] == report.model.version
    # The endpoint gives the same scores as the registered booster itself.
    import numpy as np

    x = np.array([[1.0] * len(endpoint.features), [np.nan] * len(endpoint.features)], dtype=np.float32)
    assert body["predictions"] == pytest.approx(report.outcome.model.inplace_predict(x).tolist(), rel=1e-5)


def _post(endpoint, payload=None, content=None):
    kwargs = {"json": payload} if content is None else {"content": content,
                                                        "headers": {"content-type": "application/json"}}
    return httpx.post(f"{endpoint.url}/predict", timeout=30, **kwargs)


def test_missing_feature_is_422_naming_it(endpoint):
    row = {f: 1.0 for f in endpoint.features}
    del row["amount"]
    reply = _post(endpoint, {"instances": [row]})
    assert reply.status_code == 422
    assert reply.json()["detail"][0]["loc"] == ["body", "instances", 0, "amount"]


def test_unknown_feature_is_422_naming_it(endpoint):
    reply = _post(endpoint, {"instances": [{**{f: 1.0 for f in endpoint.features}, "colour": 1.0}]})
    assert reply.status_code == 422
    assert reply.json()["detail"][0]["loc"] == ["body", "instances", 0, "colour"]


@pytest.mark.parametrize(
    ("payload", "content", "loc"),
    [
        ({"instances": []}, None, ["body", "instances"]),
        ({"rows": []}, None, ["body", "instances"]),
        (None, b"{not json", ["body", 1]),
        ({"instances": [{"amount": "a lot"}]}, None, ["body", "instances", 0, "amount"]),
        ({"instances": "everything"}, None, ["body", "instances"]),
    ],
)
def test_malformed_requests_are_422_never_500(endpoint, payload, content, loc):
    reply = _post(endpoint, payload, content)
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"][0]["loc"] == loc


def test_oversized_batch_is_422(endpoint, settings):
    row = {f: 1.0 for f in endpoint.features}
    reply = _post(endpoint, {"instances": [row] * (settings.profile.serve.max_batch_rows + 1)})
    assert reply.status_code == 422 and "at most" in reply.json()["detail"][0]["msg"]


def test_redeploy_reuses_the_port_and_another_port_fails_at_once(settings, report, endpoint):
    import dataclasses
    import time

    from lakeray.errors import ClusterError
    from lakeray.serving.deploy import deploy_model

    uri = f"models:/{report.model.name}@champion"
    # Serve's own proxy holds the port already: deploying again is allowed and answers with the version.
    assert deploy_model(settings, uri).model_version == report.model.version
    # This cluster's Serve listens on one port: asking for another one fails at once, naming both.
    serve_cfg = settings.profile.serve.model_copy(update={"port": settings.profile.serve.port + 1})
    moved = dataclasses.replace(settings, profile=settings.profile.model_copy(update={"serve": serve_cfg}))
    started = time.monotonic()
    with pytest.raises(ClusterError, match=f"already runs in this Ray cluster on port {settings.profile.serve.port}"):
        deploy_model(moved, uri)
    assert time.monotonic() - started < 10  # not after ray.op_timeout_s
    # The refused deploy changed nothing: the endpoint still answers on its own port.
    assert httpx.get(f"{endpoint.url}/healthz", timeout=10).json()["model_version"] == report.model.version


def test_a_model_that_cannot_load_fails_the_deploy_with_its_reason(settings, report, endpoint):
    import os
    import time

    from ray import serve

    from lakeray.errors import ClusterError
    from lakeray.registry import mlflow_client
    from lakeray.serving.deploy import deploy_model

    client = mlflow_client(settings)
    # A registered version whose artifacts are not a model: every replica start raises in its constructor.
    empty = settings.storage_root + "/not_a_model"
    os.makedirs(empty, exist_ok=True)
    broken = client.create_model_version(report.model.name, source=empty, run_id=report.model.run_id)
    client.set_registered_model_alias(report.model.name, "broken", broken.version)
    started = time.monotonic()
    try:
        with pytest.raises(ClusterError, match=rf"could not deploy models:/{report.model.name}@broken "
                                               rf"\(version {broken.version}\)") as err:
            deploy_model(settings, f"models:/{report.model.name}@broken", route_prefix="/broken", app_name="broken")
        # The root cause from the replica, not only "Failed to update the deployments".
        assert "MlflowException" in err.value.headline and "MLmodel" in err.value.headline
        assert "ray logs" in err.value.fix
        assert time.monotonic() - started < 180  # ended by DEPLOY_FAILED (~30 s here), not the 600 s timeout
    finally:
        serve.delete("broken")
        client.delete_model_version(report.model.name, broken.version)
    # The other app was never touched.
    assert httpx.get(f"{endpoint.url}/healthz", timeout=10).json()["model_version"] == report.model.version
