"""Deploy a registered model to Ray Serve and wait (bounded) until it answers over HTTP."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakeray.errors import ClusterError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["Endpoint", "deploy_model", "APP_NAME"]

APP_NAME = "lakeray"


@dataclass(frozen=True)
class Endpoint:
    url: str  # base URL; POST {url}/predict, GET {url}/healthz
    model: str
    model_version: int
    features: list[str]


def deploy_model(settings: Settings, model_uri: str, route_prefix: str = "/") -> Endpoint:
    """Serve ``model_uri`` (``models:/name@alias``) on the profile's host:port; Ray must be running."""
    import httpx
    from ray import serve

    from lakeray.serving.app import build_app

    cfg = settings.profile.serve
    from lakeray.registry import resolve_alias

    expected = resolve_alias(settings, model_uri)  # ModelRegistryError now, rather than a replica crash loop
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    if settings.profile.ray.address in (None, "", "auto", "local"):  # Serve's proxy listens on this machine
        _refuse_busy_port(host, cfg.port)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    app = build_app(settings.mlflow_tracking_uri, model_uri, cfg.max_batch_rows, cfg.num_replicas,
                    cfg.replica_cpus)
    try:
        serve.run(app, name=APP_NAME, route_prefix=route_prefix, blocking=False)
    except RuntimeError as exc:
        raise ClusterError(f"Ray Serve could not deploy {model_uri}: {exc}",
                           "see the replica log above (`ray logs`)") from None
    url = f"http://{host}:{cfg.port}{route_prefix.rstrip('/')}"
    deadline = time.monotonic() + settings.profile.ray.op_timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/healthz", timeout=5.0)
            if reply.status_code == 200:
                body = reply.json()
                if int(body["model_version"]) == expected.version:
                    return Endpoint(url, body["model"], expected.version, list(body["features"]))
                # An earlier deployment still answering (a rollout in progress), or another cluster's.
                last_error = f"it serves model version {body['model_version']}, not {expected.version}"
            else:
                last_error = f"HTTP {reply.status_code}"
        except httpx.HTTPError as exc:
            last_error = str(exc) or type(exc).__name__
        time.sleep(0.25)
    raise ClusterError(f"the endpoint {url} did not become healthy ({last_error})",
                       "check the Serve logs (`ray logs`) and that the port is free")


def _refuse_busy_port(host: str, port: int) -> None:
    """ClusterError now when a program other than a Ray Serve proxy listens on the serve port.

    Serve's proxy would fail to bind it, and the health wait would poll that other program until
    ``ray.op_timeout_s`` (15 minutes by default) before saying anything. A Serve proxy already there
    is this cluster's on a redeploy (or another cluster's, which the version check then reports).
    """
    import socket

    import httpx

    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return  # nothing listens: Serve will bind it
    try:
        reply = httpx.get(f"http://{host}:{port}/-/healthz", timeout=2.0)
        if reply.status_code == 200:
            return
        answer = f"HTTP {reply.status_code}"
    except httpx.HTTPError as exc:
        answer = type(exc).__name__
    raise ClusterError(f"port {port} on {host} is taken by another program (it answered Ray Serve's "
                       f"/-/healthz with {answer}), so Ray Serve cannot listen there",
                       "stop that program, or choose a free port: serve.port in lakeray.yaml or LAKERAY_SERVE__PORT")
