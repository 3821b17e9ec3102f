import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from lakeray.cli.main import settings_from

_PRIVATE_RAY = ("no ray.address and no `lakeray cluster up` cluster: lakeray started a private local Ray for this "
                "command, and an endpoint lives only while it runs")
_FIX_PRIVATE = ("start a cluster that outlives commands (`lakeray cluster up`, or set ray.address to a running "
                "one), then `lakeray serve deploy SPEC`")


@click.group(invoke_without_command=True)
@click.option("--model-uri", default=None, help="models:/<name>@<alias> (default: the profile's model @champion).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Override serve.port.")
@click.pass_context
def serve(ctx: click.Context, model_uri: str | None, port: int | None) -> None:
    """Serve registered models over HTTP with Ray Serve.

    Without a subcommand: serve one model on / (the profile's serve settings) until Ctrl-C or SIGTERM.
    `serve deploy SPEC` deploys a jobs/serving/*.yaml spec to the cluster's Serve and returns.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = {**(ctx.obj or {}), "serve_port": port}
        return
    from lakeray.serving.deploy import spec_for_model

    settings = _with_port(settings_from(ctx), port)
    model_uri = model_uri or f"models:/{settings.profile.mlflow.model_name}@champion"
    _serve_in_foreground(settings, spec_for_model(settings, model_uri), "serve section of the profile")


def _with_port(settings: Any, port: int | None) -> Any:
    if port is not None:
        settings.profile.serve.port = port
    return settings


def _serve_in_foreground(settings: Any, spec: Any, where: str) -> None:
    from lakeray.cluster.ray_runtime import ray_session

    # Before ray.init: a SIGTERM while Ray starts would otherwise meet Ray's own handler (sys.exit(15)
    # at an arbitrary point) or Python's default (killed, Ray's daemons orphaned).
    _stop_on_signals()
    try:
        with ray_session(settings) as handle:
            _serve_until_stopped(settings, handle, spec, where)
    except _Stopped as stop:
        _exit_stopped_early(stop)


class _Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the normal end of a foreground server."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    import signal

    # One stop is enough: a second signal must not cut the app's deletion or Ray's shutdown in half
    # (a supervisor that will not wait sends SIGKILL).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stopped(signum)


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (from a supervisor, or for a process a non-interactive shell started in the
    background, where SIGINT arrives ignored) both raise _Stopped in the main thread."""
    import signal

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def _exit_stopped_early(stop: _Stopped) -> None:
    """Stopped before the endpoint served: what was started is cleaned up (ray_session shut Ray down);
    exit 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), as a shell reports an interrupted command."""
    click.echo("stopped before the endpoint was serving", err=True)
    raise SystemExit(128 + stop.signum)


def _serve_until_stopped(settings: Any, handle: Any, spec: Any, where: str) -> None:
    """Deploy, serve until Ctrl-C or SIGTERM, then stop: a private Ray is shut down (and with it Serve);
    in a cluster that outlives this command, the app is deleted and the cluster keeps running. Exit 0
    once it served; a stop during the deploy deletes what it applied and exits 128 + the signal."""
    import time

    from lakeray.errors import ConfigError
    from lakeray.serving.deploy import delete_app, deploy

    _stop_on_signals()  # again: ray.init replaced the SIGTERM handler with its own sys.exit(15)
    try:
        endpoint = deploy(settings, spec, where)
    except _Stopped:
        if not handle.owns_cluster:  # the app may already be applied in the long-lived cluster
            with contextlib.suppress(ConfigError):
                delete_app(settings, spec.name)
        raise
    click.echo(f"serving {endpoint.model} v{endpoint.model_version} at {endpoint.url}/predict (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except _Stopped:
        if handle.owns_cluster:
            click.echo("stopping the endpoint and Ray")
        else:
            click.echo(f"stopping the endpoint (app {spec.name}; the cluster keeps running)")
            delete_app(settings, spec.name)


@contextmanager
def _cluster(ctx: click.Context) -> Iterator[Any]:
    """Settings, connected to a Ray that outlives commands; ClusterError when only a private one started."""
    from lakeray.cluster.ray_runtime import ray_session
    from lakeray.errors import ClusterError

    settings = _with_port(settings_from(ctx), (ctx.obj or {}).get("serve_port"))
    with ray_session(settings) as handle:
        if handle.owns_cluster:
            raise ClusterError(f"{_PRIVATE_RAY}, so there is no running Serve to ask", _FIX_PRIVATE)
        yield settings


@serve.command("deploy")
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (url, model, version, app).")
@click.pass_context
def deploy_cmd(ctx: click.Context, spec_file: str, as_json: bool) -> None:
    """Deploy a serve spec (jobs/serving/*.yaml): validate, deploy, wait until healthy, print the URL.

    In a cluster that outlives commands (`lakeray cluster up`, or ray.address) it returns and the endpoint
    keeps running. Otherwise lakeray's private local Ray lives only as long as this command: it serves
    in the foreground until Ctrl-C/SIGTERM.
    """
    from lakeray.cluster.ray_runtime import ray_session
    from lakeray.serving.deploy import deploy
    from lakeray.serving.spec import load_serve_spec

    settings = _with_port(settings_from(ctx), (ctx.obj or {}).get("serve_port"))
    spec = load_serve_spec(spec_file)
    _stop_on_signals()  # the private-Ray case serves in the foreground; see _serve_in_foreground
    try:
        with ray_session(settings) as handle:
            if handle.owns_cluster:
                click.echo(f"{_PRIVATE_RAY}: serving in the foreground until Ctrl-C ({_FIX_PRIVATE} to deploy "
                           "and return)", err=True)
                _serve_until_stopped(settings, handle, spec, spec_file)
                return
            endpoint = deploy(settings, spec, spec_file)
    except _Stopped as stop:
        _exit_stopped_early(stop)
    if as_json:
        click.echo(json.dumps({"app": endpoint.app, "url": endpoint.url, "model": endpoint.model,
                               "model_version": endpoint.model_version}))
    else:
        click.echo(f"deployed {endpoint.app}: {endpoint.model} v{endpoint.model_version} at {endpoint.url}/predict "
                   f"(docs: {endpoint.url}/docs)")


@serve.command("config")
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.pass_context
def config_cmd(ctx: click.Context, spec_file: str) -> None:
    """Print the Ray Serve config (ServeDeploySchema YAML) a spec compiles to, for `serve deploy` or KubeRay.

    The model alias is pinned to its current version; with auth, only the token's digest is written.
    """
    import yaml

    from lakeray.registry import resolve_alias
    from lakeray.serving.spec import compile_app, deploy_config, load_serve_spec, model_uri

    settings = _with_port(settings_from(ctx), (ctx.obj or {}).get("serve_port"))
    spec = load_serve_spec(spec_file)
    pinned = resolve_alias(settings, model_uri(spec)).version_uri
    config = deploy_config([compile_app(spec, settings, pinned, where=spec_file)], settings, spec_file)
    click.echo(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True), sort_keys=False))


@serve.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """The apps of the cluster's Serve: route, status, pinned model, replicas, URL."""
    import dataclasses

    from lakeray.serving.deploy import list_apps

    with _cluster(ctx) as settings:
        apps = list_apps(settings)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(a) for a in apps]))
        return
    if not apps:
        click.echo("no apps (deploy one with `lakeray serve deploy jobs/serving/<spec>.yaml`)")
        return
    from rich.console import Console
    from rich.table import Table

    out = Table("app", "route", "status", "model", "replicas", "url")
    for app in apps:
        replicas = ", ".join(f"{state.lower()} {n}" for state, n in sorted(app.replicas.items()))
        out.add_row(app.name, app.route or "", app.status, app.model_uri or "", replicas, app.url or "")
    Console().print(out)


@serve.command("status")
@click.argument("app")
@click.pass_context
def status_cmd(ctx: click.Context, app: str) -> None:
    """One app as JSON: Serve status, replicas, pinned model, and its /healthz when running."""
    from lakeray.serving.deploy import app_status

    with _cluster(ctx) as settings:
        click.echo(json.dumps(app_status(settings, app), indent=2))


@serve.command("promote")
@click.argument("app")
@click.pass_context
def promote_cmd(ctx: click.Context, app: str) -> None:
    """Move all of APP's traffic to its canary (the challenger becomes the app's model).

    Registry aliases are untouched: `lakeray models promote` moves champion.
    """
    from lakeray.serving.deploy import promote_app

    with _cluster(ctx) as settings:
        endpoint = promote_app(settings, app)
    click.echo(f"promoted {app}: all traffic to {endpoint.model} v{endpoint.model_version} at {endpoint.url}/predict")


@serve.command("delete")
@click.argument("apps", nargs=-1, required=True)
@click.pass_context
def delete_cmd(ctx: click.Context, apps: tuple[str, ...]) -> None:
    """Remove apps from the cluster's Serve (several at once drain together); the others keep serving."""
    from lakeray.serving.deploy import delete_apps

    with _cluster(ctx) as settings:
        delete_apps(settings, list(apps))
    click.echo(f"deleted {', '.join(apps)}")
