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


def deploy_model(settings: Settings, model_uri: str, route_prefix: str = "/", app_name: str = APP_NAME) -> Endpoint:
    """Serve ``model_uri`` (``models:/name@alias``) on the profile's host:port; Ray must be running.

    ``app_name``/``route_prefix``: several models can share one Serve, each its own app under its own prefix.

    The alias is resolved here, once, and the replicas load that version: moving the alias later
    changes nothing until the next deploy. Every wait is bounded by ``ray.op_timeout_s``.
    """
    import httpx
    from ray import serve

    from lakeray.registry import resolve_alias
    from lakeray.serving.app import build_app

    cfg = settings.profile.serve
    expected = resolve_alias(settings, model_uri)  # ModelRegistryError now, rather than a replica crash loop
    pinned = f"models:/{expected.name}/{expected.version}"
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    running_port = _running_serve_port()
    if running_port is not None and running_port != cfg.port:
        # serve.start would ignore the new port and the health wait would poll the wrong one.
        raise ClusterError(f"Ray Serve already runs in this Ray cluster on port {running_port}, not on serve.port "
                           f"{cfg.port}; a cluster's Serve listens on one port",
                           f"deploy with serve.port {running_port} (LAKERAY_SERVE__PORT), or restart Ray")
    if running_port is None and settings.profile.ray.address in (None, "", "auto", "local"):
        # Serve starts now in this local cluster: its proxy will bind the port on this machine.
        _refuse_busy_port(host, cfg.port)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    app = build_app(settings.mlflow_tracking_uri, pinned, cfg.max_batch_rows, cfg.num_replicas, cfg.replica_cpus)
    # serve.run waits for the replicas with no timeout (replicas that never get a CPU hang it forever):
    # submit without waiting, then wait here, bounded.
    serve.run_many([serve.RunTarget(target=app, name=app_name, route_prefix=route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    url = f"http://{_url_host(host)}:{cfg.port}{route_prefix.rstrip('/')}"
    deadline = time.monotonic() + settings.profile.ray.op_timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        app_status = serve.status().applications.get(app_name)
        if app_status is not None and app_status.status == "DEPLOY_FAILED":
            raise ClusterError(f"Ray Serve could not deploy {model_uri} (version {expected.version}): "
                               f"{_failure_reason(app_status)}",
                               "see the replica log (`ray logs`, /tmp/ray/session_latest/logs/serve/)")
        try:
            reply = httpx.get(f"{url}/healthz", timeout=5.0)
            if reply.status_code == 200:
                body = reply.json()
                if int(body["model_version"]) == expected.version:
                    return Endpoint(url, body["model"], expected.version, list(body["features"]))
                # The previous deployment still answering while the new one rolls out.
                last_error = f"it serves model version {body['model_version']}, not {expected.version}"
            else:
                last_error = f"HTTP {reply.status_code}"
        except httpx.HTTPError as exc:
            last_error = str(exc) or type(exc).__name__
        time.sleep(0.25)
    raise ClusterError(f"the endpoint {url} did not become healthy within {settings.profile.ray.op_timeout_s:.0f} s "
                       f"({last_error})",
                       "check `ray status` for CPUs (serve.replica_cpus) and the Serve logs (`ray logs`)")


def _failure_reason(app_status) -> str:
    """The root cause of a DEPLOY_FAILED app: the last line of a failed deployment's traceback (the
    app's own message only says which deployments failed)."""
    for message in [d.message for d in app_status.deployments.values()] + [app_status.message]:
        lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1][:500]
    return "no reason given"


def _running_serve_port() -> int | None:
    """The HTTP port of the Serve instance already running in this Ray cluster; None when there is none."""
    from ray.serve.context import _get_global_client  # no public Ray API tells the running proxy's port

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    return int(client.get_serve_details()["http_options"]["port"])


def _url_host(host: str) -> str:
    """An IPv6 literal goes in brackets in a URL (http://[::1]:8000)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _refuse_busy_port(host: str, port: int) -> None:
    """ClusterError now when something already listens on the port Serve's proxy is about to bind.

    The proxy would fail to bind it, and the health wait would poll that other program until
    ``ray.op_timeout_s`` (15 minutes by default) before saying anything; if the other program is
    another lakeray's Serve with the same model, it would even answer and pass for this one.
    """
    import socket

    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return  # nothing listens: Serve will bind it
    raise ClusterError(f"port {port} on {host} is already in use by another program (another `lakeray serve` "
                       "or demo, or any other server), so Ray Serve cannot listen there",
                       "stop that program, or choose a free port: serve.port in lakeray.yaml or LAKERAY_SERVE__PORT")
