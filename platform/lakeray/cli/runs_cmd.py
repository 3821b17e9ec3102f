"""``lakeray runs list|show``: scheduled runs (Dagster's run storage) and feature runs (lakeray's ledger)
in one history; reads only, starts nothing."""

from __future__ import annotations

import datetime as dt
import json

import click

from lakeray.cli.main import settings_from

__all__ = ["runs"]

_STATUSES = ("queued", "running", "success", "failure", "canceled")  # lakeray.scheduler.runs.STATUSES


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
def runs() -> None:
    """Runs of scheduled jobs and feature jobs, newest first: list, show."""


@runs.command("list")
@click.option("--job", default=None, help="A Dagster job, schedule, or table the run wrote.")
@click.option("--status", type=click.Choice(_STATUSES), default=None, help="Only runs in this state.")
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True, help="Newest N runs.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run.")
@click.pass_context
def list_cmd(ctx: click.Context, job: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """Run id, job, interval or partition, status, start, duration and the Delta versions committed."""
    from rich.console import Console
    from rich.table import Table

    from lakeray.scheduler.runs import list_runs

    rows = list_runs(settings_from(ctx), job=job, status=status, limit=limit)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row.as_dict()))
        return
    if not rows:
        click.echo("no runs")
        return
    table = Table("run id", "source", "job", "interval / partition", "status", "started (UTC)", "s", "committed",
                  "reason")
    for row in rows:
        committed = ", ".join(f"{t}@{v}" for t, v in row.versions.items()) or "-"
        table.add_row(row.run_id[:8] if row.source == "dagster" else row.run_id, row.source, row.job,
                      row.interval or "-", row.status + (" (retry)" if row.retry_of else ""), _when(row.started_at),
                      "-" if row.seconds is None else f"{row.seconds:.1f}", committed, (row.reason or "")[:60])
    Console(width=200).print(table)


@runs.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@click.pass_context
def show_cmd(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """One run (id or unique prefix): tags, feature runs, error, and where its logs are."""
    import yaml

    from lakeray.scheduler.runs import show_run

    data = show_run(settings_from(ctx), run_id)
    if as_json:
        click.echo(json.dumps(data, default=str))
        return
    data["started_at"] = _when(data["started_at"])
    click.echo(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False).rstrip())
