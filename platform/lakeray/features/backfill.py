"""Backfill a ``partitions`` feature job over a date range, one chunk (default: one day) per commit.

Each chunk is one :func:`~lakeray.features.runner.run_feature_job` run, i.e. one atomic Delta commit
carrying its range and code version in the commit metadata. Before running, the table's history is
read once: a chunk whose newest commit touching it covered the whole chunk *and* ran the same code
version is skipped (unless ``force``). So a backfill killed half way is resumed by running it again:
committed chunks are skipped, the interrupted chunk never committed and is run again. Chunks run in
date order; the first failing chunk stops the backfill (later chunks are not attempted), and what was
committed before it stays committed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lakeray.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lakeray.config import Settings

__all__ = ["ChunkResult", "plan_chunks", "backfill", "committed_by_same_code"]


@dataclass(frozen=True)
class ChunkResult:
    start: str
    end: str
    status: str  # "committed" | "skipped"
    version: int | None = None
    rows: int | None = None
    seconds: float = 0.0
    reason: str = ""


def plan_chunks(start: str, end: str, step_days: int = 1) -> list[tuple[str, str]]:
    """[start, end) cut into ``step_days`` chunks (the last one may be shorter), as ISO dates."""
    from lakeray.features.runner import date_range

    first, stop = date_range(start, end)
    if step_days < 1:
        raise ConfigError(f"--step-days must be ≥ 1, got {step_days}", "pass a positive number of days")
    chunks, day = [], first
    while day < stop:
        nxt = min(day + dt.timedelta(days=step_days), stop)
        chunks.append((day.isoformat(), nxt.isoformat()))
        day = nxt
    return chunks


def _covering_commit(history: list[dict[str, Any]], start: str, end: str) -> dict[str, Any] | None:
    """The newest commit that wrote any row of [start, end), or None. History is newest first."""
    for commit in history:
        if commit["operation"] not in {"WRITE", "CREATE TABLE AS SELECT", "REPLACE TABLE AS SELECT", "MERGE",
                                       "DELETE", "UPDATE", "CREATE OR REPLACE TABLE AS SELECT"}:
            continue  # OPTIMIZE, VACUUM, property changes: the rows' content is unchanged
        rng = commit["run"].get("range")
        if not rng:  # a full refresh, or a write lakeray did not make: it touched everything
            return commit
        if rng[0] < end and start < rng[1]:
            return commit
    return None


def committed_by_same_code(history: list[dict[str, Any]], code_version: str, start: str,
                           end: str) -> dict[str, Any] | None:
    """The commit that already holds all of [start, end) from code ``code_version`` (the skip rule), or None.
    ``history`` is the table's history, newest first."""
    previous = _covering_commit(history, start, end)
    rng = (previous or {}).get("run", {}).get("range")
    if previous is not None and rng and rng[0] <= start and end <= rng[1] and previous["run"].get("code_version") == code_version:
        return previous
    return None


def backfill(spark: SparkSession, settings: Settings, name: str, start: str, end: str, step_days: int = 1,
             force: bool = False, on_chunk: Callable[[ChunkResult], None] | None = None) -> list[ChunkResult]:
    """Run job ``name`` chunk by chunk over [start, end); returns one result per chunk, in order."""
    from lakeray.features.runner import find_job, run_feature_job
    from lakeray.lakehouse.delta import table_exists, table_history

    job = find_job(settings, name)
    if job.write_mode != "partitions":
        raise ConfigError(f"{name}: backfill needs write_mode 'partitions' (it is {job.write_mode!r})",
                          "declare write_mode='partitions' and partition_by=[<date column>], or use `features run`")
    chunks = plan_chunks(start, end, step_days)
    path = settings.table_path(name)
    history = table_history(spark, path) if table_exists(spark, path) else []
    code = job.code_version
    results = []
    for lo, hi in chunks:
        previous = None if force else committed_by_same_code(history, code, lo, hi)
        if previous is not None:
            result = ChunkResult(lo, hi, "skipped", previous["version"], reason=f"committed at version "
                                 f"{previous['version']} by the same code version {code}")
        else:
            run = run_feature_job(spark, settings, name, start=lo, end=hi)
            result = ChunkResult(lo, hi, "committed", run.version, run.rows, run.seconds)
        results.append(result)
        if on_chunk is not None:
            on_chunk(result)
    return results
