"""Serving operations over real HTTP (issue 13): schemathesis over the live /openapi.json, a replica
killed under load, a rolling update under a steady request stream, replicas that cannot fit refused
before deploy, a PyTorch model trained by lakeray served, and a foreground `lakeray serve` stopped
by SIGTERM.

Every load loop is bounded in time, runs on loopback, and counts what failed instead of stopping at
the first failure, so an assertion says how many requests were lost.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from lakeray.cluster.processes import alive
from lakeray.errors import ConfigError
from tests.conftest import descendants, free_port

pytestmark = [pytest.mark.ray]

BIN = Path(sys.executable).parent
TOKEN_ENV = "LAKERAY_TEST_OPS_TOKEN"
TOKEN = "ops-token-for-tests"
AUTH = {"authorization": f"Bearer {TOKEN}"}
FEATURES = [f"f{i}" for i in range(5)]


@pytest.fixture(scope="module")
def ops_table(settings, ray_handle) -> str:
    """5 numeric features and one categorical; the label depends on f0, f1 and the channel."""
    import pandas as pd
    from deltalake import write_deltalake

    rng = np.random.default_rng(11)
    rows = 3_000
    x = rng.normal(size=(rows, len(FEATURES)))
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["channel"] = rng.choice(["web", "app", "pos"], size=rows)
    logit = 1.5 * x[:, 0] - x[:, 1] + (frame["channel"] == "web").to_numpy() * 1.0
    frame["row_id"] = np.arange(rows, dtype=np.int64)
    frame["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    write_deltalake(settings.table_path("serving_ops_set"), frame, mode="overwrite")
    return "serving_ops_set"


def _train(settings, table: str, name: str, model: dict, alias: str = "champion"):
    from lakeray.training.api import train
    from lakeray.training.spec import TrainSpec

    spec = TrainSpec.parse({
        "name": name, "model": model, "training_set": table, "label": "label", "features": {"all_except": []},
        "split": {"kind": "hash", "column": "row_id"}, "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "registry": {"model_name": name, "alias": alias}})
    return train(settings, spec)


@pytest.fixture(scope="module")
def xgb(settings, ops_table):
    """serving_ops v1 (champion), and v2: the same booster registered again, so an answer's
    model_version says which replica answered."""
    from lakeray.registry import mlflow_client

    report = _train(settings, ops_table, "serving_ops", {"kind": "xgboost", "rounds": 10})
    client = mlflow_client(settings)
    first = client.get_model_version("serving_ops", str(report.model.version))
    second = client.create_model_version("serving_ops", source=first.source, run_id=first.run_id)
    return int(first.version), int(second.version)


def _spec(name: str, route: str, **extra):
    from lakeray.serving.spec import ServeSpec

    return ServeSpec.parse({"name": name, "route": route, "model": "serving_ops@champion",
                            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                            "resources": {"cpus": 0.25}, "limits": {"max_rows": 50},
                            "prediction_log": {"enabled": False}, **extra})


def _row(**values) -> dict:
    row = {f: 0.25 for f in FEATURES}
    row["channel"] = "web"
    row.update(values)
    return row


class _Stream:
    """Back-to-back POSTs from ``threads`` threads until stopped, or ``limit_s`` at most.

    ``send(http_or_client, n)`` makes one request and returns the answer's model_version; whatever it
    raises is a failed request, recorded with its time.
    """

    def __init__(self, send, make_client, threads: int = 2, limit_s: float = 60.0) -> None:
        self.send, self.make_client, self.limit_s = send, make_client, limit_s
        self.answers: list[tuple[float, int]] = []  # (monotonic time, model_version)
        self.failures: list[tuple[float, str]] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> _Stream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def _loop(self, index: int) -> None:
        deadline = time.monotonic() + self.limit_s
        with self.make_client() as client:
            n = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                n += 1
                try:
                    version = self.send(client, f"{index}-{n}")
                    with self._lock:
                        self.answers.append((time.monotonic(), version))
                except Exception as exc:  # any failure is counted, never raised in the thread
                    with self._lock:
                        self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:300]))

    def wait_for(self, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.answers) + len(self.failures) < count and time.monotonic() < deadline:
            time.sleep(0.05)


def _plain_post(url: str, headers: dict | None = None):
    """One POST, no retry: any status but 200 is a failure."""

    def send(http: httpx.Client, tag: str) -> int:
        reply = http.post(f"{url}/predict", json={"instances": [_row()]},
                          headers={"x-request-id": f"ops-{tag}", **(headers or {})})
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:200]}")
        return int(reply.json()["model_version"])

    return send


@pytest.fixture(scope="module")
def deployed(settings, ray_handle):
    """The apps this module deploys. They are deleted together (test_delete_apps..., or here at the
    end): with Serve's HAProxy ingress each retiring replica drains for at least 30 s, and the drains
    of one config change run at once."""
    from lakeray.serving.deploy import delete_apps, list_apps

    names: list[str] = []
    yield names
    left = [n for n in names if n in {a.name for a in list_apps(settings)}]
    if left:
        delete_apps(settings, left)


@pytest.fixture(scope="module")
def ops_app(settings, xgb, deployed):
    """Two replicas of serving_ops v1 with bearer-token auth."""
    from lakeray.serving.deploy import deploy

    spec = _spec("ops", "/ops", auth={"token_env": TOKEN_ENV},
                 autoscaling={"min_replicas": 2, "max_replicas": 2})
    deployed.append("ops")
    return deploy(settings, spec, environ={TOKEN_ENV: TOKEN})


def test_schemathesis_checks_all_over_the_live_openapi_find_nothing(ops_app, tmp_path):
    # Positive cases must be accepted (a schema-valid request is never a 422) and negative ones
    # refused with a 4xx, never a 500; responses must match the documented schemas. Bounded: at most
    # 40 generated cases per operation, fixed seed, one worker.
    command = [str(BIN / "schemathesis"), "run", f"{ops_app.url}/openapi.json", "--url", ops_app.url,
               "--checks", "all", "--max-examples", "40", "--seed", "13", "--workers", "1",
               "--header", f"Authorization: Bearer {TOKEN}", "--request-timeout", "30",
               "--report", "junit", "--report-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    # Every operation was exercised, none skipped or errored (the JUnit report has one case per operation).
    import xml.etree.ElementTree as ET

    (report,) = tmp_path.glob("junit-*.xml")
    suite = ET.parse(report).getroot()
    assert {suite.get(k) for k in ("errors", "failures", "skipped")} == {"0"}
    assert {"POST /predict", "GET /healthz"} <= {case.get("name") for case in suite.iter("testcase")}


def _replica_actors(app: str) -> set[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#model#"  # Serve's replica actor names (namespace "serve")
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def test_a_replica_killed_under_load_recovers_with_under_one_percent_failed(settings, ops_app):
    import ray

    from lakeray.serving.client import Client

    # The lakeray client: it retries a request (with backoff, at most 3 times) only on 502/503/504
    # and on connections that fail before a reply; anything else counts as failed here.
    def send(client: Client, tag: str) -> int:
        return int(client.predict([_row()], request_id=f"kill-{tag}")["model_version"])

    replicas = _replica_actors("ops")
    assert len(replicas) == 2, replicas
    victim = sorted(replicas)[0]
    with _Stream(send, lambda: Client(ops_app.url, token=TOKEN, timeout_s=30), threads=3, limit_s=60) as stream:
        stream.wait_for(100)
        before = len(stream.answers)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed = time.monotonic()
        deadline = killed + 60
        while time.monotonic() < deadline:  # until Serve has replaced the dead replica
            now = _replica_actors("ops")
            if victim not in now and len(now) == 2 and _running_replicas(settings, "ops") == 2:
                break
            time.sleep(0.25)
        recovered, recovery_s = _replica_actors("ops"), time.monotonic() - killed
        stream.wait_for(len(stream.answers) + len(stream.failures) + 100)
    total = len(stream.answers) + len(stream.failures)
    print(f"replica killed under load: {len(stream.failures)} of {total} requests failed; "
          f"replaced in {recovery_s:.1f} s")
    assert victim not in recovered and len(recovered) == 2, recovered
    assert before >= 90 and total >= 300, (before, total)
    assert len(stream.failures) / total < 0.01, (len(stream.failures), total, stream.failures[:5])


def _running_replicas(settings, app: str) -> int:
    from lakeray.serving.deploy import list_apps

    found = {a.name: a for a in list_apps(settings)}
    return found[app].replicas.get("RUNNING", 0) if app in found else 0


def test_a_rolling_update_under_a_steady_stream_loses_no_request(settings, xgb, deployed):
    from lakeray.registry import mlflow_client
    from lakeray.serving.deploy import deploy

    v1, v2 = xgb
    client = mlflow_client(settings)
    client.set_registered_model_alias("serving_ops", "rolling", str(v1))
    spec = _spec("ops-roll", "/ops-roll", model="serving_ops@rolling")
    deployed.append("ops-roll")
    endpoint = deploy(settings, spec)
    # Plain httpx, no retries at all: every request must get a 200.
    with _Stream(_plain_post(endpoint.url), lambda: httpx.Client(timeout=60), threads=2,
                 limit_s=240) as stream:  # a bound; it stops ~3 s after the rollout
        stream.wait_for(20)
        client.set_registered_model_alias("serving_ops", "rolling", str(v2))
        rolling = time.monotonic()
        rolled = deploy(settings, spec)  # the alias moved: the app is rebuilt and Serve rolls its replica
        switched = time.monotonic()
        time.sleep(3.0)
        stream.wait_for(len(stream.answers) + len(stream.failures) + 30)
    print(f"rolling update: {len(stream.answers)} answered, {len(stream.failures)} failed")
    assert rolled.model_version == v2
    phases = [sum(1 for t, _ in stream.failures if lo <= t < hi)
              for lo, hi in ((0, rolling), (rolling, switched), (switched, float("inf")))]
    assert stream.failures == [], (len(stream.failures), "before/during/after the rollout", phases,
                                   stream.failures[:3])
    versions = [v for _, v in stream.answers]
    assert versions[0] == v1 and v2 in versions, set(versions)
    # Once the deploy returned (its health check saw v2), v2 answers; at most the requests already
    # queued on the old replica finish on it.
    late = [v for t, v in stream.answers if t > switched + 2.0]
    assert late and set(late) == {v2}, (len(late), set(late))


def test_replicas_that_cannot_fit_are_refused_before_deploy(settings, xgb):
    import ray

    from lakeray.serving.deploy import deploy, list_apps

    before = {a.name for a in list_apps(settings)}
    gpus = ray.cluster_resources().get("GPU", 0)
    with pytest.raises(ConfigError, match=rf"resources.gpus: a replica asks for {gpus + 1:g} GPUs; the largest node"):
        deploy(settings, _spec("ops-gpu", "/ops-gpu", resources={"cpus": 0.25, "gpus": gpus + 1}))
    cpus = ray.cluster_resources()["CPU"]
    # Each replica fits a node, but not the minimum count of them together.
    with pytest.raises(ConfigError, match=r"autoscaling.min_replicas: 3 replicas × .* CPUs; the cluster has"):
        deploy(settings, _spec("ops-many", "/ops-many", resources={"cpus": cpus / 2},
                               autoscaling={"min_replicas": 3, "max_replicas": 3}))
    assert {a.name for a in list_apps(settings)} == before  # nothing half-deployed


def test_a_torch_model_trained_by_lakeray_is_served(settings, ops_table, deployed):
    from lakeray.serving.deploy import deploy
    from lakeray.training.torch_trainer import predict_torch

    report = _train(settings, ops_table, "serving_ops_torch",
                    {"kind": "torch", "rounds": 2, "batch_size": 256, "learning_rate": 0.003, "seed": 5,
                     "params": {"hidden": [16, 8]}})
    deployed.append("ops-torch")
    endpoint = deploy(settings, _spec("ops-torch", "/ops-torch", model="serving_ops_torch@champion"))
    rows = [_row(), _row(f0=2.0, channel="pos"), _row(f1=None, channel="unseen")]
    reply = httpx.post(f"{endpoint.url}/predict", json={"instances": rows}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "serving_ops_torch" and body["model_version"] == report.model.version
    health = httpx.get(f"{endpoint.url}/healthz", timeout=10).json()
    assert health["kind"] == "torch"
    # The same scores as the trained module on the same encoding (unseen category and null: missing).
    plan = report.outcome.plan
    vocab = plan.categorical["channel"]
    x = np.array([[(vocab.index(r["channel"]) if r["channel"] in vocab else np.nan) if f == "channel"
                   else (np.nan if r[f] is None else r[f]) for f in plan.features] for r in rows],
                 dtype=np.float32)
    expected = predict_torch(report.outcome.model, x).tolist()
    assert body["predictions"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_delete_apps_removes_several_at_once_and_leaves_the_others(settings, ops_app, deployed):
    from lakeray.serving.deploy import delete_apps, list_apps

    before = {a.name for a in list_apps(settings)}
    mine = [n for n in deployed if n in before]
    assert "ops" in mine  # and whatever the earlier tests left
    with pytest.raises(ConfigError, match="no app 'nope'"):
        delete_apps(settings, [*mine, "nope"])  # nothing changes when one name is unknown
    assert {a.name for a in list_apps(settings)} == before
    started = time.monotonic()
    delete_apps(settings, mine)
    print(f"deleted {len(mine)} apps in {time.monotonic() - started:.1f} s")
    assert {a.name for a in list_apps(settings)} == before - set(mine)


def _user_env(**overrides: str) -> dict[str, str]:
    # What a user's shell would pass: not this test process's Ray address, HAProxy ports or LAKERAY_*.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_HAPROXY_", "LAKERAY_"))
           and k != "RAY_ADDRESS"}
    return {**env, **overrides}


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        return True
    except OSError:
        return False


def test_foreground_serve_stops_cleanly_on_sigterm(lakehouse_root, xgb, tmp_path):
    # A private local Ray (no ray.address, no `lakeray cluster up`): SIGTERM must shut Serve and that
    # Ray down, exit 0 like Ctrl-C, print no stack dump, and free the port.
    port = free_port()
    env = _user_env(LAKERAY_STORAGE__ROOT=str(lakehouse_root), LAKERAY_SERVE__PORT=str(port))
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([str(BIN / "lakeray"), "serve", "--model-uri", "models:/serving_ops@champion"],
                                env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops" not in out.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, f"lakeray serve exited {proc.returncode}:\n{err.read_text()[-4000:]}"
            time.sleep(0.5)
        reply = httpx.post(f"http://127.0.0.1:{port}/predict", json={"instances": [_row()]}, timeout=30)
        assert reply.status_code == 200 and reply.json()["model_version"] == xgb[0], reply.text
        ray_processes = descendants(proc.pid)
        assert ray_processes  # the private Ray's daemons, Serve's proxy and the replica
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    stderr_text = err.read_text()
    assert code == 0, stderr_text[-4000:]
    for dump in ("Fatal Python error", "Traceback", "Stack (most recent call first)", "Aborted!"):
        assert dump not in stderr_text, stderr_text[-4000:]
    assert "stopping the endpoint and Ray" in out.read_text()
    assert not _port_open(port)
    deadline = time.monotonic() + 30  # Ray's daemons exit on their own once the driver stopped them
    while any(alive(pid) for pid in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in ray_processes if alive(pid)]
