"""ServeSpec: validation errors name the file and field; a spec compiles to a config Ray's own
ServeDeploySchema accepts (what `serve deploy` and KubeRay read), with no token in it."""

from __future__ import annotations

import pytest
import yaml

from lakeray.errors import ConfigError
from lakeray.serving.spec import ServeSpec, compile_app, deploy_config, load_serve_spec
from tests.conftest import REPO

PINNED = "models:/lakeray_fraud_xgb/3"


def _spec(**changes):
    data = {"name": "fraud", "route": "/fraud", "model": "lakeray_fraud_xgb@champion", **changes}
    return ServeSpec.parse(data, "jobs/serving/test.yaml")


def test_the_shipped_spec_compiles_to_a_serve_deploy_schema(settings):
    from ray.serve.schema import ServeDeploySchema

    spec = load_serve_spec(REPO / "jobs" / "serving" / "fraud.yaml")
    config = deploy_config([compile_app(spec, settings, PINNED)], settings)
    text = yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True))
    again = ServeDeploySchema.model_validate(yaml.safe_load(text))  # what `serve deploy FILE` does with it
    app = again.applications[0]
    assert (app.name, app.route_prefix, app.import_path) == ("fraud", "/fraud", "lakeray.serving.app:build_app")
    assert app.args["model_uri"] == PINNED and app.args["log_table_uri"].endswith("/tables/prediction_log")
    deployment = app.deployments[0]
    assert deployment.autoscaling_config["min_replicas"] == 1 and deployment.autoscaling_config["max_replicas"] == 2
    # The shipped autoscaling reaction (docs/serving.md): a report every 2 s, averaged over 10 s.
    assert (deployment.autoscaling_config["metrics_interval_s"], deployment.autoscaling_config["look_back_period_s"]) \
        == (2.0, 10.0)
    assert deployment.ray_actor_options.num_cpus == 0.5
    assert again.http_options.port == settings.profile.serve.port


def test_the_import_path_builds_an_application_from_the_args(settings):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from lakeray.serving.app import build_app

    app = compile_app(_spec(), settings, PINNED)
    assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, app.args), Application)


def test_auth_puts_only_the_tokens_digest_in_the_config(settings):
    spec = _spec(auth={"token_env": "FRAUD_TOKEN"})
    app = compile_app(spec, settings, PINNED, environ={"FRAUD_TOKEN": "very-secret"})
    text = yaml.safe_dump(app.model_dump(mode="json", exclude_unset=True))
    assert "very-secret" not in text and len(app.args["token_sha256"]) == 64
    with pytest.raises(ConfigError, match="auth.token_env: the environment variable FRAUD_TOKEN is not set"):
        compile_app(spec, settings, PINNED, environ={})


@pytest.mark.parametrize(("changes", "message"), [
    ({"replicas": 2}, "jobs/serving/test.yaml: replicas: unknown key"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling: min_replicas (3) is above max_replicas"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}}, "autoscaling: initial_replicas"),
    ({"autoscaling": {"target_ongoing_requests": 0}}, "autoscaling.target_ongoing_requests: Input should be greater"),
    ({"autoscaling": {"metrics_interval_s": 5, "look_back_period_s": 5}},
     "autoscaling: look_back_period_s (5) must be above metrics_interval_s (5)"),
    ({"resources": {"cpus": 0}}, "resources.cpus: Input should be greater than 0"),
    ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
    ({"model": "lakeray_fraud_xgb"}, "model: 'lakeray_fraud_xgb': write name@alias"),
    ({"route": "fraud/"}, "route: 'fraud/': a path such as /fraud"),
    ({"name": "has space"}, "name: 'has space'"),
    ({"auth": {"token_env": "not a name"}}, "auth.token_env: 'not a name' is not an environment variable name"),
    ({"auth": {"token": "abc"}}, "auth.token: unknown key"),
    ({"features": {"refresh": 5}}, "features.refresh: unknown key"),
    ({"features": {"refresh_s": -1}}, "features.refresh_s: Input should be greater than or equal to 0"),
    ({"features": {"tables": [{"table": "t", "entity_keys": ["a"], "request_keys": {"b": "x"}}]}},
     "features.tables.0: request_keys maps ['b'] but entity_keys are ['a']"),
    ({"features": {"tables": [{"table": "t", "entity_keys": []}]}}, "features.tables.0.entity_keys"),
])
def test_bad_specs_name_the_file_and_field(changes, message):
    with pytest.raises(ConfigError) as err:
        _spec(**changes)
    assert message in err.value.headline


def test_two_apps_on_one_route_are_refused_by_rays_schema(settings):
    first = compile_app(_spec(), settings, PINNED)
    second = compile_app(_spec(name="fraud-uat"), settings, PINNED)
    with pytest.raises(ConfigError, match='Ray Serve refuses the combined config: .*route prefix "/fraud"'):
        deploy_config([first, second], settings)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_serve_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_serve_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_serve_spec(bad)


# The pieces of an endpoint that need no cluster: the prediction log's flushing and the client's retries.

def test_prediction_log_commits_once_per_flush_and_keeps_rows_while_storage_fails(tmp_path):
    import time

    from deltalake import DeltaTable

    from lakeray.serving.prediction_log import PredictionLog

    path = str(tmp_path / "log")
    log = PredictionLog(path, "fraud", "m", 3, flush_rows=3, flush_seconds=60)
    log.append("r1", [{"a": 1.0}, {"a": None}], [0.1, 0.2], 1.5)
    log.append("r2", [{"a": 2.0}], [0.3], 1.0)  # 3 rows: the thread flushes now, not after 60 s
    deadline = time.monotonic() + 30
    while log.commits < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    table = DeltaTable(path)
    assert log.commits == 1 and table.version() == 0  # one commit for both requests
    rows = table.to_pyarrow_table().to_pylist()
    assert [(r["request_id"], r["row"], r["prediction"]) for r in rows] == [("r1", 0, 0.1), ("r1", 1, 0.2), ("r2", 0, 0.3)]
    assert rows[1]["inputs"] == '{"a":null}' and {r["model_version"] for r in rows} == {3}
    log.close()

    blocked = tmp_path / "not_a_folder"
    blocked.write_text("x")
    failing = PredictionLog(str(blocked), "fraud", "m", 3, flush_rows=100, flush_seconds=60, max_buffer_rows=3)
    failing.append("a", [{"a": 1.0}, {"a": 2.0}], [0.1, 0.2], 1.0)
    assert failing.flush() == 0 and failing.last_error
    assert failing.stats()["rows_pending"] == 2  # kept for the next try
    failing.append("b", [{"a": 3.0}, {"a": 4.0}], [0.3, 0.4], 1.0)  # over max_buffer_rows: the oldest go
    assert failing.stats()["rows_pending"] == 2 and failing.rows_dropped == 2
    failing.close(timeout_s=5)


def _server(statuses):
    """A loopback HTTP server answering the given statuses in turn (then 200), with JSON bodies."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            calls.append(self.headers.get("authorization"))
            status = statuses[len(calls) - 1] if len(calls) <= len(statuses) else 200
            body = {"predictions": [0.5], "model": "m", "model_version": 1, "request_id": "x"} if status == 200 else \
                {"detail": [{"loc": ["body", "instances", 0, "amount"], "msg": "Field required", "type": "missing"}]}
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", calls


def test_client_retries_503_and_reports_refusals():
    from lakeray.serving.client import Client, EndpointError

    server, url, calls = _server([503, 503])
    try:
        with Client(url, token="t", retries=3, backoff_s=0.01) as client:
            assert client.predict([{"amount": 1.0}])["predictions"] == [0.5]
        assert calls == ["Bearer t"] * 3
    finally:
        server.shutdown()
    server, url, calls = _server([422])
    try:
        with Client(url, retries=3, backoff_s=0.01) as client, pytest.raises(EndpointError) as err:
            client.predict([{}])
        assert err.value.status == 422 and "body.instances.0.amount: Field required" in err.value.headline
        assert len(calls) == 1  # a refusal is not retried
    finally:
        server.shutdown()
    server, url, calls = _server([503] * 10)
    try:
        with Client(url, retries=2, backoff_s=0.01) as client, pytest.raises(EndpointError, match="after 3 attempts"):
            client.predict([{}])
    finally:
        server.shutdown()


def test_a_canary_is_pinned_in_the_args_and_checked(settings):
    spec = _spec(canary={"model": "lakeray_fraud_xgb@challenger", "percent": 10})
    app = compile_app(spec, settings, PINNED, canary_uri="models:/lakeray_fraud_xgb/4")
    assert (app.args["canary_uri"], app.args["canary_percent"]) == ("models:/lakeray_fraud_xgb/4", 10)
    assert compile_app(_spec(), settings, PINNED).args["canary_uri"] is None
    for percent, message in [(0, "canary.percent: Input should be greater than 0"),
                             (100, "canary.percent: Input should be less than 100")]:
        with pytest.raises(ConfigError, match=message):
            _spec(canary={"model": "m@challenger", "percent": percent})
    with pytest.raises(ConfigError, match="canary.model: 'm': write name@alias"):
        _spec(canary={"model": "m", "percent": 5})


def test_online_store_serves_the_newest_row_defaults_and_refreshes(tmp_path):
    """The replica's in-memory store, without a cluster: newest row per (composite) entity, encoded as
    in training; unknown and too-old entities get the defaults row and a flag; a new version is swapped in."""
    import time

    import numpy as np
    import pandas as pd
    from deltalake import write_deltalake

    from lakeray.serving.model import ServedModel
    from lakeray.serving.online import OnlinePlan, OnlineStore

    uri = str(tmp_path / "customers")
    now = pd.Timestamp.now(tz="UTC")
    write_deltalake(uri, pd.DataFrame({
        "region": ["eu", "eu", "eu", "us"], "customer_id": [1, 1, 2, 1],
        "ts": [now - pd.Timedelta("1h"), now, now, now - pd.Timedelta("10d")],
        "spend": [1.0, 2.0, None, 7.0], "seg": ["a", "b", "zz", "a"]}))
    model = ServedModel("m", 1, "xgboost", ["spend", "seg", "amount"], {"seg": ["a", "b"]}, None)
    plan = OnlinePlan.model_validate({"refresh_s": 0.2, "tables": [{
        "table": "customers", "uri": uri, "entity_keys": ["region", "customer_id"], "request_keys": ["region", "cid"],
        "key_types": ["str", "int"], "features": {"spend": "spend", "seg": "seg"}, "event_time": "ts",
        "max_age_s": 86_400, "defaults": {"spend": -1.0, "seg": "a"}}]})
    store = OnlineStore(plan, model, keep_raw=True)
    try:
        rows = [{"region": "eu", "cid": 1, "amount": 3.0}, {"region": "eu", "cid": 2, "amount": 1.0},
                {"region": "us", "cid": 1, "amount": 1.0}, {"region": "eu", "cid": 9, "amount": 1.0}]
        found = store.lookup(rows)
        assert found.versions == {"customers": 0}
        assert found.unknown == [[], [], ["customers"], ["customers"]]  # us/1 is 10 days old: over max_age_s
        x = model.matrix(rows, found.features)
        np.testing.assert_array_equal(x[0], [2.0, 1.0, 3.0])  # newest eu/1 row: spend 2, seg b (code 1)
        assert np.isnan(x[1][0]) and np.isnan(x[1][1])  # null spend and an unseen category: missing
        np.testing.assert_array_equal(x[3], [-1.0, 0.0, 1.0])  # the defaults, encoded
        assert found.raw[0] == {"spend": 2.0, "seg": "b"} and found.raw[3] == {"spend": -1.0, "seg": "a"}
        write_deltalake(uri, pd.DataFrame({"region": ["eu"], "customer_id": [9], "ts": [now], "spend": [9.0],
                                           "seg": ["b"]}), mode="append")
        deadline = time.monotonic() + 20
        while store.versions() != {"customers": 1} and time.monotonic() < deadline:
            time.sleep(0.05)
        again = store.lookup(rows[3:])
        assert again.versions == {"customers": 1} and again.unknown == [[]]
        assert again.features["spend"].tolist() == [9.0]
        assert store.stats()["tables"][0]["entities"] == 4 and store.stats()["refreshes"] == 1
    finally:
        store.close()


def test_logged_online_values_are_the_values_as_read(tmp_path):
    """The prediction log gets each looked-up value as Arrow reads it (ints stay ints, nulls None,
    strings strings), and an unknown entity the declared defaults: the numpy gather changed nothing."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from lakeray.serving.model import ServedModel
    from lakeray.serving.online import OnlinePlan, OnlineStore

    uri = str(tmp_path / "accounts")
    data = pa.table({"account_id": pa.array([1, 2, 3], pa.int64()),
                     "balance": pa.array([1.5, -2.25, 0.0], pa.float64()),
                     "txn_count": pa.array([4, None, 7], pa.int64()),
                     "active": pa.array([True, False, True]),
                     "segment": pa.array(["gold", None, "basic"])})
    write_deltalake(uri, data)
    model = ServedModel("m", 1, "xgboost", ["amount", "balance", "txn_count", "active", "segment"],
                        {"segment": ["basic", "gold"]}, scorer=None)
    plan = OnlinePlan.model_validate({"refresh_s": 0, "tables": [{
        "table": "accounts", "uri": uri, "entity_keys": ["account_id"], "request_keys": ["account_id"],
        "key_types": ["int"], "features": {c: c for c in ("balance", "txn_count", "active", "segment")},
        "defaults": {"balance": -1.0}}]})
    store = OnlineStore(plan, model, keep_raw=True)
    looked = store.lookup([{"account_id": 3}, {"account_id": 9}, {"account_id": 2}, {"account_id": 1}])
    rows = data.to_pylist()
    expected = [{k: rows[i][k] for k in ("balance", "txn_count", "active", "segment")} for i in (2, 1, 0)]
    assert looked.raw == [expected[0], {"balance": -1.0, "txn_count": None, "active": None, "segment": None},
                          expected[1], expected[2]]
    assert [type(v) for v in looked.raw[0].values()] == [float, int, bool, str]
    assert looked.unknown == [[], ["accounts"], [], []]
    store.close()
