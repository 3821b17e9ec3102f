"""The model endpoint: a Ray Serve deployment whose FastAPI app is built at replica start from the model.

Routes (under the app's route prefix):

- ``POST /predict`` ``{"instances": [{"<feature>": value, ...}, ...]}`` → ``{"predictions": [...],
  "model", "model_version", "request_id"}``. The body schema is generated from the model's features
  (:func:`lakeray.serving.model.instance_model`), so ``/docs`` and ``/openapi.json`` show the real
  fields. Malformed input is a 422 naming the field (values given wrongly first, then missing
  ones), never a 500; a body over ``max_request_bytes`` is a 413; with auth, a missing or wrong
  bearer token is a 401. The request id is Serve's ``X-Request-Id`` (the caller's, or one the proxy
  made), returned in the body and the header.
- With online features (:mod:`lakeray.serving.online`) an instance carries the entity key fields and
  the request-time features; the replica looks the rest up in memory, and the answer adds
  ``feature_versions`` (table → version served) and ``unknown_entities`` (per instance, the tables
  whose entity was unknown: their declared defaults were served).
- ``GET /healthz``: the model and version this replica serves, its features, batch, log and online
  feature figures. ``GET /metrics``: this replica's Prometheus metrics (:mod:`lakeray.serving.metrics`;
  the same figures go to Ray's metrics export port for the whole cluster).

Requests are scored together with ``@serve.batch`` (one feature lookup and one vectorised predict per
batch). Each answer is queued for the prediction log (:mod:`lakeray.serving.prediction_log`) after it is computed.

The replica resolves nothing: the deploy pinned the model version (``models:/name/N``) in the app's
args, so moving an alias changes nothing until the next deploy. No ``from __future__ import
annotations`` here: FastAPI and Ray's builder read these annotations at runtime.
"""

import asyncio
import hashlib
import hmac
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

__all__ = ["AppArgs", "PredictResponse", "ModelServer", "build_app"]

_MAX_REQUEST_ID = 200
_MAX_ERRORS = 50


class AppArgs(BaseModel):
    """The application builder's arguments (the ``args`` of the generated Serve config)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    app: str
    tracking_uri: str
    model_uri: str = Field(description="models:/name/N: the version pinned at deploy time.")
    max_rows: int = 10_000
    max_request_bytes: int = 8 * 1024 * 1024
    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.002
    token_sha256: Optional[str] = None
    log_table_uri: Optional[str] = None
    log_flush_rows: int = 1000
    log_flush_seconds: float = 5.0
    log_max_buffer_rows: int = 100_000
    canary_uri: Optional[str] = Field(None, description="models:/name/N of the challenger, or none.")
    canary_percent: float = Field(0.0, ge=0, lt=100)
    features: Optional[dict] = Field(None, description="The online feature plan (lakeray.serving.online.OnlinePlan).")


class PredictResponse(BaseModel):
    predictions: list[Any] = Field(description="One score per instance (P(label = 1) for a binary model).")
    model: str
    model_version: int
    request_id: str
    feature_versions: Optional[dict[str, int]] = Field(
        None, description="Online features: the version of each feature table the values came from.")
    unknown_entities: Optional[list[list[str]]] = Field(
        None, description="Online features: per instance, the tables whose entity was unknown (defaults served).")


@dataclass(slots=True)
class _Scored:
    """One request's share of a batch."""

    scores: list
    unknown: Optional[list] = None  # per row: tables whose entity was unknown
    versions: Optional[dict] = None  # table → version served
    looked_up: Optional[list] = None  # per row: the looked-up values (for the prediction log)


class _BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 before anything parses it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._too_large(send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any) -> None:
        import json

        payload = json.dumps({"detail": [{"loc": ["body"], "type": "too_large",
                                          "msg": f"request body over {self.limit} bytes"}]}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


class _Metered:
    """ASGI middleware: every ``/predict`` answer counted by status code and model version (the version
    the handler put in ``x-model-version``; refusals count against the app's model), latency observed."""

    def __init__(self, app: Any, server: Any) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").endswith("/predict"):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        seen = {"code": 500, "version": None}
        self.server.in_flight += 1

        async def observed(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["code"] = message["status"]
                for key, value in message.get("headers", []):
                    if key == b"x-model-version":
                        seen["version"] = value.decode()
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.server.in_flight -= 1
            model = self.server.model
            version = seen["version"] or str(model.version)
            name = self.server.canary.name if self.server.canary and version != str(model.version) else model.name
            self.server.metrics.answered(name, version, seen["code"], time.perf_counter() - started)


def _errors(raw: list[dict]) -> list[dict]:
    """FastAPI's validation errors as ``{loc, msg, type}`` (no echoed input: it may be a non-finite
    number that JSON cannot carry); within an instance, wrongly given values before missing features."""
    errors = [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in raw]
    errors.sort(key=lambda e: len(e["loc"]) > 2 and e["type"] == "missing")
    return errors[:_MAX_ERRORS]


@serve.deployment(name="model", max_ongoing_requests=64)
@serve.ingress()
class ModelServer:
    def __init__(self, args: dict):
        import ray

        from lakeray.serving.metrics import EndpointMetrics
        from lakeray.serving.model import instance_model, load_served_model
        from lakeray.serving.online import OnlinePlan, OnlineStore
        from lakeray.serving.prediction_log import PredictionLog

        self.args = AppArgs.model_validate(args)
        context = ray.get_runtime_context()
        # Outside a worker (the replica built in-process by bench/serve_layers.py) there is no assignment.
        cpus = context.get_assigned_resources().get("CPU", 1.0) if context.worker.mode == ray.WORKER_MODE else 1.0
        self.model = load_served_model(self.args.tracking_uri, self.args.model_uri, threads=max(1, round(cpus)))
        self.metrics = EndpointMetrics(self.args.app)
        self.online = None
        if self.args.features:
            plan = OnlinePlan.model_validate(self.args.features)
            self.online = OnlineStore(plan, self.model, keep_raw=bool(self.args.log_table_uri))
            self.instance = instance_model(self.model, plan.request_fields(), plan.looked_up())
            self._served_versions: dict = {}
        else:
            self.instance = instance_model(self.model)
        self.canary = None
        if self.args.canary_uri and self.args.canary_percent > 0:
            self.canary = load_served_model(self.args.tracking_uri, self.args.canary_uri, threads=max(1, round(cpus)))
            if (self.canary.features, self.canary.categorical) != (self.model.features, self.model.categorical):
                raise ValueError(f"canary {self.args.canary_uri} has other features than {self.args.model_uri}: "
                                 "a canary must take the same request")
        self.batch_sizes: Counter = Counter()
        self.in_flight = 0  # /predict requests inside this replica now (the _Metered middleware counts them)
        for batched in (self._score, self._score_canary):
            batched.set_max_batch_size(self.args.max_batch_size)
            batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self.log = None
        if self.args.log_table_uri:
            self.log = PredictionLog(self.args.log_table_uri, self.args.app, self.model.name, self.model.version,
                                     self.args.log_flush_rows, self.args.log_flush_seconds,
                                     self.args.log_max_buffer_rows)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _score(self, requests: list) -> list:
        return self._vectorised(self.model, requests)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _score_canary(self, requests: list) -> list:
        return self._vectorised(self.canary, requests)

    def _vectorised(self, model: Any, requests: list) -> list:
        """One feature lookup and one predict for the whole batch (each request: its rows), split back."""
        self.batch_sizes[len(requests)] += 1
        self.metrics.batch(model.name, model.version, len(requests))
        rows = requests[0] if len(requests) == 1 else [row for rows in requests for row in rows]
        lookup = self.online.lookup(rows) if self.online is not None else None
        scores = model.predict(model.matrix(rows, lookup.features if lookup is not None else None))
        if lookup is not None:
            self._count_lookup(lookup)
        out, start = [], 0
        for request in requests:
            end = start + len(request)
            if lookup is None:
                out.append(_Scored(scores=scores[start:end]))
            else:
                out.append(_Scored(scores=scores[start:end], unknown=lookup.unknown[start:end],
                                   versions=lookup.versions,
                                   looked_up=lookup.raw[start:end] if lookup.raw is not None else None))
            start = end
        return out

    def _count_lookup(self, lookup: Any) -> None:
        tables = Counter(table for row in lookup.unknown for table in row)
        for table, count in tables.items():
            self.metrics.unknown_entities(table, count)
        if lookup.versions != self._served_versions:
            self._served_versions = lookup.versions
            self.metrics.feature_versions(lookup.versions)

    def _to_canary(self, request_id: str) -> bool:
        """The challenger's share, by a hash of the request id (a retried request goes the same way)."""
        if self.canary is None:
            return False
        return zlib.crc32(request_id.encode()) % 10_000 < self.args.canary_percent * 100

    def __serve_build_asgi_app__(self):
        from fastapi import Depends, FastAPI, HTTPException, Request, Response
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse

        server, model, instance = self, self.model, self.instance
        request_model = _request_model(instance, model, self.args.max_rows)
        api = FastAPI(title=f"lakeray endpoint: {model.name} v{model.version}", docs_url="/docs",
                      description=f"Scores instances with registered model {model.name} version {model.version} "
                                  f"({model.kind}).")

        @api.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            return JSONResponse({"detail": _errors(exc.errors())}, status_code=422)

        # async: a sync dependency is run in the thread pool, a hop that cost ~0.4 ms a request (docs/serving.md).
        async def authorised(request: Request) -> None:
            if server.args.token_sha256 is None:
                return
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            digest = hashlib.sha256(token.strip().encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, server.args.token_sha256):
                raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

        # FastAPI answers 400 itself for a body it cannot decode at all (not UTF-8): documented, so the
        # published schema lists every status the endpoint gives (schemathesis' status conformance).
        responses = {400: {"description": "body is not UTF-8 text"},
                     401: {"description": "missing or wrong bearer token"}, 413: {"description": "body too large"}}

        # No token configured: no dependency to solve per request.
        guards = [Depends(authorised)] if self.args.token_sha256 is not None else []

        @api.post("/predict", response_model=PredictResponse, dependencies=guards, responses=responses)
        async def predict(body: request_model, request: Request) -> JSONResponse:  # type: ignore[valid-type]
            started = time.perf_counter()
            # Serve's proxy puts the caller's X-Request-Id (or one it made) in the request and the reply.
            given = request.headers.get("x-request-id", "")
            request_id = given if 0 < len(given) <= _MAX_REQUEST_ID else uuid.uuid4().hex
            rows = [item.model_dump(by_alias=True) for item in body.instances]
            canary = server._to_canary(request_id)
            served = server.canary if canary else model
            if server.in_flight <= 1:
                # One event-loop turn: requests that arrived with this one enter the replica and count.
                await asyncio.sleep(0)
            if server.in_flight <= 1:
                # Alone in the replica: nothing to batch with, so score here. The @serve.batch hand-off
                # (a queue, a task, a gather and Serve's four batch metrics) cost more than the predict.
                scored = server._vectorised(served, [rows])[0]
            else:
                scored = await (server._score_canary(rows) if canary else server._score(rows))
            latency_ms = (time.perf_counter() - started) * 1000.0
            if server.log is not None:
                logged = rows if scored.looked_up is None else [{**row, **values} for row, values
                                                                 in zip(rows, scored.looked_up, strict=True)]
                server.log.append(request_id, logged, scored.scores, latency_ms, served.name, served.version)
            # A ready response: FastAPI would validate the returned model against response_model and then
            # serialise it (the schema in /docs still comes from response_model).
            return JSONResponse({"predictions": scored.scores, "model": served.name, "model_version": served.version,
                                 "request_id": request_id, "feature_versions": scored.versions,
                                 "unknown_entities": scored.unknown},
                                headers={"x-model-version": str(served.version)})

        @api.get("/healthz")
        def healthz() -> dict:
            canary = server.canary
            return {"status": "ok", "app": server.args.app, "model": model.name, "model_version": model.version,
                    "kind": model.kind, "features": model.features,
                    "request_fields": [f.alias for f in instance.model_fields.values()],
                    "canary": {"model": canary.name, "model_version": canary.version,
                               "percent": server.args.canary_percent} if canary is not None else None,
                    "batch_sizes": {str(k): v for k, v in sorted(server.batch_sizes.items())},
                    "prediction_log": server.log.stats() if server.log is not None else None,
                    "online_features": server.online.stats() if server.online is not None else None}

        @api.get("/metrics", response_class=Response,
                 responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
        def metrics() -> Response:
            body, content_type = server.metrics.exposition()
            return Response(body, media_type=content_type)

        api.add_middleware(_BodyLimit, limit=self.args.max_request_bytes)
        api.add_middleware(_Metered, server=self)  # outermost: 413s are counted too
        return api

    def __del__(self):
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
        online = getattr(self, "online", None)
        if online is not None:
            online.close()


def _request_model(instance: Any, model: Any, max_rows: int) -> Any:
    from pydantic import create_model

    return create_model(
        f"{model.name}_v{model.version}_request",
        __config__=ConfigDict(extra="forbid", title=f"{model.name} v{model.version} request"),
        instances=(list[instance], Field(..., min_length=1, max_length=max_rows,
                                         description=f"Rows to score (1 to {max_rows}).")),
    )


def build_app(args: dict):
    """Ray Serve's application builder (``import_path: lakeray.serving.app:build_app``)."""
    parsed = AppArgs.model_validate(args)
    return ModelServer.bind(parsed.model_dump())
