"""Deploy, list, inspect and delete lakeray endpoints on the Ray Serve of the connected cluster.

A deploy goes the way ``serve deploy`` goes: the ServeSpec is compiled to Ray's ``ServeDeploySchema``
(:mod:`lakeray.serving.spec`) together with the other declaratively deployed apps, and applied with
the controller's ``deploy_apps``. Several apps (dev, uat, prod) share one Serve under their own routes;
deploying one never touches the others. Before anything is applied: the model/alias must exist in the
registry (it is pinned to its version here), the replica's CPUs/GPUs must fit a node and the minimum
replicas the cluster, and the route must be free. After: a bounded wait until the app is RUNNING and
``/healthz`` answers with the pinned version, over HTTP at the cluster's address (not the driver's
loopback when Ray runs elsewhere). Every wait is bounded by ``ray.op_timeout_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lakeray.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from lakeray.config import Settings
    from lakeray.serving.spec import ServeSpec

__all__ = ["Endpoint", "AppInfo", "deploy", "deploy_model", "promote_app", "list_apps", "app_status", "delete_app",
           "delete_apps", "spec_for_model", "endpoint_host", "APP_NAME"]

APP_NAME = "lakeray"
_WILDCARD = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Endpoint:
    url: str  # base URL; POST {url}/predict, GET {url}/healthz
    model: str
    model_version: int
    features: list[str]
    app: str = APP_NAME


@dataclass(frozen=True)
class AppInfo:
    name: str
    route: str | None
    status: str
    model_uri: str | None  # the pinned version (lakeray apps), None for other Serve apps
    replicas: dict[str, int] = field(default_factory=dict)  # replica state → count
    message: str = ""
    url: str | None = None


def spec_for_model(settings: Settings, model_uri: str, route_prefix: str = "/", app_name: str = APP_NAME) -> ServeSpec:
    """The spec of the profile's ``serve`` section for one model (``lakeray serve``, the demo)."""
    from lakeray.serving.spec import ServeSpec

    cfg = settings.profile.serve
    return ServeSpec.parse({
        "name": app_name, "route": route_prefix, "model": model_uri,
        "autoscaling": {"min_replicas": cfg.num_replicas, "max_replicas": cfg.num_replicas},
        "resources": {"cpus": cfg.replica_cpus}, "limits": {"max_rows": cfg.max_batch_rows},
    }, "serve section of the profile")


def deploy_model(settings: Settings, model_uri: str, route_prefix: str = "/", app_name: str = APP_NAME) -> Endpoint:
    """Serve ``model_uri`` (``models:/name@alias``) with the profile's serve settings; Ray must be running."""
    return deploy(settings, spec_for_model(settings, model_uri, route_prefix, app_name))


def deploy(settings: Settings, spec: ServeSpec, where: str = "serve spec",
           environ: dict[str, str] | None = None) -> Endpoint:
    """Validate, apply and wait until healthy; returns the endpoint (it keeps running in the cluster)."""
    from lakeray.registry import resolve_alias
    from lakeray.serving.spec import compile_app, model_uri

    uri = model_uri(spec)
    expected = resolve_alias(settings, uri)  # ModelRegistryError now, rather than a replica crash loop
    canary = resolve_alias(settings, model_uri(spec.canary)).version_uri if spec.canary else None
    app = compile_app(spec, settings, expected.version_uri, environ, where, canary)
    _check_resources(spec, where)
    host = endpoint_host(settings)
    _start_serve(settings, host)
    client = _client()
    config = _merged_config(settings, client, app, where)
    client.deploy_apps(config)
    return _wait_healthy(settings, spec.name, spec.route, expected.version, uri)


def promote_app(settings: Settings, name: str) -> Endpoint:
    """Move all of an app's traffic to its canary: the challenger becomes the app's model (the registry's
    aliases are untouched: `lakeray models promote` moves those)."""
    from ray.serve.schema import ServeApplicationSchema

    from lakeray.serving.spec import deploy_config

    client = _client_or_none()
    apps = (client.get_serve_details().get("applications") or {}) if client is not None else {}
    detail = apps.get(name) or {}
    config = detail.get("deployed_app_config") or {}
    canary = (config.get("args") or {}).get("canary_uri")
    if not canary:
        raise ConfigError(f"app {name!r} has no canary to promote" if detail else f"no app {name!r} in this Serve",
                          "deploy a spec with `canary: {model: NAME@challenger, percent: 10}` first")
    args = {**config["args"], "model_uri": canary, "canary_uri": None, "canary_percent": 0.0}
    promoted = ServeApplicationSchema.model_validate({**config, "args": args})
    others = [ServeApplicationSchema.model_validate(d["deployed_app_config"]) for n, d in apps.items()
              if n != name and d.get("source") == "declarative" and d.get("deployed_app_config")]
    client.deploy_apps(deploy_config([*others, promoted], settings, f"promote {name}"))
    version = int(canary.rsplit("/", 1)[1])
    return _wait_healthy(settings, name, promoted.route_prefix or "/", version, canary)


def _wait_healthy(settings: Settings, name: str, route: str, version: int, uri: str) -> Endpoint:
    """Until the app is RUNNING and its /healthz reports ``version``; ClusterError on DEPLOY_FAILED or
    after ``ray.op_timeout_s``."""
    import httpx
    from ray import serve

    expected_version = version
    url = f"http://{_url_host(endpoint_host(settings))}:{settings.profile.serve.port}{route.rstrip('/')}"
    deadline = time.monotonic() + settings.profile.ray.op_timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        app_status = serve.status().applications.get(name)
        if app_status is not None and app_status.status == "DEPLOY_FAILED":
            raise ClusterError(f"Ray Serve could not deploy {uri} (version {expected_version}): "
                               f"{_failure_reason(app_status)}",
                               "see the replica log (`ray logs`, /tmp/ray/session_latest/logs/serve/)")
        if app_status is not None and app_status.status == "RUNNING":
            try:
                reply = httpx.get(f"{url}/healthz", timeout=5.0)
                if reply.status_code == 200:
                    body = reply.json()
                    if int(body.get("model_version", -1)) == expected_version:
                        return Endpoint(url, body["model"], expected_version, list(body["features"]), name)
                    # The previous deployment still answering while the new one rolls out.
                    last_error = f"it serves model version {body.get('model_version')}, not {expected_version}"
                else:
                    last_error = f"HTTP {reply.status_code}"
            except httpx.HTTPError as exc:
                last_error = str(exc) or type(exc).__name__
        elif app_status is not None:
            last_error = f"app status {app_status.status}"
        time.sleep(0.25)
    raise ClusterError(f"the endpoint {url} did not become healthy within {settings.profile.ray.op_timeout_s:.0f} s "
                       f"({last_error})",
                       "check `ray status` for free CPUs (resources.cpus) and the Serve logs (`ray logs`)")


def _client() -> Any:
    from ray.serve.context import _get_global_client  # the controller client `serve deploy` itself uses

    return _get_global_client()


def _start_serve(settings: Settings, host: str) -> None:
    from ray import serve

    cfg = settings.profile.serve
    running_port = _running_serve_port()
    if running_port is not None and running_port != cfg.port:
        # serve.start would ignore the new port and the health wait would poll the wrong one.
        raise ClusterError(f"Ray Serve already runs in this Ray cluster on port {running_port}, not on serve.port "
                           f"{cfg.port}; a cluster's Serve listens on one port",
                           f"deploy with serve.port {running_port} (LAKERAY_SERVE__PORT), or restart Ray")
    if running_port is None and settings.profile.ray.address in (None, "", "auto", "local"):
        # Serve starts now in this local cluster: its proxy will bind the port on this machine.
        _refuse_busy_port(host, cfg.port)
    from ray.exceptions import RayError

    for attempt in (1, 2):
        try:
            serve.start(http_options={"host": cfg.host, "port": cfg.port})
            return
        except (RayError, TimeoutError) as exc:  # the proxy died, or missed Serve's fixed 60 s window
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            # On an overloaded machine the proxy can miss that window while the controller is up and
            # restarts it: a second serve.start connects to the controller, and the bounded health wait
            # then waits for the proxy to answer. Without a controller there is nothing to wait for.
            if attempt == 1 and _client_or_none() is not None:
                continue
            raise ClusterError(f"Ray Serve's HTTP proxy did not start on {cfg.host}:{cfg.port}: {reason}",
                               "check `ray status` and the proxy's log (/tmp/ray/session_latest/logs/serve/); "
                               "on an overloaded machine, deploy again") from None


def _merged_config(settings: Settings, client: Any, app: Any, where: str) -> Any:
    """Every declaratively deployed app as it runs, with ``app`` added or replaced: applying a
    ServeDeploySchema deletes the declarative apps it does not list."""
    from ray.serve.schema import ServeApplicationSchema

    from lakeray.serving.spec import deploy_config

    details = client.get_serve_details()
    apps = []
    for name, detail in (details.get("applications") or {}).items():
        if name == app.name:
            continue
        if detail.get("source") != "declarative" or not detail.get("deployed_app_config"):
            if detail.get("route_prefix") == app.route_prefix:
                raise ConfigError(f"{where}: route: {app.route_prefix} is already served by app {name!r}",
                                  "choose another route, or `lakeray serve delete` that app first")
            continue
        apps.append(ServeApplicationSchema.model_validate(detail["deployed_app_config"]))
    for other in apps:
        if other.route_prefix == app.route_prefix:
            raise ConfigError(f"{where}: route: {app.route_prefix} is already served by app {other.name!r}",
                              "choose another route, or `lakeray serve delete` that app first")
    return deploy_config([*apps, app], settings, where)


def _check_resources(spec: ServeSpec, where: str) -> None:
    """A replica must fit one node, and the minimum replicas the cluster: a clear error now rather than
    replicas pending forever."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    most_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    total_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    res, scale = spec.resources, spec.autoscaling
    if res.cpus > most_cpus:
        raise ConfigError(f"{where}: resources.cpus: a replica asks for {res.cpus:g} CPUs; the largest node has "
                          f"{most_cpus:g}", "lower resources.cpus, or add a bigger node")
    if res.gpus > most_gpus:
        raise ConfigError(f"{where}: resources.gpus: a replica asks for {res.gpus:g} GPUs; the largest node has "
                          f"{most_gpus:g}", "set resources.gpus: 0, or deploy to a cluster with GPUs")
    replicas = max(scale.min_replicas, scale.initial_replicas or 0)
    if replicas * res.cpus > total_cpus:
        raise ConfigError(f"{where}: autoscaling.min_replicas: {replicas} replicas × {res.cpus:g} CPUs = "
                          f"{replicas * res.cpus:g} CPUs; the cluster has {total_cpus:g}",
                          "lower autoscaling.min_replicas or resources.cpus")
    if res.gpus and replicas * res.gpus > total_gpus:
        raise ConfigError(f"{where}: autoscaling.min_replicas: {replicas} replicas × {res.gpus:g} GPUs; the cluster "
                          f"has {total_gpus:g}", "lower autoscaling.min_replicas or resources.gpus")


def endpoint_host(settings: Settings) -> str:
    """Where the endpoint answers, as seen from this machine: the bind address when it is a concrete
    one; for a wildcard bind, loopback when Ray runs here, else the head node's address."""
    import ray

    cfg = settings.profile.serve
    head = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    local = head in ("127.0.0.1", "localhost", "::1") or head == ray.util.get_node_ip_address()
    if cfg.host in _WILDCARD:
        return "127.0.0.1" if local else head
    if cfg.host in ("127.0.0.1", "localhost", "::1") and not local:
        raise ConfigError(f"serve.host is {cfg.host}, but Ray runs on {head}: the endpoint would answer only on the "
                          "cluster's own machines", "set serve.host: 0.0.0.0 (LAKERAY_SERVE__HOST) for a remote cluster")
    return cfg.host


def list_apps(settings: Settings) -> list[AppInfo]:
    """Every app of the cluster's Serve (empty when Serve does not run)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return []
    details = client.get_serve_details()
    port = int(details["http_options"]["port"])
    host = _url_host(endpoint_host(settings))
    out = []
    for name, detail in sorted((details.get("applications") or {}).items()):
        args = (detail.get("deployed_app_config") or {}).get("args") or {}
        replicas: dict[str, int] = {}
        for deployment in (detail.get("deployments") or {}).values():
            for replica in deployment.get("replicas") or []:
                state = str(getattr(replica["state"], "value", replica["state"]))
                replicas[state] = replicas.get(state, 0) + 1
        route = detail.get("route_prefix")
        url = f"http://{host}:{port}{route.rstrip('/')}" if route else None
        status = detail.get("status")
        out.append(AppInfo(name, route, str(getattr(status, "value", status)), args.get("model_uri"), replicas,
                           detail.get("message") or "", url))
    return out


def app_status(settings: Settings, name: str) -> dict[str, Any]:
    """One app: its Serve status, replicas, autoscaling bounds and (when running) its ``/healthz``."""
    import httpx

    found = {a.name: a for a in list_apps(settings)}
    if name not in found:
        raise ConfigError(f"no app {name!r} in this cluster's Serve (apps: {sorted(found) or 'none'})",
                          "`lakeray serve list` shows the apps; `lakeray serve deploy SPEC` starts one")
    info = found[name]
    out: dict[str, Any] = {"name": info.name, "route": info.route, "status": info.status, "url": info.url,
                           "model_uri": info.model_uri, "replicas": info.replicas, "message": info.message}
    if info.url and info.status == "RUNNING":
        try:
            out["health"] = httpx.get(f"{info.url}/healthz", timeout=5.0).json()
        except (httpx.HTTPError, ValueError) as exc:
            out["health"] = {"error": str(exc) or type(exc).__name__}
    return out


def delete_app(settings: Settings, name: str) -> None:
    """Remove one app (the others keep running); waits, bounded, until Serve has let it go."""
    delete_apps(settings, [name])


def delete_apps(settings: Settings, names: list[str]) -> None:
    """Remove several apps with one config change, so their replicas drain together: with Serve's
    HAProxy ingress a stopping replica drains for at least 30 s (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S),
    one app after another would pay that once each. Unknown names: ConfigError before anything changes."""
    from ray import serve
    from ray.serve.schema import ServeApplicationSchema

    from lakeray.serving.spec import deploy_config

    client = _client_or_none()
    details = client.get_serve_details() if client is not None else {}
    apps = details.get("applications") or {}
    unknown = [n for n in names if n not in apps]
    if unknown:
        raise ConfigError(f"no app {', '.join(map(repr, unknown))} in this cluster's Serve "
                          f"(apps: {sorted(apps) or 'none'})", "`lakeray serve list` shows the apps")
    gone = set(names)
    if any(apps[n].get("source") == "declarative" for n in gone):
        keep = [ServeApplicationSchema.model_validate(d["deployed_app_config"]) for n, d in apps.items()
                if n not in gone and d.get("source") == "declarative" and d.get("deployed_app_config")]
        client.deploy_apps(deploy_config(keep, settings, f"delete {', '.join(names)}"))
    for name in gone:
        if apps[name].get("source") != "declarative":
            serve.delete(name, _blocking=False)
    deadline = time.monotonic() + settings.profile.ray.op_timeout_s
    while time.monotonic() < deadline:
        left = gone & set(serve.status().applications)
        if not left:
            return
        time.sleep(0.25)
    raise ClusterError(f"app(s) {sorted(left)} still being deleted after {settings.profile.ray.op_timeout_s:.0f} s",
                       "check `serve status` and the Serve logs")


def _client_or_none() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def _failure_reason(app_status: Any) -> str:
    """The root cause of a DEPLOY_FAILED app: the last line of a failed deployment's traceback (the
    app's own message only says which deployments failed)."""
    for message in [d.message for d in app_status.deployments.values()] + [app_status.message]:
        lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1][:500]
    return "no reason given"


def _running_serve_port() -> int | None:
    """The HTTP port of the Serve instance already running in this Ray cluster; None when there is none."""
    client = _client_or_none()  # no public Ray API tells the running proxy's port
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
