"""Spec-driven serving over real HTTP: deploy from a ServeSpec, query, 422s naming the field, auth,
the Delta prediction log, two apps on two routes, delete."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from lakeray.errors import ConfigError, ModelRegistryError

pytestmark = [pytest.mark.ray]

TOKEN_ENV = "LAKERAY_TEST_SERVE_TOKEN"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def model(settings, ray_handle):
    """A small XGBoost model on 6 numeric features and one categorical, registered as serve_test@champion."""
    import pandas as pd
    from deltalake import write_deltalake

    from lakeray.training.api import train
    from lakeray.training.spec import TrainSpec

    rng = np.random.default_rng(3)
    rows = 4_000
    x = rng.normal(size=(rows, 6))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)])
    frame["channel"] = rng.choice(["web", "app", "pos"], size=rows)
    logit = 1.5 * x[:, 0] - x[:, 1] + (frame["channel"] == "web").to_numpy() * 1.0
    frame["row_id"] = np.arange(rows, dtype=np.int64)
    frame["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    write_deltalake(settings.table_path("serving_set"), frame, mode="overwrite")
    spec = TrainSpec.parse({
        "name": "serving_test", "model": {"kind": "xgboost", "rounds": 20}, "training_set": "serving_set",
        "label": "label", "features": {"all_except": []}, "split": {"kind": "hash", "column": "row_id"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1}, "checkpoint_every": 20,
        "registry": {"model_name": "serving_test", "alias": "champion"}})
    return train(settings, spec)


def _spec(name: str, route: str, **extra):
    from lakeray.serving.spec import ServeSpec

    return ServeSpec.parse({"name": name, "route": route, "model": "serving_test@champion",
                            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                            "resources": {"cpus": 0.25}, "limits": {"max_rows": 100},
                            "prediction_log": {"table": "serving_log", "flush_rows": 5, "flush_seconds": 1.0},
                            **extra})


@pytest.fixture(scope="module")
def endpoint(settings, model):
    from lakeray.serving.deploy import deploy

    spec = _spec("fraud-a", "/fraud-a", auth={"token_env": TOKEN_ENV})
    return deploy(settings, spec, environ={TOKEN_ENV: TOKEN})


AUTH = {"authorization": f"Bearer {TOKEN}"}


def _row(endpoint, **values):
    row = {f: 0.5 for f in endpoint.features}
    row["channel"] = "web"
    row.update(values)
    return row


def _post(endpoint, payload=None, content=None, headers=None):
    headers = {**AUTH, **(headers or {})}
    if content is not None:
        return httpx.post(f"{endpoint.url}/predict", content=content,
                          headers={"content-type": "application/json", **headers}, timeout=30)
    return httpx.post(f"{endpoint.url}/predict", json=payload, headers=headers, timeout=30)


def test_predictions_carry_model_version_and_request_id(endpoint, model):
    rows = [_row(endpoint), _row(endpoint, f0=None, channel="unseen"), _row(endpoint, channel=None)]
    reply = _post(endpoint, {"instances": rows}, headers={"x-request-id": "req-1"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "serving_test" and body["model_version"] == model.model.version
    assert body["request_id"] == "req-1" and reply.headers["x-request-id"] == "req-1"
    # The same scores as the trained booster on the same encoding (unseen category and null: missing).
    features = model.outcome.plan.features
    vocab = model.outcome.plan.categorical["channel"]
    x = np.array([[(vocab.index(r["channel"]) if r["channel"] in vocab else np.nan) if f == "channel"
                   else (np.nan if r[f] is None else r[f]) for f in features] for r in rows], dtype=np.float32)
    assert body["predictions"] == pytest.approx(model.outcome.model.inplace_predict(x).tolist(), rel=1e-5)
    assert _post(endpoint, {"instances": rows[:1]}).json()["request_id"] != "req-1"  # made when not given


def test_openapi_schema_is_the_models_features(endpoint):
    spec = httpx.get(f"{endpoint.url}/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    instance = next(s for name, s in schemas.items() if name.endswith("_instance"))
    assert sorted(instance["properties"]) == sorted(endpoint.features)
    assert set(instance["required"]) == set(endpoint.features) and instance["additionalProperties"] is False
    assert {"type": "number"} in instance["properties"]["f0"]["anyOf"]
    assert {"type": "string"} in instance["properties"]["channel"]["anyOf"]
    assert httpx.get(f"{endpoint.url}/docs", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("payload", "content", "loc"),
    [
        ({"instances": []}, None, ["body", "instances"]),
        ({"rows": []}, None, ["body", "instances"]),
        (None, b"{not json", ["body", 1]),
        ({"instances": [{"f0": "a lot"}]}, None, ["body", "instances", 0, "f0"]),
        ({"instances": "everything"}, None, ["body", "instances"]),
        (None, b'{"instances": [{"f0": Infinity}]}', ["body", "instances", 0, "f0"]),
    ],
)
def test_malformed_requests_are_422_naming_the_field(endpoint, payload, content, loc):
    reply = _post(endpoint, payload, content)
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"][0]["loc"] == loc


def test_missing_unknown_and_too_many_rows_are_422(endpoint):
    row = _row(endpoint)
    del row["f3"]
    assert _post(endpoint, {"instances": [row]}).json()["detail"][0]["loc"] == ["body", "instances", 0, "f3"]
    reply = _post(endpoint, {"instances": [_row(endpoint, colour=1.0)]})
    assert reply.status_code == 422 and reply.json()["detail"][0]["loc"] == ["body", "instances", 0, "colour"]
    reply = _post(endpoint, {"instances": [_row(endpoint)] * 101})
    assert reply.status_code == 422 and "at most 100" in reply.json()["detail"][0]["msg"]


def test_auth_refuses_missing_or_wrong_token(endpoint):
    row = {"instances": [_row(endpoint)]}
    assert httpx.post(f"{endpoint.url}/predict", json=row, timeout=30).status_code == 401
    wrong = httpx.post(f"{endpoint.url}/predict", json=row, headers={"authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{endpoint.url}/healthz", timeout=10).status_code == 200  # probes need no token


def test_predictions_are_logged_to_delta_with_their_request_ids(endpoint, settings, model):
    from deltalake import DeltaTable

    ids = [f"log-{i}" for i in range(12)]
    for request_id in ids:
        assert _post(endpoint, {"instances": [_row(endpoint)]}, headers={"x-request-id": request_id}).status_code == 200
    path = settings.table_path("serving_log")
    deadline = time.monotonic() + 60
    logged: set[str] = set()
    while time.monotonic() < deadline:
        try:
            table = DeltaTable(path).to_pyarrow_table()
            logged = set(table.column("request_id").to_pylist())
        except Exception:  # not created yet
            pass
        if set(ids) <= logged:
            break
        time.sleep(0.5)
    assert set(ids) <= logged
    rows = [r for r in table.to_pylist() if r["request_id"] in ids]
    assert {r["model_version"] for r in rows} == {model.model.version} and {r["app"] for r in rows} == {"fraud-a"}
    assert all(0 <= r["prediction"] <= 1 and r["latency_ms"] > 0 for r in rows)
    # Batched: fewer commits than requests.
    assert len(DeltaTable(path).history()) < len(ids) + 2


def test_oversized_body_is_413(endpoint):
    reply = _post(endpoint, content=b'{"instances": [' + b"1," * 5_000_000 + b"1]}")
    assert reply.status_code == 413


def test_two_apps_on_two_routes_then_delete(settings, endpoint, model):
    from lakeray.serving.deploy import app_status, delete_app, deploy, list_apps

    second = deploy(settings, _spec("fraud-b", "/fraud-b", prediction_log={"enabled": False}))
    assert second.url.endswith("/fraud-b") and second.model_version == model.model.version
    reply = httpx.post(f"{second.url}/predict", json={"instances": [_row(second)]}, timeout=30)  # no auth on b
    assert reply.status_code == 200, reply.text
    apps = {a.name: a for a in list_apps(settings)}
    assert {"fraud-a", "fraud-b"} <= set(apps) and apps["fraud-b"].route == "/fraud-b"
    assert apps["fraud-a"].model_uri == f"models:/serving_test/{model.model.version}"
    assert app_status(settings, "fraud-b")["health"]["model_version"] == model.model.version
    with pytest.raises(ConfigError, match="already served by app 'fraud-b'"):
        deploy(settings, _spec("fraud-c", "/fraud-b"))
    delete_app(settings, "fraud-b")
    assert "fraud-b" not in {a.name for a in list_apps(settings)}
    # The other app was never touched.
    assert _post(endpoint, {"instances": [_row(endpoint)]}).status_code == 200


def test_deploy_refuses_unknown_alias_and_oversized_replicas_before_deploying(settings, model):
    from lakeray.serving.deploy import deploy, list_apps

    before = {a.name for a in list_apps(settings)}
    with pytest.raises(ModelRegistryError, match="not in the registry"):
        deploy(settings, _spec("bad-alias", "/bad", model="serving_test@nope"))
    with pytest.raises(ConfigError, match="resources.cpus: a replica asks for 512 CPUs"):
        deploy(settings, _spec("too-big", "/big", resources={"cpus": 512}))
    with pytest.raises(ConfigError, match="auth.token_env: the environment variable"):
        deploy(settings, _spec("no-token", "/nt", auth={"token_env": "LAKERAY_TEST_UNSET_TOKEN"}), environ={})
    assert {a.name for a in list_apps(settings)} == before


def test_lakeray_predict_cli_scores_stdin_and_reports_401(endpoint, model):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    lakeray = str(Path(sys.executable).parent / "lakeray")
    command = [lakeray, "predict", "fraud-a", "--url", endpoint.url, "--token-env", TOKEN_ENV, "--json", "-"]
    rows = json.dumps([_row(endpoint), _row(endpoint, f1=2.0)])
    done = subprocess.run(command, input=rows, capture_output=True, text=True, timeout=120,
                          env={**os.environ, TOKEN_ENV: TOKEN})
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert len(answer["predictions"]) == 2 and answer["model_version"] == model.model.version
    refused = subprocess.run(command, input=rows, capture_output=True, text=True, timeout=120,
                             env={**os.environ, TOKEN_ENV: "wrong"})
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr and "bearer token" in refused.stderr


def test_canary_takes_its_share_then_promote_moves_all_traffic(settings, model):
    from lakeray.registry import mlflow_client
    from lakeray.serving.deploy import delete_app, deploy, promote_app

    client = mlflow_client(settings)
    first = client.get_model_version("serving_test", str(model.model.version))
    # A second version of the same model (a challenger): the split is seen in the versions that answer.
    second = client.create_model_version("serving_test", source=first.source, run_id=first.run_id)
    client.set_registered_model_alias("serving_test", "challenger", second.version)
    spec = _spec("fraud-canary", "/fraud-canary", prediction_log={"enabled": False},
                 canary={"model": "serving_test@challenger", "percent": 30})
    endpoint = deploy(settings, spec)
    try:
        health = httpx.get(f"{endpoint.url}/healthz", timeout=10).json()
        assert health["canary"] == {"model": "serving_test", "model_version": int(second.version), "percent": 30.0}
        versions = [httpx.post(f"{endpoint.url}/predict", json={"instances": [_row(endpoint)]},
                               headers={"x-request-id": f"canary-{i}"}, timeout=30).json()["model_version"]
                    for i in range(200)]
        share = versions.count(int(second.version)) / len(versions)
        assert set(versions) == {model.model.version, int(second.version)} and 0.2 <= share <= 0.4, share
        promoted = promote_app(settings, "fraud-canary")
        assert promoted.model_version == int(second.version)
        versions = {httpx.post(f"{endpoint.url}/predict", json={"instances": [_row(endpoint)]},
                               timeout=30).json()["model_version"] for _ in range(20)}
        assert versions == {int(second.version)}
        with pytest.raises(ConfigError, match="has no canary to promote"):
            promote_app(settings, "fraud-canary")
    finally:
        delete_app(settings, "fraud-canary")
