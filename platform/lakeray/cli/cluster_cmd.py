"""``lakeray cluster``: a local cluster that outlives commands (up/down/status) and cluster definitions
(validate). Each subcommand imports what it needs when it runs (``lakeray --help`` imports no ray).
"""

from __future__ import annotations

import sys
import time

import click

from lakeray.cli.main import settings_from

__all__ = ["cluster"]


@click.group()
def cluster() -> None:
    """Ray + Spark clusters: a local one (up, status, down), several hosts (up --head, join); validate
    launcher YAMLs and KubeRay manifests."""


@cluster.command()
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Extra Ray worker nodes on this machine (each its own raylet) [0]; with --on-spark, Ray "
                   "worker nodes as Spark tasks [1].")
@click.option("--head-cpus", type=click.IntRange(min=1), default=None,
              help="Logical CPUs of the Ray head (default: cores + 2, as a private local Ray).")
@click.option("--worker-cpus", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--no-spark", is_flag=True, default=False, help="Ray only: no Spark standalone master/worker.")
@click.option("--head", "as_head", is_flag=True, default=False,
              help="The head of several hosts: Ray and the Spark master listen on --address at fixed ports, "
                   "other hosts run `lakeray cluster join ADDRESS`.")
@click.option("--address", "node_ip", default=None, metavar="IP",
              help="With --head: this host's address the other hosts reach (default: its primary address).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="With --head: Ray's port [6379].")
@click.option("--spark-port", type=click.IntRange(1, 65535), default=None,
              help="With --head: the Spark master's port [7077].")
@click.option("--spark-ui-port", type=click.IntRange(1, 65535), default=None,
              help="With --head: the Spark master UI's port [8080].")
@click.option("--share-token", is_flag=True, default=False,
              help="With --head: copy the head's Ray token to <storage root>/cluster/auth_token (mode 0600), "
                   "so hosts sharing the storage root join without --token-file.")
@click.option("--on-spark", "spark_master", default=None, metavar="MASTER_URL",
              help="Ray on an existing Spark standalone cluster (spark://HOST:PORT): the Ray head next to a "
                   "detached Spark driver on this host, --workers Ray worker nodes of --worker-cpus as Spark tasks.")
@click.pass_context
def up(ctx: click.Context, workers: int | None, head_cpus: int | None, worker_cpus: int, no_spark: bool,
       as_head: bool, node_ip: str | None, port: int | None, spark_port: int | None, spark_ui_port: int | None,
       share_token: bool, spark_master: str | None) -> None:
    """Start a local Ray head (dashboard + Jobs API on 127.0.0.1), worker nodes and a Spark standalone
    master + worker; every lakeray command of this project then uses it instead of a private Ray.
    With --head, other hosts join it (`lakeray cluster join`). With --on-spark, Ray runs inside an
    existing Spark cluster instead."""
    from lakeray.cluster.local_cluster import up as start

    if spark_master is not None:
        _up_on_spark(ctx, spark_master, workers, worker_cpus,
                     {"--head": as_head or None, "--head-cpus": head_cpus, "--no-spark": no_spark or None,
                      "--address": node_ip, "--port": port, "--spark-port": spark_port,
                      "--spark-ui-port": spark_ui_port, "--share-token": share_token or None})
        return
    head_only = {"--address": node_ip, "--port": port, "--spark-port": spark_port,
                 "--spark-ui-port": spark_ui_port, "--share-token": share_token or None}
    if not as_head and any(v is not None for v in head_only.values()):
        raise click.UsageError(f"{', '.join(k for k, v in head_only.items() if v is not None)} need(s) --head")
    head_args = {}
    if as_head:
        from lakeray.cluster.hosts import RAY_PORT, SPARK_PORT, SPARK_UI_PORT, primary_address

        head_args = {"node_ip": node_ip or primary_address(), "port": port or RAY_PORT,
                     "spark_port": spark_port or SPARK_PORT, "spark_ui_port": spark_ui_port or SPARK_UI_PORT,
                     "share_token": share_token}
    started = time.perf_counter()
    state = start(settings_from(ctx), workers=workers or 0, head_cpus=head_cpus, worker_cpus=worker_cpus,
                  spark=not no_spark, **head_args)
    click.echo(f"cluster up in {time.perf_counter() - started:.1f} s")
    click.echo(f"  ray:       {state.ray_address} ({1 + state.worker_nodes} node(s)); dashboard + jobs API "
               f"{state.dashboard_url}")
    if state.spark_master_url:
        click.echo(f"  spark:     {state.spark_master_url} (UI {state.spark_ui_url}); use it with "
                   f"LAKERAY_SPARK__MASTER={state.spark_master_url}")
    if as_head:
        how = ("hosts sharing this storage root find its token there" if state.token_file else
               "pass the head's token with --token-file (or RAY_AUTH_TOKEN_PATH)")
        click.echo(f"  join:      `lakeray cluster join {state.ray_address}` on the other hosts; {how}")
    click.echo(f"  logs:      {state.log_dir}")
    click.echo("  stop it with `lakeray cluster down`")


def _up_on_spark(ctx: click.Context, spark_master: str, workers: int | None, worker_cpus: int,
                 excluded: dict[str, object]) -> None:
    from lakeray.cluster.on_spark import up_on_spark

    if any(v is not None for v in excluded.values()):
        raise click.UsageError(f"{', '.join(k for k, v in excluded.items() if v is not None)} cannot go with --on-spark")
    started = time.perf_counter()
    state = up_on_spark(settings_from(ctx), spark_master, workers=1 if workers is None else workers,
                        worker_cpus=worker_cpus)
    click.echo(f"ray on spark up in {time.perf_counter() - started:.1f} s")
    click.echo(f"  ray:       {state.ray_address} (head + {state.worker_nodes} worker node(s) as Spark tasks); "
               f"dashboard + jobs API {state.dashboard_url}")
    click.echo(f"  spark:     application {state.spark_app_id} on {state.spark_master_url} (UI {state.spark_app_ui_url}), "
               f"driver pid {state.driver_pid}")
    click.echo(f"  logs:      {state.log_dir}")
    click.echo("  stop it with `lakeray cluster down` (the Ray nodes and the Spark application)")


@cluster.command()
@click.argument("head_address")
@click.option("--address", "node_ip", default=None, metavar="IP",
              help="This host's address the head reaches (default: its address on the route to the head).")
@click.option("--cpus", type=click.IntRange(min=1), default=None, help="Logical CPUs of this Ray node [cores].")
@click.option("--no-spark", is_flag=True, default=False, help="Ray only: no Spark worker.")
@click.option("--spark-master", default=None, metavar="URL",
              help="The Spark master to register with [the head's, spark://HEAD:7077].")
@click.option("--spark-cores", type=click.IntRange(min=1), default=None, help="Cores of this Spark worker [cores].")
@click.option("--spark-memory-mb", type=click.IntRange(min=512), default=None,
              help="Memory of this Spark worker [a quarter of the host's].")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="A file holding the head's Ray token [RAY_AUTH_TOKEN(_PATH), the storage root's shared "
                   "token, ~/.ray/auth_token]. Never printed.")
@click.option("--timeout", "connect_timeout_s", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds to wait for the head to answer.")
@click.pass_context
def join(ctx: click.Context, head_address: str, node_ip: str | None, cpus: int | None, no_spark: bool,
         spark_master: str | None, spark_cores: int | None, spark_memory_mb: int | None, token_file: str | None,
         connect_timeout_s: float) -> None:
    """Join this host to the head at HEAD_ADDRESS (IP[:6379], started with `lakeray cluster up --head`):
    a Ray worker node and a Spark worker registered with the head's master."""
    from lakeray.cluster.hosts import join as join_head

    started = time.perf_counter()
    state = join_head(settings_from(ctx), head_address, node_ip=node_ip, cpus=cpus, spark=not no_spark,
                      spark_master=spark_master, spark_cores=spark_cores, spark_memory_mb=spark_memory_mb,
                      token_file_flag=token_file, connect_timeout_s=connect_timeout_s)
    click.echo(f"joined {state.head_address} in {time.perf_counter() - started:.1f} s as {state.node_ip}: "
               f"Ray node ({state.cpus} CPU(s))" + (f", Spark worker of {state.spark_master_url}"
                                                    if state.spark_master_url else ""))
    click.echo(f"  logs:      {state.log_dir}")
    click.echo("  leave with `lakeray cluster down` on this host")


@cluster.command()
@click.option("--json", "as_json", is_flag=True, default=False)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Nodes, CPUs/GPUs, Spark workers and URLs of the running local cluster (exit 1 when none)."""
    import json

    from lakeray.cluster.local_cluster import status as describe

    info = describe(settings_from(ctx))
    if info is None:
        click.echo("no lakeray cluster is running for this project (`lakeray cluster up` starts one)", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"ray {info['ray_address']}: {len(info['nodes'])} node(s), {info['cpus']:g} CPU(s), "
               f"{info['gpus']:g} GPU(s); dashboard {info['dashboard_url']}; up {info['uptime_s']:.0f} s")
    for node in info["nodes"]:
        click.echo(f"  {'head  ' if node['head'] else 'worker'} {node['node_id']} {node['address']} "
                   f"cpus {node['cpus']:g} gpus {node['gpus']:g}")
    if info["spark_master_url"] and not info["spark_ui_url"]:
        click.echo(f"spark {info['spark_master_url']} (not lakeray's: its workers are on its own UI)")
    elif info["spark_master_url"]:
        click.echo(f"spark {info['spark_master_url']} (UI {info['spark_ui_url']}): "
                   f"{len(info['spark_workers'])} worker(s)")
        for worker in info["spark_workers"]:
            click.echo(f"  {worker['host']} cores {worker['cores']} memory {worker['memory_mb']} MiB {worker['state']}")
    if info.get("on_spark"):
        on_spark = info["on_spark"]
        click.echo(f"ray on spark: application {on_spark['spark_app_id']} (UI {on_spark['spark_app_ui_url']}), "
                   f"driver pid {on_spark['driver_pid']}")
    click.echo(f"mlflow {info['mlflow_tracking_uri']}")


@cluster.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop exactly what `lakeray cluster up` or `join` started on this host for this project."""
    from lakeray.cluster.hosts import leave
    from lakeray.cluster.local_cluster import down as stop

    settings = settings_from(ctx)
    stopped = leave(settings) + stop(settings)
    click.echo(f"cluster down: {len(stopped)} process(es) stopped" if stopped else "no lakeray cluster was running")


@cluster.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--quiet", "-q", is_flag=True, default=False, help="Print problems only, no line per valid file.")
def validate(files: tuple[str, ...], quiet: bool) -> None:
    """Validate cluster FILES offline: launcher YAMLs (ray up) against Ray's ray-schema.json and the
    launcher's config preparation, KubeRay manifests against the vendored CRD schemas.

    Exit code 0 when every file is valid, 2 when any is not (each problem names the file and the path
    inside it).
    """
    from lakeray.cluster.validate import check_file

    invalid = 0
    for path in files:
        report = check_file(path)
        if report.ok:
            if not quiet:
                click.echo(f"ok  {path}  ({', '.join(report.documents)})")
            continue
        invalid += 1
        for problem in report.problems:
            click.secho(f"error: {problem}", fg="red", err=True)
    if invalid:
        click.echo(f"{invalid} of {len(files)} file(s) invalid", err=True)
        sys.exit(2)
