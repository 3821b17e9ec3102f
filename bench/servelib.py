"""What the serve_* benchmarks share: the model, the request, the two baseline servers and lakeray's deploy.

- The model: an XGBoost booster on 30 float features, trained here with ``xgboost.train`` and
  registered in the run's own MLflow store the way ``lakeray train`` registers one (the flavour, a
  named-column signature, ``lakeray/features.json``, alias ``champion``).
- The plain baseline: one process, FastAPI + uvicorn (uvloop, httptools), the same
  ``load_served_model``, the same generated request schema and (given an online plan) the same
  in-memory ``OnlineStore`` lookup as a lakeray replica; no batching, no log.
- The default-Serve baseline: a minimal hand-written deployment (``__call__`` on the request, the same
  schema and scorer) in a Ray started with Serve's defaults: the default HTTP proxy, no HAProxy, no
  throughput-optimised mode, default replica settings. It runs in a child process with its own Ray
  (the ingress mode is fixed when Ray starts), stripped of the RAY_SERVE_* variables lakeray sets.
- lakeray: ``lakeray.serving.deploy.deploy`` of a ServeSpec, as ``lakeray serve deploy`` does.

Child servers run in their own session and are stopped by SIGTERM, then SIGKILL of their group.
As a script: ``python bench/servelib.py plain|default-serve PORT TRACKING_URI MODEL_URI [PLAN_FILE]`` (the children).
No ``from __future__ import annotations``: FastAPI reads the plain server's annotations at runtime.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loadgen import LoadResult, run_load  # noqa: E402  (bench/ is not a package)

__all__ = ["REPO", "MODEL_NAME", "free_port", "bench_settings", "register_model", "request_body", "ChildServer",
           "start_plain", "start_default_serve", "measure", "healthz", "serve_spec", "replica_counts",
           "bench_ray", "deploy_spec", "batch_sizes"]

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench_serve_xgb"
_READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_settings(root: str):
    """The shipped local profile on a temporary storage root and a free Serve port (never the caller's
    LAKERAY_* overrides: the set-up is part of the benchmark)."""
    from lakeray.config import load_settings

    return load_settings(REPO / "lakeray.yaml", "local",
                         environ={"LAKERAY_STORAGE__ROOT": root, "LAKERAY_SERVE__PORT": str(free_port())})


@contextmanager
def bench_ray(settings) -> Iterator[Any]:
    """lakeray's ``ray_session``, tried twice: Ray gives its raylet a fixed 30 s to register, which a
    2-core machine busy with other test runs sometimes misses ("timed out during startup")."""
    import ray

    from lakeray.cluster.ray_runtime import ray_session

    for attempt in (1, 2):
        session = ray_session(settings)
        try:
            handle = session.__enter__()
            break
        except Exception as exc:
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            print("Ray did not start within its 30 s (busy machine): one more try", flush=True)
    try:
        yield handle
    finally:
        session.__exit__(None, None, None)


def deploy_spec(settings, spec) -> Any:
    """``lakeray.serving.deploy.deploy``, tried twice: on a busy 2-core machine Serve's proxy can miss
    its readiness checks once, and deploy then says to deploy again."""
    from lakeray.errors import ClusterError
    from lakeray.serving.deploy import deploy

    try:
        return deploy(settings, spec)
    except ClusterError as exc:
        print(f"deploy failed ({exc.args[0] if exc.args else exc}): one more try", flush=True)
        return deploy(settings, spec)


def register_model(settings, features: int = 30, rows: int = 20_000, rounds: int = 50, seed: int = 7) -> dict:
    """Train and register the booster; returns name, version, version URI and feature names."""
    import mlflow
    import mlflow.xgboost
    import numpy as np
    import pandas as pd
    import xgboost
    from mlflow.models import infer_signature

    from lakeray.registry import mlflow_client

    rng = np.random.default_rng(seed)
    names = [f"f{j:02d}" for j in range(features)]
    x = rng.standard_normal((rows, features), dtype=np.float32)
    logit = 1.2 * x[:, 0] - 0.8 * x[:, 1] + 0.9 * x[:, 2] * x[:, 3] + 0.6 * np.abs(x[:, 4]) - 1.0
    y = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    booster = xgboost.train({"objective": "binary:logistic", "tree_method": "hist", "max_depth": 6, "eta": 0.1,
                             "nthread": os.cpu_count() or 2, "seed": seed},
                            xgboost.DMatrix(x, y, feature_names=names), num_boost_round=rounds)
    client = mlflow_client(settings)
    sample = pd.DataFrame(x[:5], columns=names)
    with mlflow.start_run(run_name="bench_serve"):
        mlflow.log_dict({"features": names, "categorical": {}}, "lakeray/features.json")
        info = mlflow.xgboost.log_model(
            booster, name="model", signature=infer_signature(sample, booster.inplace_predict(x[:5])),
            registered_model_name=MODEL_NAME, model_format="ubj",
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"xgboost=={xgboost.__version__}"])
    version = int(info.registered_model_version)
    client.set_registered_model_alias(MODEL_NAME, "champion", str(version))
    return {"name": MODEL_NAME, "version": version, "uri": f"models:/{MODEL_NAME}/{version}", "features": names,
            "rows": rows, "rounds": rounds}


def request_body(features: list[str], seed: int = 11) -> bytes:
    """One instance with every feature: the request each connection repeats."""
    import random

    rnd = random.Random(seed)
    return json.dumps({"instances": [{name: round(rnd.gauss(0, 1), 4) for name in features}]}).encode()


def serve_spec(name: str, route: str, *, max_batch_size: int = 64, wait_timeout_ms: float | None = None,
               min_replicas: int = 1, max_replicas: int = 1, log: bool = True, features: dict | None = None,
               **autoscaling: Any):
    """A ServeSpec for the registered model: the shipped defaults unless given (``features``: the
    spec's online features block)."""
    from lakeray.serving.spec import ServeSpec

    batching: dict[str, Any] = {"max_batch_size": max_batch_size}
    if wait_timeout_ms is not None:
        batching["wait_timeout_ms"] = wait_timeout_ms
    raw = {
        "name": name, "route": route, "model": f"{MODEL_NAME}@champion", "batching": batching,
        "autoscaling": {"min_replicas": min_replicas, "max_replicas": max_replicas, **autoscaling},
        "prediction_log": {"enabled": log, "table": f"prediction_log_{name.replace('-', '_')}"},
    }
    if features is not None:
        raw["features"] = features
    return ServeSpec.parse(raw, f"bench spec {name}")


def measure(url: str, body: bytes, concurrency: int, duration_s: float, warmup_s: float = 1.0,
            max_requests: int = 100_000) -> LoadResult:
    """A warm-up run (discarded: connections, caches, the JIT of nothing) then the measured one."""
    from proctree import OtherLoad

    if warmup_s > 0:
        run_load(url, body, concurrency, warmup_s, max_requests)
    # Read here, while every server of the run is alive in this process tree: the whole-run share also
    # counts the CPU of stopped (reparented) Ray processes of the run as other load.
    others = OtherLoad()
    result = run_load(url, body, concurrency, duration_s, max_requests)
    result.other_cpu_share = others.share()
    return result


def healthz(base_url: str) -> dict:
    import httpx

    return httpx.get(f"{base_url}/healthz", timeout=10.0).json()


def batch_sizes(before: dict, after: dict) -> dict:
    """The batches a replica scored between two ``/healthz`` answers: histogram (size → batches), count,
    mean and largest size."""
    old = {int(k): v for k, v in (before.get("batch_sizes") or {}).items()}
    sizes = {int(k): v - old.get(int(k), 0) for k, v in (after.get("batch_sizes") or {}).items()}
    sizes = {k: v for k, v in sizes.items() if v > 0}
    batches = sum(sizes.values())
    mean = sum(k * v for k, v in sizes.items()) / batches if batches else 0.0
    return {"histogram": {str(k): sizes[k] for k in sorted(sizes)}, "batches": batches, "mean": round(mean, 2),
            "max": max(sizes, default=0)}


def replica_counts(app: str) -> dict[str, int]:
    """Replica state → count of the app's model deployment (Serve's own status)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {str(getattr(k, "value", k)): int(v) for d in status.deployments.values()
            for k, v in (d.replica_states or {}).items()}


class ChildServer:
    """A server in a child process (own session); ``stop`` ends it and everything it started."""

    def __init__(self, cmd: list[str], url: str, env: dict[str, str], log_path: str) -> None:
        self.url = url
        self._log = open(log_path, "ab")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.log_path = log_path

    def wait_ready(self, timeout_s: float = _READY_TIMEOUT_S) -> dict:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.flush()
                tail = Path(self.log_path).read_text(errors="replace").strip().splitlines()[-15:]
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n" + "\n".join(tail))
            try:
                reply = httpx.get(f"{self.url}/healthz", timeout=2.0)
                if reply.status_code == 200:
                    return reply.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server at {self.url} not ready within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever the child started (a Ray cluster's processes) and left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()


def _child_env(strip_ray_serve: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (strip_ray_serve and (k.startswith("RAY_SERVE_") or k.startswith("RAY_ADDRESS")))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__file__).parent), env.get("PYTHONPATH", "")] if p)
    return env


def start_plain(tracking_uri: str, model_uri: str, log_path: str, plan_file: str = "") -> ChildServer:
    """The plain FastAPI + uvicorn baseline; ``plan_file``: an online plan (JSON) to look features up with."""
    port = free_port()
    server = ChildServer([sys.executable, __file__, "plain", str(port), tracking_uri, model_uri, plan_file],
                         f"http://127.0.0.1:{port}", _child_env(False), log_path)
    server.wait_ready()
    return server


def start_default_serve(tracking_uri: str, model_uri: str, log_path: str, plan_file: str = "") -> ChildServer:
    port = free_port()
    server = ChildServer([sys.executable, __file__, "default-serve", str(port), tracking_uri, model_uri, plan_file],
                         f"http://127.0.0.1:{port}", _child_env(True), log_path)
    server.wait_ready()
    return server


def _request_model(instance: Any, name: str) -> Any:
    """The request schema a lakeray replica builds (lakeray.serving.app), rebuilt from public parts."""
    from pydantic import ConfigDict, Field, create_model

    return create_model(f"{name}_request", __config__=ConfigDict(extra="forbid"),
                        instances=(list[instance], Field(..., min_length=1, max_length=10_000)))


class _Scorer:
    """What a baseline does with a request, with lakeray's public parts: the replica's request schema,
    the same in-memory online lookup when a plan is given (``lakeray.serving.online.OnlineStore``), the
    feature matrix and the predict; no batching, no log, no metrics."""

    def __init__(self, tracking_uri: str, model_uri: str, plan_file: str = "") -> None:
        from lakeray.serving.model import instance_model, load_served_model

        self.model = load_served_model(tracking_uri, model_uri, threads=1)
        self.online = None
        if plan_file:
            from lakeray.serving.online import OnlinePlan, OnlineStore

            plan = OnlinePlan.model_validate_json(Path(plan_file).read_text())
            self.online = OnlineStore(plan, self.model)
            instance = instance_model(self.model, plan.request_fields(), plan.looked_up())
        else:
            instance = instance_model(self.model)
        self.request_model = _request_model(instance, self.model.name)

    def answer(self, instances: list) -> dict:
        import uuid

        rows = [i.model_dump(by_alias=True) for i in instances]
        lookup = self.online.lookup(rows) if self.online is not None else None
        scores = self.model.predict(self.model.matrix(rows, lookup.features if lookup is not None else None))
        out = {"predictions": scores, "model": self.model.name, "model_version": self.model.version,
               "request_id": uuid.uuid4().hex}
        if lookup is not None:
            out.update(feature_versions=lookup.versions, unknown_entities=lookup.unknown)
        return out


def _plain_main(port: int, tracking_uri: str, model_uri: str, plan_file: str) -> None:
    import uvicorn
    from fastapi import FastAPI

    scorer = _Scorer(tracking_uri, model_uri, plan_file)
    api = FastAPI()

    @api.post("/predict")
    def predict(body: scorer.request_model) -> dict:  # type: ignore[name-defined]
        return scorer.answer(body.instances)

    @api.get("/healthz")
    def health() -> dict:
        return {"status": "ok", "model_version": scorer.model.version}

    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _default_serve_main(port: int, tracking_uri: str, model_uri: str, plan_file: str) -> None:
    import ray
    from pydantic import ValidationError
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment  # Serve's defaults: 1 replica, max_ongoing_requests 5, the default proxy
    class Plain:
        def __init__(self) -> None:
            self.scorer = _Scorer(tracking_uri, model_uri, plan_file)

        async def __call__(self, request):
            if request.url.path.endswith("/healthz"):
                return {"status": "ok", "model_version": self.scorer.model.version}
            try:
                body = self.scorer.request_model.model_validate_json(await request.body())
            except ValidationError as exc:
                return JSONResponse({"detail": exc.errors(include_input=False)}, status_code=422)
            return self.scorer.answer(body.instances)

    # SIGTERM from the benchmark: leave through the finally below, which stops this private Ray.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for attempt in (1, 2):  # as bench_ray: a busy machine can miss Ray's fixed 30 s raylet registration
        try:
            ray.init(num_cpus=(os.cpu_count() or 2) + 2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
            break
        except Exception as exc:
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Plain.bind(), name="default", route_prefix="/")
        while True:
            time.sleep(1.0)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    mode, port_arg, tracking, uri = sys.argv[1:5]
    plan_arg = sys.argv[5] if len(sys.argv) > 5 else ""
    (_plain_main if mode == "plain" else _default_serve_main)(int(port_arg), tracking, uri, plan_arg)
