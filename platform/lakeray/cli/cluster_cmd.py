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
    """Ray + Spark clusters: a local one (up, status, down); validate launcher YAMLs and KubeRay manifests."""


@cluster.command()
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Extra Ray worker nodes on this machine (each its own raylet).")
@click.option("--head-cpus", type=click.IntRange(min=1), default=None,
              help="Logical CPUs of the Ray head (default: cores + 2, as a private local Ray).")
@click.option("--worker-cpus", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--no-spark", is_flag=True, default=False, help="Ray only: no Spark standalone master/worker.")
@click.pass_context
def up(ctx: click.Context, workers: int, head_cpus: int | None, worker_cpus: int, no_spark: bool) -> None:
    """Start a local Ray head (dashboard + Jobs API on 127.0.0.1), worker nodes and a Spark standalone
    master + worker; every lakeray command of this project then uses it instead of a private Ray."""
    from lakeray.cluster.local_cluster import up as start

    started = time.perf_counter()
    state = start(settings_from(ctx), workers=workers, head_cpus=head_cpus, worker_cpus=worker_cpus,
                  spark=not no_spark)
    click.echo(f"cluster up in {time.perf_counter() - started:.1f} s")
    click.echo(f"  ray:       {state.ray_address} ({1 + state.worker_nodes} node(s)); dashboard + jobs API "
               f"{state.dashboard_url}")
    if state.spark_master_url:
        click.echo(f"  spark:     {state.spark_master_url} (UI {state.spark_ui_url}); use it with "
                   f"LAKERAY_SPARK__MASTER={state.spark_master_url}")
    click.echo(f"  logs:      {state.log_dir}")
    click.echo("  stop it with `lakeray cluster down`")


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
    if info["spark_master_url"]:
        click.echo(f"spark {info['spark_master_url']} (UI {info['spark_ui_url']}): "
                   f"{len(info['spark_workers'])} worker(s)")
        for worker in info["spark_workers"]:
            click.echo(f"  {worker['host']} cores {worker['cores']} memory {worker['memory_mb']} MiB {worker['state']}")
    click.echo(f"mlflow {info['mlflow_tracking_uri']}")


@cluster.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop exactly what `lakeray cluster up` started for this project."""
    from lakeray.cluster.local_cluster import down as stop

    stopped = stop(settings_from(ctx))
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
