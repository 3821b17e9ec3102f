"""``lakeray schedule backfill JOB --from --to``: one Dagster run per day of a daily-partitioned feature
asset, executed here (no daemon needed) and recorded in the project's Dagster storage, so the runs and
materialisations show in the UI next to the scheduled ones.

Each run carries the tag ``lakeray/backfill``; a day whose partition was already committed by the same
code version is skipped, the rule of ``lakeray features backfill`` (the asset applies it, so a backfill
launched from the UI skips the same days). Days run in order; the first failing day stops the backfill,
and what was committed before it stays committed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakeray.errors import ConfigError

if TYPE_CHECKING:
    import dagster as dg
    from pyspark.sql import SparkSession

    from lakeray.config import Settings

__all__ = ["DayResult", "check_range", "backfill_days"]


@dataclass(frozen=True)
class DayResult:
    day: str
    status: str  # committed | skipped
    version: int | None
    run_id: str  # the Dagster run


def check_range(settings: Settings, name: str, first: str, stop: str) -> list[str]:
    """The days of [first, stop) for daily-partitioned job ``name``; ConfigError naming job and field."""
    from lakeray.scheduler.plan import load_plan

    plan = load_plan(settings)
    task = plan.tasks.get(name)
    if task is None or task.kind != "feature":
        raise ConfigError(f"schedule backfill: no feature job named {name!r}", "`lakeray schedule list` shows the tasks")
    if task.partitions_start is None:
        raise ConfigError(f"schedule backfill {name}: partitions_start: the job is not daily-partitioned",
                          "declare write_mode='partitions' and partitions_start='YYYY-MM-DD', or use `features backfill`")
    days: list[dt.date] = []
    for value, option in ((first, "--from"), (stop, "--to")):
        try:
            days.append(dt.date.fromisoformat(value))
        except ValueError:
            raise ConfigError(f"schedule backfill {name}: {option} {value!r} is not an ISO date", "use e.g. 2026-03-01") from None
    if days[1] <= days[0]:
        raise ConfigError(f"schedule backfill {name}: --to {stop} is not after --from {first}", "--to is exclusive")
    if days[0] < dt.date.fromisoformat(task.partitions_start):
        raise ConfigError(f"schedule backfill {name}: --from {first} is before partitions_start {task.partitions_start}",
                          "start at or after the job's first partition")
    return [(days[0] + dt.timedelta(days=i)).isoformat() for i in range((days[1] - days[0]).days)]


def backfill_days(settings: Settings, name: str, first: str, stop: str, spark: SparkSession,
                  instance: dg.DagsterInstance | None = None,
                  on_day: Callable[[DayResult], None] | None = None) -> list[DayResult]:
    """Materialise job ``name`` for each day of [first, stop) through Dagster; one result per day."""
    import dagster as dg

    from lakeray.scheduler.assets import BACKFILL_TAG, build_definitions
    from lakeray.scheduler.service import open_instance

    days = check_range(settings, name, first, stop)
    asset = build_definitions(settings, spark=spark).resolve_assets_def(name)
    tags = {BACKFILL_TAG: uuid.uuid4().hex[:12]}
    own = instance is None
    if instance is None:
        instance = open_instance(settings)
    results = []
    try:
        for day in days:
            run = dg.materialize([asset], partition_key=day, instance=instance, tags=tags)
            metadata = run.asset_materializations_for_node(name)[0].metadata
            skipped = bool(metadata["skipped"].value)
            result = DayResult(day, "skipped" if skipped else "committed", metadata["delta_version"].value, run.run_id)
            results.append(result)
            if on_day is not None:
                on_day(result)
    finally:
        if own:
            instance.dispose()
    return results
