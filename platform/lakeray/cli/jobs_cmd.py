"""``lakeray jobs``: submit a lakeray command or a script to the profile's Ray cluster; status, logs, stop,
list. Thin: the logic is in lakeray.cluster.jobs (which imports ray only when a command runs)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from lakeray.cli.main import settings_from

__all__ = ["jobs"]

_address = click.option("--address", default=None, metavar="URL",
                        help="The cluster's dashboard / Jobs API (http://host:8265). Default: RAY_API_SERVER_ADDRESS, "
                             "ray.dashboard_address, or the `lakeray cluster up` cluster.")


def _when(epoch_ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_ms / 1000)) if epoch_ms else "-"


def _duration(job: dict[str, Any]) -> str:
    if not job.get("start_time"):
        return "-"
    end = job.get("end_time") or time.time() * 1000
    return f"{(end - job['start_time']) / 1000:.1f} s"


def _echo_state(job: dict[str, Any]) -> None:
    meta = job.get("metadata") or {}
    click.echo(f"job {job['submission_id'] or job['job_id']}: {job['status']}"
               + (f" (exit {job['driver_exit_code']})" if job.get("driver_exit_code") is not None else ""))
    click.echo(f"  entrypoint:  {job['entrypoint']}")
    click.echo(f"  started:     {_when(job.get('start_time'))}; ran {_duration(job)}")
    if job.get("message"):
        click.echo(f"  message:     {job['message'].strip().splitlines()[0][:200]}")
    if "lakeray.user" in meta:
        commit = meta.get("lakeray.git_commit") or "(not a git checkout)"
        dirty = " + uncommitted changes" if meta.get("lakeray.git_dirty") == "true" else ""
        click.echo(f"  submitted:   by {meta['lakeray.user']} at {meta.get('lakeray.submitted_at')} "
                   f"(profile {meta.get('lakeray.profile')})")
        click.echo(f"  code:        {commit}{dirty}")
        if "lakeray.spec" in meta:
            click.echo(f"  spec:        {meta['lakeray.spec']} sha256 {meta['lakeray.spec_sha256']}")
    elif meta:
        click.echo(f"  metadata:    {json.dumps(meta)}")


def _writer() -> Callable[[str], None]:
    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    return write


@click.group()
def jobs() -> None:
    """Ray jobs on the profile's cluster: submit, status, logs, stop, list (also jobs from `ray job submit`)."""


@jobs.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_address
@click.option("--id", "submission_id", default=None, help="The job's id (default: one Ray makes up).")
@click.option("--wait", is_flag=True, default=False,
              help="Stream the logs until the job ends; exit with its status (0 SUCCEEDED, the driver's code on "
                   "FAILED, 143 STOPPED).")
@click.option("--pip", is_flag=True, default=False,
              help="Install the project's requirements.lock on the cluster (only when its nodes lack them).")
@click.option("--max-file-mb", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Files larger than this stay out of the uploaded working dir.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the submission as one JSON object.")
@click.pass_context
def submit(ctx: click.Context, command: tuple[str, ...], address: str | None, submission_id: str | None,
           wait: bool, pip: bool, max_file_mb: float, as_json: bool) -> None:
    """Run COMMAND (a lakeray command or a script) as a Ray job in this project.

    \b
    lakeray jobs submit -- lakeray features run customer_aggregates
    lakeray jobs submit --wait -- lakeray train jobs/training/fraud_xgboost.yaml
    lakeray jobs submit scripts/report.py --day 2026-01-01
    """
    from lakeray.cluster import jobs as api

    settings = settings_from(ctx)
    done = api.submit(settings, list(command), address=address, submission_id=submission_id, pip=pip,
                      max_file_mb=max_file_mb)
    if as_json:
        click.echo(json.dumps({"job_id": done.job_id, "address": done.target.address, "entrypoint": done.entrypoint,
                               "metadata": done.metadata, "upload_files": done.upload.files,
                               "upload_bytes": done.upload.bytes, "left_out": done.upload.large_files,
                               "submit_s": round(done.submit_s, 3)}))
    else:
        click.echo(f"job {done.job_id} submitted to {done.target.address} ({done.target.source}) in "
                   f"{done.submit_s:.1f} s", err=wait)
        click.echo(f"  working dir: {done.upload.files} files, {done.upload.bytes / 2**20:.1f} MiB from "
                   f"{done.upload.root}", err=wait)
        for rel, size in done.upload.large_files:
            click.echo(f"  left out (over {max_file_mb:g} MiB): {rel} ({size / 2**20:.1f} MiB)", err=True)
        if not wait:
            click.echo(f"  follow it:   lakeray jobs logs --follow {done.job_id}")
    if wait:
        final = api.follow(settings, done.job_id, _writer(), target=done.target)
        click.echo(f"job {done.job_id}: {final['status']}", err=True)
        sys.exit(api.exit_code(final))


@jobs.command()
@click.argument("job_id")
@_address
@click.option("--json", "as_json", is_flag=True, default=False)
@click.pass_context
def status(ctx: click.Context, job_id: str, address: str | None, as_json: bool) -> None:
    """A job's state and metadata (who submitted it, git commit, spec hash, command)."""
    from lakeray.cluster import jobs as api

    state = api.info(settings_from(ctx), job_id, address)
    if as_json:
        click.echo(json.dumps(state))
    else:
        _echo_state(state)


@jobs.command()
@click.argument("job_id")
@_address
@click.option("--follow", "-f", is_flag=True, default=False, help="Stream until the job ends; exit with its status.")
@click.pass_context
def logs(ctx: click.Context, job_id: str, address: str | None, follow: bool) -> None:
    """A job's driver output (stdout and stderr)."""
    from lakeray.cluster import jobs as api

    settings = settings_from(ctx)
    if follow:
        final = api.follow(settings, job_id, _writer(), address=address)
        click.echo(f"job {job_id}: {final['status']}", err=True)
        sys.exit(api.exit_code(final))
    click.echo(api.logs(settings, job_id, address), nl=False)


@jobs.command()
@click.argument("job_id")
@_address
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds to wait for the job to end.")
@click.pass_context
def stop(ctx: click.Context, job_id: str, address: str | None, timeout_s: float) -> None:
    """Stop a job: its driver, the driver's processes (Spark's JVM) and its Ray tasks and actors."""
    from lakeray.cluster import jobs as api

    started = time.perf_counter()
    final = api.stop(settings_from(ctx), job_id, timeout_s=timeout_s, address=address)
    click.echo(f"job {job_id}: {final['status']} (after {time.perf_counter() - started:.1f} s)")


@jobs.command("list")
@_address
@click.option("--json", "as_json", is_flag=True, default=False, help="Print one JSON array.")
@click.pass_context
def list_cmd(ctx: click.Context, address: str | None, as_json: bool) -> None:
    """Every job on the cluster, also those submitted with `ray job submit` or by a driver that connected."""
    from lakeray.cluster import jobs as api

    found = api.list_jobs(settings_from(ctx), address)
    if as_json:
        click.echo(json.dumps(found))
        return
    if not found:
        click.echo("no jobs on the cluster")
        return
    click.echo(f"{'id':<28} {'status':<10} {'started':<19} {'ran':>9}  {'by':<10} entrypoint")
    for job in found:
        who = (job.get("metadata") or {}).get("lakeray.user", "-")
        ident = job["submission_id"] or f"{job['job_id']} (driver)"
        click.echo(f"{ident:<28} {job['status']:<10} {_when(job.get('start_time')):<19} {_duration(job):>9}  "
                   f"{who:<10} {(job['entrypoint'] or '')[:60]}")
