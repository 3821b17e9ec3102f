"""``lakeray schedule list|show|next`` (reads the plan, starts nothing) and ``lakeray scheduler
start|stop|status`` (the project's Dagster daemon and UI)."""

from __future__ import annotations

import datetime as dt
import json
import sys

import click

from lakeray.cli.main import settings_from

__all__ = ["schedule", "scheduler"]


@click.group()
def schedule() -> None:
    """Schedules from the feature-job declarations and jobs/schedules.yaml: list, show, next, backfill."""


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per schedule.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every schedule with its tasks and its next run."""
    from rich.console import Console
    from rich.table import Table

    from lakeray.scheduler.plan import load_plan, next_runs

    plan = load_plan(settings_from(ctx))
    table = Table("schedule", "cron", "time zone", "catch-up", "runs (in order)", "next run")
    for item in plan.schedules:
        upcoming = next_runs(item, 1)
        if as_json:
            click.echo(json.dumps({"name": item.name, "cron": item.cron, "timezone": item.timezone,
                                   "catchup": item.catchup, "tasks": list(item.tasks),
                                   "next": upcoming[0].isoformat() if upcoming else None}))
            continue
        table.add_row(item.name, item.cron, item.timezone, item.catchup, " → ".join(item.tasks),
                      upcoming[0].isoformat() if upcoming else "-")
    if not as_json:
        Console().print(table) if plan.schedules else click.echo("no schedules declared")


@schedule.command("show")
@click.argument("task")
@click.pass_context
def show_cmd(ctx: click.Context, task: str) -> None:
    """One task (feature table, or train/serve entry): dependencies, retries, timeout, its schedule."""
    import yaml

    from lakeray.errors import ConfigError
    from lakeray.scheduler.plan import load_plan

    plan = load_plan(settings_from(ctx))
    if task not in plan.tasks:
        raise ConfigError(f"no task named {task!r} (known: {', '.join(plan.tasks) or 'none'})",
                          "name a feature table or a jobs/schedules.yaml entry")
    item = plan.tasks[task]
    own = plan.schedule_of(task)
    runs_in = [s.name for s in plan.schedules if task in s.tasks]
    data = {"task": item.name, "kind": item.kind, "target": item.target, "after": list(item.deps),
            "retries": item.retries, "retry_delay_s": item.retry_delay_s, "timeout_s": item.timeout_s,
            "daily_partitions_from": item.partitions_start,
            "schedule": None if own is None else {"name": own.name, "cron": own.cron, "timezone": own.timezone,
                                                  "catchup": own.catchup, "declared_in": plan.sources.get(task)},
            "runs_in": runs_in}
    click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@schedule.command("next")
@click.argument("task", required=False)
@click.option("-n", "count", type=click.IntRange(1, 1000), default=5, show_default=True, help="Runs per schedule.")
@click.option("--after", default=None, help="Start from this ISO time (default: now), e.g. 2026-12-01T00:00:00Z.")
@click.pass_context
def next_cmd(ctx: click.Context, task: str | None, count: int, after: str | None) -> None:
    """The next due times of every schedule (or of the schedule that runs TASK)."""
    from lakeray.errors import ConfigError
    from lakeray.scheduler.plan import load_plan, next_runs

    plan = load_plan(settings_from(ctx))
    start = None
    if after is not None:
        try:
            start = dt.datetime.fromisoformat(after.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"--after {after!r} is not an ISO time", "use e.g. 2026-12-01T00:00:00Z") from None
        if start.tzinfo is None:
            start = start.replace(tzinfo=dt.timezone.utc)
    chosen = [s for s in plan.schedules if task is None or task in s.tasks]
    if task is not None and not chosen:
        raise ConfigError(f"no schedule runs {task!r}", "`lakeray schedule list` shows what is scheduled")
    for item in chosen:
        for when in next_runs(item, count, start):
            click.echo(f"{when.isoformat()}  {item.name}  {' → '.join(item.tasks)}")


@schedule.command("backfill")
@click.argument("job")
@click.option("--from", "first", required=True, help="First day, e.g. 2026-03-01.")
@click.option("--to", "stop", required=True, help="Day after the last one (exclusive).")
@click.pass_context
def backfill_cmd(ctx: click.Context, job: str, first: str, stop: str) -> None:
    """Run daily-partitioned JOB for each day of [FROM, TO) through Dagster (recorded in its run history).

    Days already committed by the same code version are skipped, so rerunning a backfill is safe.
    """
    from lakeray.lakehouse.spark import spark_session
    from lakeray.scheduler.backfill import backfill_days, check_range

    settings = settings_from(ctx)
    check_range(settings, job, first, stop)  # bad input fails before Spark starts

    def report(day) -> None:
        click.echo(f"{day.day}  {day.status:9}  version {day.version}  (run {day.run_id[:8]})")

    with spark_session(settings) as spark:
        backfill_days(settings, job, first, stop, spark, on_day=report)


@click.group()
def scheduler() -> None:
    """The project's Dagster daemon and UI: start, stop, status."""


@scheduler.command("start")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="UI port on 127.0.0.1 (default: a free one).")
@click.option("--wait", "wait_s", type=float, default=180.0, show_default=True, help="Seconds to wait for the UI.")
@click.pass_context
def start_cmd(ctx: click.Context, port: int | None, wait_s: float) -> None:
    """Validate the schedules, start the daemon and the webserver in the background; print the UI URL."""
    from lakeray.scheduler.service import start

    state = start(settings_from(ctx), port=port, wait_s=wait_s)
    click.echo(f"scheduler running: UI {state.url} (daemon pid {state.daemon_pid}, webserver pid "
               f"{state.webserver_pid}, DAGSTER_HOME {state.dagster_home})")


@scheduler.command("stop")
@click.pass_context
def stop_cmd(ctx: click.Context) -> None:
    """Stop the daemon and webserver this project's `scheduler start` started."""
    from lakeray.scheduler.service import stop

    stopped = stop(settings_from(ctx))
    click.echo(f"stopped pids {', '.join(map(str, stopped))}" if stopped else "the scheduler was not running")


@scheduler.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Whether the daemon and webserver run, their pids and the UI URL; exit 1 when not running."""
    from lakeray.scheduler.service import status

    info = status(settings_from(ctx))
    if as_json:
        click.echo(json.dumps(info))
    elif info["running"]:
        click.echo(f"running: UI {info['url']} (daemon pid {info['daemon_pid']}, webserver pid "
                   f"{info['webserver_pid']}, UI {'answers' if info['ui_answers'] else 'does not answer'})")
    elif "daemon_pid" in info:
        click.echo(f"not running (recorded daemon pid {info['daemon_pid']} alive: {info['daemon_alive']}, "
                   f"webserver pid {info['webserver_pid']} alive: {info['webserver_alive']})")
    else:
        click.echo("not running")
    if not info["running"]:
        sys.exit(1)
