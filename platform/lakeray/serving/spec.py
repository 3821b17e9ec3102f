"""ServeSpec: one YAML file (``jobs/serving/*.yaml``) describes one endpoint; it compiles to Ray Serve's
own config schema.

:func:`compile_app` turns a spec into a ``ServeApplicationSchema`` (Ray's pydantic model) and
:func:`deploy_config` into a whole ``ServeDeploySchema``, so the same file works with ``serve deploy``,
``serve status`` and as a KubeRay RayService's ``serveConfigV2``. What the replica needs (the pinned
model version, the tracking URI, batching, limits, the token's digest, the prediction log) travels in
the application's ``args``; Ray's application builder :func:`lakeray.serving.app.build_app` reads them.

The bearer token itself is never in a file: the spec names an environment variable, and only the
token's SHA-256 digest reaches the generated config.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lakeray.errors import ConfigError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["ServeSpec", "Canary", "OnlineFeatures", "OnlineFeatureTable", "load_serve_spec", "model_uri", "compile_app", "deploy_config", "app_args",
           "IMPORT_PATH", "DEPLOYMENT_NAME"]

IMPORT_PATH = "lakeray.serving.app:build_app"
DEPLOYMENT_NAME = "model"
_FIX = "fix the spec (docs/serving.md lists every field)"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Section):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 lets an idle app scale to zero).")
    max_replicas: int = Field(2, ge=1, description="Most replicas under load.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy (default: min_replicas).")
    target_ongoing_requests: float = Field(
        8, gt=0, description="Requests in flight per replica that autoscaling aims for (with batching, "
        "a replica handles a whole batch at once: keep this near the batch size you expect).")
    upscale_delay_s: float = Field(10, ge=0, description="Seconds of high load before replicas are added.")
    downscale_delay_s: float = Field(60, ge=0, description="Seconds of low load before replicas are removed.")
    # Serve's defaults (a report every 10 s, averaged over 30 s) added ~11 s to the scale-up reaction
    # (bench/serve_autoscale.py): the spec ships faster ones. Ray 2.60 still reads metrics_interval_s per
    # deployment (the replica's push period) though it marks the field deprecated for env vars to come.
    metrics_interval_s: float = Field(2.0, gt=0, description="Seconds between a replica's reports of its "
                                      "ongoing requests to Serve's autoscaler (Ray's default: 10).")
    look_back_period_s: float = Field(10.0, gt=0, description="Seconds of reports the autoscaler averages "
                                      "before deciding (Ray's default: 30); above metrics_interval_s.")

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s:g}) must be above metrics_interval_s "
                             f"({self.metrics_interval_s:g}): the autoscaler averages several reports")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                             f"and max_replicas ({self.min_replicas}..{self.max_replicas})")
        return self


class Resources(_Section):
    cpus: float = Field(0.5, gt=0, description="CPUs reserved per replica.")
    gpus: float = Field(0, ge=0, description="GPUs per replica (fractions share one GPU).")
    memory_mb: int | None = Field(None, ge=64, description="Memory reserved per replica (scheduling only).")


class Batching(_Section):
    max_batch_size: int = Field(
        64, ge=1, description="Requests scored together in one vectorised predict (1 turns batching off).")
    # 0: a batch is whatever queued while the previous predict ran. Measured (bench/serve_batching.py):
    # the same req/s at 64 connections as 2 ms, while an idle endpoint paid the 2 ms on every request.
    wait_timeout_ms: float = Field(0, ge=0, description="Longest wait for a batch to fill (0: score what has "
                                   "queued, never wait).")


class Limits(_Section):
    max_rows: int = Field(10_000, ge=1, description="Most instances one request may carry (more: 422).")
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body (more: 413).")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica takes at once.")


class Auth(_Section):
    token_env: str = Field(
        ..., description="Name of the environment variable that holds the bearer token when deploying. "
        "The token is never written in the spec; the generated config holds only its SHA-256 digest.")

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value


class Logging(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Replica log level.")
    access_log: bool = Field(False, description="Log every request in the replica's log (costs throughput).")


class PredictionLog(_Section):
    enabled: bool = Field(True, description="Append every prediction to a Delta table, off the request path.")
    table: str = Field("prediction_log", description="Table name under <storage.root>/tables/.")
    flush_rows: int = Field(1_000, ge=1, description="Flush (one Delta commit) when this many rows wait.")
    flush_seconds: float = Field(5.0, gt=0, description="Flush at least this often while rows wait.")
    max_buffer_rows: int = Field(100_000, ge=1, description="Rows held while the table is unreachable; "
                                 "beyond this the oldest are dropped (and counted), never the request.")


class Canary(_Section):
    model: str = Field(..., description="The challenger: name@alias or name/version (same features as `model`).")
    percent: float = Field(..., gt=0, lt=100, description="Share of requests (by request id) the challenger serves.")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return _check_model(value)


class OnlineFeatureTable(_Section):
    """One Delta feature table the replica keeps in memory (Feast: a feature view in the online store)."""

    table: str = Field(..., description="Feature table name under <storage.root>/tables/.")
    entity_keys: list[str] = Field(..., min_length=1, description="The table's key columns (integer or string).")
    request_keys: dict[str, str] | None = Field(
        None, description="Key column → the request field that carries it (default: the same names).")
    columns: list[str] | None = Field(
        None, description="Feature columns to serve (default: every column of the table the model uses).")
    event_time: str | None = Field(
        None, description="Column that orders an entity's rows: the newest row is served (none: one row per entity).")
    max_age_s: float | None = Field(None, gt=0, description="A newest row older than this counts as unknown.")
    version: int | None = Field(None, ge=0, description="Serve this version only (none: the latest, followed).")

    @model_validator(mode="after")
    def _keys(self) -> OnlineFeatureTable:
        if self.request_keys is not None and set(self.request_keys) != set(self.entity_keys):
            raise ValueError(f"request_keys maps {sorted(self.request_keys)} but entity_keys are "
                             f"{sorted(self.entity_keys)}: map exactly the entity keys")
        return self


class OnlineFeatures(_Section):
    """Online features: a request names entity keys plus request-time fields; the replica looks the rest
    up in memory from pinned versions of Delta feature tables (Feast's online store + feature service)."""

    tables: list[OnlineFeatureTable] | None = Field(
        None, description="Feature tables to look up (default: those of the model's training set, from its "
        "manifest: the same tables, columns, keys and names as in training).")
    from_request: list[str] = Field(
        default_factory=list, description="Features the training set took from a table that requests carry "
        "themselves instead (transaction-level values such as the amount).")
    defaults: dict[str, float | str | bool | None] = Field(
        default_factory=dict, description="Values served for an unknown entity (unlisted features: null, "
        "i.e. missing, as in training for an entity without history).")
    refresh_s: float = Field(30.0, ge=0, description="Seconds between checks for a newer table version "
                             "(0: never; load once at replica start).")


def _check_model(value: str) -> str:
    rest = value.removeprefix("models:/")
    if not re.fullmatch(r"[^@/\s]+(@[A-Za-z0-9_-]+|/\d+)", rest):
        raise ValueError(f"{value!r}: write name@alias (lakeray_fraud_xgb@champion) or name/version")
    return value


class ServeSpec(_Section):
    """One endpoint: a registered model behind an autoscaling Ray Serve app on its own route."""

    name: str = Field(..., description="Application name (unique in the cluster's Serve).")
    route: str = Field(..., description="Route prefix, e.g. /fraud: POST <route>/predict.")
    model: str = Field(..., description="Registered model: name@alias, name/version or models:/… of either.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica count bounds and targets.")
    resources: Resources = Field(default_factory=Resources, description="Resources per replica.")
    batching: Batching = Field(default_factory=Batching, description="@serve.batch settings.")
    limits: Limits = Field(default_factory=Limits, description="Request size limits.")
    auth: Auth | None = Field(None, description="Bearer-token auth (none: open).")
    logging: Logging = Field(default_factory=Logging, description="Replica logs.")
    prediction_log: PredictionLog = Field(default_factory=PredictionLog, description="The Delta prediction log.")
    canary: Canary | None = Field(None, description="Send a share of the traffic to a challenger model.")
    features: OnlineFeatures | None = Field(None, description="Online feature lookup (none: requests carry "
                                            "every feature).")

    @field_validator("name")
    @classmethod
    def _app_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
            raise ValueError(f"{value!r}: use letters, digits, '_', '-', '.' (at most 63)")
        return value

    @field_validator("route")
    @classmethod
    def _route(cls, value: str) -> str:
        if not re.fullmatch(r"/([A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*)?", value):
            raise ValueError(f"{value!r}: a path such as /fraud (starts with /, no trailing /, no spaces)")
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return _check_model(value)

    @classmethod
    def parse(cls, data: Any, where: str = "serve spec") -> ServeSpec:
        from lakeray.config import parse_spec

        return parse_spec(cls, data, where, "jobs/serving/*.yaml", _FIX, keys_doc="docs/serving.md")


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key (misspelled? docs/serving.md lists the keys)"
    return str(error["msg"]).removeprefix("Value error, ")


def load_serve_spec(path: str | os.PathLike[str]) -> ServeSpec:
    from lakeray.config import read_spec_file

    return ServeSpec.parse(read_spec_file(path, "serve spec", "jobs/serving/fraud.yaml"), str(path))


def model_uri(spec: ServeSpec | Canary) -> str:
    """``models:/name@alias`` or ``models:/name/N`` (of the spec's model, or of its canary)."""
    return spec.model if spec.model.startswith("models:/") else f"models:/{spec.model}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def app_args(spec: ServeSpec, settings: Settings, pinned_uri: str, environ: dict[str, str] | None = None,
             canary_uri: str | None = None, where: str = "serve spec") -> dict[str, Any]:
    """What the application builder receives (JSON only: it travels in the Serve config). With online
    features, the lookup plan is resolved here, once, against the registry and the tables."""
    environ = os.environ if environ is None else environ
    digest = None
    if spec.auth is not None:
        token = environ.get(spec.auth.token_env, "")
        if not token:
            raise ConfigError(f"auth.token_env: the environment variable {spec.auth.token_env} is not set (or empty)",
                              f"export {spec.auth.token_env}=<a long random token> before deploying")
        digest = token_digest(token)
    log = spec.prediction_log
    return {
        "app": spec.name,
        "tracking_uri": settings.mlflow_tracking_uri,
        "model_uri": pinned_uri,
        "max_rows": spec.limits.max_rows,
        "max_request_bytes": spec.limits.max_request_bytes,
        "max_batch_size": spec.batching.max_batch_size,
        "batch_wait_timeout_s": spec.batching.wait_timeout_ms / 1000.0,
        "token_sha256": digest,
        "log_table_uri": settings.table_path(log.table) if log.enabled else None,
        "log_flush_rows": log.flush_rows,
        "log_flush_seconds": log.flush_seconds,
        "log_max_buffer_rows": log.max_buffer_rows,
        "canary_uri": canary_uri if spec.canary else None,
        "canary_percent": spec.canary.percent if spec.canary else 0.0,
        "features": _online_plan(spec, settings, pinned_uri, where),
    }


def _online_plan(spec: ServeSpec, settings: Settings, pinned_uri: str, where: str) -> dict[str, Any] | None:
    if spec.features is None:
        return None
    from lakeray.serving.online import plan_online_features

    return plan_online_features(settings, spec.features, pinned_uri, where)


def compile_app(spec: ServeSpec, settings: Settings, pinned_uri: str, environ: dict[str, str] | None = None,
                where: str = "serve spec", canary_uri: str | None = None) -> Any:
    """The spec as Ray's ``ServeApplicationSchema`` (validated by Ray's own model)."""
    from ray.serve.schema import ServeApplicationSchema

    scale = spec.autoscaling
    actor_options: dict[str, Any] = {"num_cpus": spec.resources.cpus}
    if spec.resources.gpus:
        actor_options["num_gpus"] = spec.resources.gpus
    if spec.resources.memory_mb:
        actor_options["memory"] = spec.resources.memory_mb * 1024 * 1024
    deployment = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": spec.limits.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": scale.min_replicas,
            "max_replicas": scale.max_replicas,
            "initial_replicas": scale.initial_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests,
            "upscale_delay_s": scale.upscale_delay_s,
            "downscale_delay_s": scale.downscale_delay_s,
            "metrics_interval_s": scale.metrics_interval_s,
            "look_back_period_s": scale.look_back_period_s,
        },
        "ray_actor_options": actor_options,
        "logging_config": {"log_level": spec.logging.level, "enable_access_log": spec.logging.access_log},
    }
    raw = {"name": spec.name, "route_prefix": spec.route, "import_path": IMPORT_PATH,
           "args": app_args(spec, settings, pinned_uri, environ, canary_uri, where), "deployments": [deployment]}
    try:
        return ServeApplicationSchema.model_validate(raw)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: Ray Serve refuses the generated application config: {fields}", _FIX) from None


def deploy_config(apps: list[Any], settings: Settings, where: str = "serve spec") -> Any:
    """Applications (``ServeApplicationSchema``) as one ``ServeDeploySchema`` on the profile's host:port."""
    from ray.serve.schema import ServeDeploySchema

    cfg = settings.profile.serve
    raw = {"proxy_location": "EveryNode", "http_options": {"host": cfg.host, "port": cfg.port},
           "applications": [app.model_dump(exclude_unset=True) for app in apps]}
    try:
        return ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {_message(e)}" for e in exc.errors())
        raise ConfigError(f"{where}: Ray Serve refuses the combined config: {fields}",
                          "each app needs its own name and route (`lakeray serve list` shows the running ones)"
                          ) from None
