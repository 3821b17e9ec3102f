"""Where one request's time goes inside a lakeray replica, per layer, in one process, without HTTP.

The replica's own class (``lakeray.serving.app.ModelServer`` without Serve's wrapper) is built in this
process with the app's real args (online lookup and prediction log on), its FastAPI app is driven with
its ASGI interface directly, and each layer is timed alone over the same request (µs per request, the
median of ``rounds × loops`` single calls):

- ``validate``: the generated request schema parses the JSON body (pydantic);
- ``lookup``: the online feature lookup of one instance (dict probe + gather);
- ``matrix``: the feature matrix of one instance;
- ``predict``: XGBoost's one-row ``inplace_predict``;
- ``vectorised``: lookup + matrix + predict + the metrics of a batch, as the batch function does it;
- ``batch_handoff``: ``await server._score(rows)`` (the ``@serve.batch`` queue) minus ``vectorised``
  (only paid with more than one request in the replica: one alone is scored inline);
- ``metrics``: what one answer records (``answered``; the batch's own record is in ``vectorised``);
- ``log_append``: queueing the answer for the prediction log;
- ``asgi_total``: the whole FastAPI app (middlewares, dependency, validation, batch, response);
- ``asgi_other``: ``asgi_total`` minus validate, vectorised, metrics and log_append: FastAPI routing
  and body parsing, the response, the middlewares, the one event-loop turn a lone request yields.

The HTTP path (HAProxy, Serve's replica request path) is what a c=1 p50 over HTTP adds to
``asgi_total``; bench/serve_latency.py prints both. As a script: ``python bench/serve_layers.py``
(trains the bench model, writes a small feature table, starts a local Ray for the replica's runtime
context) prints the table. It reads the replica's private prediction-log queue to empty it (timing
only: nothing timed here reaches the table).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

__all__ = ["online_table", "online_features", "online_body", "layer_breakdown_us"]

ENTITIES = 10_000
LOOKED_UP = 20  # of the model's 30 features, the first 20 come from the feature table; the rest from the request
TABLE = "bench_entities"


def online_table(settings, features: list[str], entities: int = ENTITIES, seed: int = 5) -> str:
    """A small Delta feature table: ``entity_id`` (int64) and the first ``LOOKED_UP`` model features."""
    import numpy as np
    import pandas as pd
    from deltalake import write_deltalake

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.standard_normal((entities, LOOKED_UP), dtype=np.float32), columns=features[:LOOKED_UP])
    frame.insert(0, "entity_id", np.arange(entities, dtype=np.int64))
    uri = settings.table_path(TABLE)
    write_deltalake(uri, frame, mode="overwrite")
    return uri


def online_features(features: list[str]) -> dict:
    """The ServeSpec ``features:`` block for :func:`online_table`."""
    return {"tables": [{"table": TABLE, "entity_keys": ["entity_id"], "columns": features[:LOOKED_UP]}],
            "refresh_s": 30.0}


def online_body(features: list[str], entity_id: int = 17, seed: int = 11) -> bytes:
    """One instance: the entity key plus the request-time features."""
    import json
    import random

    rnd = random.Random(seed)
    instance = {"entity_id": entity_id, **{name: round(rnd.gauss(0, 1), 4) for name in features[LOOKED_UP:]}}
    return json.dumps({"instances": [instance]}).encode()


def _replica(args: dict) -> Any:
    """The replica's own object, built as Serve's wrapper builds it but outside a replica. A replica
    context is set first, as in a replica: @serve.batch reads it, and Ray's metrics add its tags."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.config import DeploymentConfig
    from ray.serve.context import _set_internal_replica_context
    from ray.serve.schema import ReplicaRank

    from lakeray.serving.app import ModelServer

    cls = ModelServer.func_or_class.__mro__[1]  # Serve's ASGIIngressWrapper subclasses the user class
    server = cls.__new__(cls)
    _set_internal_replica_context(
        replica_id=ReplicaID("in-process", DeploymentID("model", args["app"])), servable_object=server,
        _deployment_config=DeploymentConfig(max_ongoing_requests=64), rank=ReplicaRank(rank=0, node_rank=0,
                                                                                      local_rank=0), world_size=1)
    cls.__init__(server, args)
    return server


def layer_breakdown_us(args: dict, body: bytes, route: str = "/predict", loops: int = 400,
                       rounds: int = 5) -> dict:
    """µs per request of each layer (see the module doc). Needs a connected Ray (the replica asks its
    runtime context for its CPUs); the app's prediction log is closed before returning."""
    from ray.serve import context

    try:
        return asyncio.run(_breakdown(args, body, route, loops, rounds))
    finally:
        context._INTERNAL_REPLICA_CONTEXT = None  # this process is a driver again (its Serve calls)


def _asgi_call(api: Any, route: str, body: bytes) -> Any:
    """One POST straight into the ASGI app (no client library: its own cost would count as the app's)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", b"0123456789abcdef")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": route, "raw_path": route.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}

    async def call() -> None:
        status = [0]
        sent = [False]

        async def receive() -> dict:
            if sent[0]:
                return {"type": "http.disconnect"}
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]

        await api(dict(scope), receive, send)
        if status[0] != 200:
            raise RuntimeError(f"in-process request answered {status[0]}")

    return call


async def _breakdown(args: dict, body: bytes, route: str, loops: int, rounds: int) -> dict:
    server = _replica(args)
    try:
        api = server.__serve_build_asgi_app__()
        model = server.model
        parsed = server.instance  # warm pydantic's schema caches before timing
        request_model = next(r for r in api.routes if getattr(r, "path", "") == "/predict").body_field.field_info.annotation
        rows = [i.model_dump(by_alias=True) for i in request_model.model_validate_json(body).instances]
        del parsed

        async def timed(fn, is_async: bool = False) -> float:
            # The median of single calls, like a load test's p50: on a shared machine a loop's mean
            # also counts the time other processes held the core.
            samples = []
            for _ in range(rounds * loops):
                started = time.perf_counter_ns()
                if is_async:
                    await fn()
                else:
                    fn()
                samples.append(time.perf_counter_ns() - started)
            return statistics.median(samples) / 1e3

        lookup = server.online.lookup(rows) if server.online is not None else None
        given = lookup.features if lookup is not None else None
        x = model.matrix(rows, given)
        out: dict[str, float] = {}
        out["validate"] = await timed(lambda: request_model.model_validate_json(body))
        out["lookup"] = await timed(lambda: server.online.lookup(rows)) if server.online is not None else 0.0
        out["matrix"] = await timed(lambda: model.matrix(rows, given))
        out["predict"] = await timed(lambda: model.predict(x))
        out["vectorised"] = await timed(lambda: server._vectorised(model, [rows]))
        handoff = await timed(lambda: server._score(rows), is_async=True)
        out["batch_handoff"] = max(0.0, handoff - out["vectorised"])
        out["metrics"] = await timed(lambda: server.metrics.answered(model.name, model.version, 200, 0.001))
        if server.log is not None:
            out["log_append"] = await timed(lambda: server.log.append("r", rows, [0.5], 1.0))
            server.log._pending.clear()  # not for the table: timing only
            server.log._pending_rows = 0
        else:
            out["log_append"] = 0.0
        call = _asgi_call(api, route, body)
        await call()
        out["asgi_total"] = await timed(call, is_async=True)
        if server.log is not None:
            server.log._pending.clear()
            server.log._pending_rows = 0
        # At c=1 the request is scored inline (alone in the replica): no @serve.batch hand-off.
        accounted = sum(out[k] for k in ("validate", "vectorised", "metrics", "log_append"))
        out["asgi_other"] = max(0.0, out["asgi_total"] - accounted)
        return {k: round(v, 1) for k, v in out.items()}
    finally:
        server.__del__()


def main() -> int:
    import tempfile

    from servelib import bench_ray, bench_settings, register_model, serve_spec  # noqa: E402

    from lakeray.serving.spec import app_args

    with tempfile.TemporaryDirectory(prefix="lakeray-bench-layers-") as root:
        settings = bench_settings(root)
        model = register_model(settings)
        online_table(settings, model["features"])
        spec = serve_spec("bench-layers", "/layers", features=online_features(model["features"]))
        body = online_body(model["features"])
        with bench_ray(settings):
            args = app_args(spec, settings, model["uri"])
            figures = layer_breakdown_us(args, body)
    width = max(map(len, figures))
    for layer, us in figures.items():
        print(f"{layer:<{width}} {us:>9.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
