"""Write safety of feature tables under failure and concurrency (real Spark, real Delta, no mocks).

* A feature run killed with SIGKILL in the middle of its write leaves the table readable at the
  previous version with the previous rows, and the next run commits normally.
* Two runs of one ``partitions`` job over disjoint date ranges, at the same time on one table, both
  commit and no row is lost.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from lakeray.features.runner import read_ledger, run_feature_job
from lakeray.lakehouse.delta import read_arrow, table_files, table_history, table_version, write_table
from lakeray.lakehouse.pit import content_hash
from lakeray.lakehouse.spark import delta_jars_dir

pytestmark = pytest.mark.spark

JOBS = '''
from pyspark.sql import functions as F
from lakeray.features import feature_job

@feature_job(name="ws_wide", inputs=["ws_events"], entity_keys=["user_id"])
def ws_wide(ws_events):
    return ws_events.select("user_id", (F.col("amount") * 2).alias("amount2"))

@feature_job(name="ws_daily", inputs=["ws_days"], entity_keys=["user_id"], event_time="event_time",
             write_mode="partitions", partition_by=["day"])
def ws_daily(ws_days, start=None, end=None):
    df = ws_days.withColumn("day", F.to_date("event_time"))
    if start is not None:
        df = df.where((F.col("day") >= start) & (F.col("day") < end))
    return df.groupBy("user_id", "day").agg(F.max("event_time").alias("event_time"),
                                           F.sum("amount").alias("amount"), F.count("*").alias("n"))
'''

KILL_ROWS = 4_000  # with one row per parquet file (child only), its write takes seconds: a wide window


@pytest.fixture(scope="module")
def ws(settings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ws_jobs")
    (folder / "ws_jobs.py").write_text(textwrap.dedent(JOBS))
    local = dataclasses.replace(settings, profile=settings.profile.model_copy(update={"feature_paths": [str(folder)]}))
    return local, folder


def _parquet_files(table: Path) -> set[str]:
    return {str(p.relative_to(table)) for p in table.rglob("*.parquet")} if table.is_dir() else set()


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 also counts zombies, which is good enough there
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces, so split after ")".
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL the child's whole session (python driver, spark-submit, the driver JVM) and wait for it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, f"process group {proc.pid} survived SIGKILL for {timeout} s"
        time.sleep(0.05)


def test_run_killed_mid_write_leaves_previous_version_and_next_run_commits(spark, ws, tmp_path):
    from pyspark.sql import functions as F

    settings, folder = ws
    events_path, table_path = settings.table_path("ws_events"), settings.table_path("ws_wide")
    write_table(spark.range(KILL_ROWS).selectExpr("id % 97 as user_id", "cast(id as double) as amount"), events_path)
    previous = run_feature_job(spark, settings, "ws_wide")
    previous_hash = content_hash(spark.read.format("delta").load(table_path))
    previous_files = set(table_files(table_path))
    # New input rows, so the killed run (and the next one) would write different content.
    more = spark.range(KILL_ROWS, KILL_ROWS + 500).selectExpr("id % 97 as user_id", "cast(id as double) as amount")
    write_table(more, events_path, mode="append")

    # The child: the real CLI in its own session (process group), so one killpg reaches the driver JVM too.
    # One row per parquet file makes its write produce files for seconds before it could commit.
    config = tmp_path / "lakeray.yaml"
    config.write_text(yaml.safe_dump({"default_profile": "local", "profiles": {"local": {
        "spark": {"master": "local[2]", "driver_memory": "1g", "shuffle_partitions": 2,
                  "jars_dir": str(delta_jars_dir(settings)), "conf": {"spark.sql.files.maxRecordsPerFile": "1"}},
        "storage": {"root": settings.storage_root},
        "feature_paths": [str(folder)]}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKERAY_")}
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    before = _parquet_files(Path(table_path))
    log = tmp_path / "child.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from lakeray.cli.main import main; main()",
                                 "--config", str(config), "features", "run", "ws_wide"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (new_files := _parquet_files(Path(table_path)) - before):
            if proc.poll() is not None:
                pytest.fail(f"the child ended (rc {proc.returncode}) before writing:\n{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"no data file within 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
        _kill_group(proc)
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL

    # Killed mid-write: data files of the new version are on disk, but no commit names them.
    orphans = _parquet_files(Path(table_path)) - before
    assert orphans and new_files <= orphans
    assert table_version(spark, table_path) == previous.version
    assert set(table_files(table_path)) == previous_files
    assert content_hash(spark.read.format("delta").load(table_path)) == previous_hash  # Spark reader
    assert read_arrow(table_path).num_rows == KILL_ROWS  # delta-rs reader
    assert not any(r.get("status") == "committed" and r.get("version", -1) > previous.version
                   for r in read_ledger(settings, "ws_wide"))

    # The next run commits the next version with the new input's rows; the orphans stay unread.
    result = run_feature_job(spark, settings, "ws_wide")
    assert result.version == previous.version + 1 and result.rows == KILL_ROWS + 500
    expected = spark.read.format("delta").load(events_path).select("user_id", (F.col("amount") * 2).alias("amount2"))
    assert content_hash(spark.read.format("delta").load(table_path)) == content_hash(expected)
    assert not {Path(f).name for f in table_files(table_path)} & {Path(o).name for o in orphans}


def _events(days: range, version: int) -> list[tuple[int, str, float]]:
    """A few events per user per day; ``version`` changes the amounts, so a rewritten day is visible."""
    first = dt.date(2026, 1, 1)
    return [(user, f"{first + dt.timedelta(days=d)} {9 + k:02d}:00:00", float(100 * version + 10 * d + user + k))
            for d in days for user in (1, 2, 3) for k in range(user)]


def _daily(events: list[tuple[int, str, float]]) -> dict[tuple[int, str], tuple[str, float, int]]:
    """What ws_daily computes, in plain Python: (user, day) → (max event_time, sum amount, count)."""
    out: dict[tuple[int, str], tuple[str, float, int]] = {}
    for user, stamp, amount in events:
        key = (user, stamp[:10])
        last, total, n = out.get(key, ("", 0.0, 0))
        out[key] = (max(last, stamp), total + amount, n + 1)
    return out


def _table_rows(path: str) -> dict[tuple[int, str], tuple[str, float, int]]:
    data = read_arrow(path).to_pydict()
    return {(u, str(d)): (str(t)[:19], a, n)
            for u, d, t, a, n in zip(data["user_id"], data["day"], data["event_time"], data["amount"], data["n"],
                                     strict=True)}


def test_concurrent_runs_on_disjoint_partitions_both_commit_and_lose_no_row(spark, ws):
    settings, _ = ws
    events_path, path = settings.table_path("ws_days"), settings.table_path("ws_daily")
    schema = "user_id long, event_time string, amount double"

    def write_events(rows, mode):
        df = spark.createDataFrame(rows, schema).selectExpr("user_id", "cast(event_time as timestamp) as event_time",
                                                             "amount")
        write_table(df, events_path, mode=mode)

    old = _events(range(6), version=1)  # 2026-01-01 .. 2026-01-06
    write_events(old, "overwrite")
    base = run_feature_job(spark, settings, "ws_daily")  # the table exists: both runs replaceWhere into it
    assert _table_rows(path) == _daily(old)
    new = _events(range(6), version=2)  # new events on every day, so a rewritten day changes
    write_events(new, "append")

    ranges = [("2026-01-02", "2026-01-04"), ("2026-01-04", "2026-01-06")]
    attempts = []
    for _ in range(3):  # until the two transactions really overlap (both read the same snapshot)
        start = table_version(spark, path)
        barrier = threading.Barrier(len(ranges))
        results: list = [None] * len(ranges)

        def run(i):
            barrier.wait(timeout=30)
            try:
                results[i] = run_feature_job(spark, settings, "ws_daily", start=ranges[i][0], end=ranges[i][1])
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(ranges))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a concurrent feature run did not finish within 300 s"
        for r in results:
            if isinstance(r, BaseException):
                raise r
        commits = {c["version"]: c for c in table_history(spark, path) if c["version"] > start}
        # Both committed, each its own version, and each result names its own commit.
        assert sorted(commits) == [start + 1, start + 2]
        assert {commits[r.version]["run"]["lakeray_run_id"] for r in results} == {r.run_id for r in results}
        assert sorted(r.rows for r in results) == [6, 6]
        read_versions = {int(v) for v in _read_versions(spark, path, sorted(commits))}
        attempts.append(read_versions)
        if read_versions == {start}:
            break
    assert attempts[-1] == {start}, f"the two runs never overlapped: read versions per attempt {attempts}"

    # No row lost: the two ranges carry the new input, the days outside them are untouched.
    everything = old + new
    expected = _daily(old)
    expected.update({k: v for k, v in _daily(everything).items() if "2026-01-02" <= k[1] < "2026-01-06"})
    assert _table_rows(path) == expected
    assert len(expected) == 18 and base.rows == 18


def _read_versions(spark, path, versions):
    from delta.tables import DeltaTable

    rows = DeltaTable.forPath(spark, path).history().where(f"version in ({','.join(map(str, versions))})")
    return [r["readVersion"] for r in rows.select("readVersion").collect()]
