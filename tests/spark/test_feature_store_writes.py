"""Declared feature jobs: quality gates, schema-change guard, partition and merge writes, history."""

import dataclasses
import textwrap

import pytest

from lakeray.errors import ConfigError, DataQualityError
from lakeray.features.runner import discover_jobs, read_ledger, run_feature_job
from lakeray.lakehouse.delta import read_arrow, table_history, table_version, version_at, write_table
from lakeray.lakehouse.pit import content_hash

pytestmark = pytest.mark.spark

JOBS = '''
from pyspark.sql import functions as F
from lakeray.features import expect, feature_job

@feature_job(name="fs_daily", inputs=["fs_events"], entity_keys=["user_id"], event_time="event_time",
             write_mode="partitions", partition_by=["day"],
             expectations=[expect.not_null("user_id"), expect.between("amount", min=0, severity="warn")])
def fs_daily(fs_events, start=None, end=None):
    df = fs_events.withColumn("day", F.to_date("event_time"))
    if start is not None:
        df = df.where((F.col("day") >= start) & (F.col("day") < end))
    return df.groupBy("user_id", "day").agg(F.max("event_time").alias("event_time"),
                                           F.sum("amount").alias("amount"))

@feature_job(name="fs_strict", inputs=["fs_events"], entity_keys=["user_id"],
             expectations=[expect.unique("user_id"), expect.row_count(min=1)])
def fs_strict(fs_events):
    return fs_events.select("user_id", "amount")

@feature_job(name="fs_latest", inputs=["fs_events"], entity_keys=["user_id"], write_mode="merge")
def fs_latest(fs_events):
    return fs_events.groupBy("user_id").agg(F.sum("amount").alias("total"))
'''


@pytest.fixture(scope="module")
def fs(spark, settings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("jobs")
    (folder / "fs_jobs.py").write_text(textwrap.dedent(JOBS))
    local = dataclasses.replace(settings, profile=settings.profile.model_copy(update={"feature_paths": [str(folder)]}))
    events = spark.createDataFrame(
        [(1, "2026-01-01 10:00:00", 5.0), (1, "2026-01-01 12:00:00", 7.0), (2, "2026-01-02 09:00:00", 1.0),
         (3, "2026-01-03 09:00:00", -4.0)],
        "user_id long, event_time string, amount double").selectExpr(
        "user_id", "cast(event_time as timestamp) as event_time", "amount")
    write_table(events, local.table_path("fs_events"))
    return local, folder


def test_declarations_are_discovered_with_their_settings(fs):
    jobs = discover_jobs(fs[0])
    assert set(jobs) == {"fs_daily", "fs_strict", "fs_latest"}
    assert jobs["fs_daily"].write_mode == "partitions" and jobs["fs_daily"].partition_by == ["day"]
    assert len(jobs["fs_daily"].code_version) == 12


def test_declaration_errors_are_clear():
    from lakeray.errors import ConfigError
    from lakeray.features import feature_job

    with pytest.raises(ConfigError, match="feature job 'x': declaration: .*needs partition_by"):
        feature_job(name="x", write_mode="partitions")(lambda: None)
    with pytest.raises(ConfigError, match="must be letters"):
        feature_job(name="bad-name")(lambda: None)


def test_failing_error_expectation_commits_nothing_and_is_recorded(spark, fs):
    settings, _ = fs
    events = settings.table_path("fs_events")
    before = table_version(spark, events)
    # Duplicate user 1 rows break unique(user_id).
    with pytest.raises(DataQualityError) as err:
        run_feature_job(spark, settings, "fs_strict")
    assert "unique(user_id): 2 rows share a key" in err.value.headline and "nothing was committed" in err.value.headline
    assert "e.g." in err.value.headline  # an example row
    from lakeray.lakehouse.delta import table_exists

    assert not table_exists(spark, settings.table_path("fs_strict"))
    assert table_version(spark, events) == before
    last = read_ledger(settings, "fs_strict")[-1]
    assert last["status"] == "refused" and not last["expectations"][0]["passed"]


def test_warn_expectation_commits_and_reports(spark, fs):
    settings, _ = fs
    result = run_feature_job(spark, settings, "fs_daily")
    warned = [e for e in result.expectations if not e["passed"]]
    assert [w["name"] for w in warned] == ["between(amount)[0.0, None]"] and warned[0]["failing_rows"] == 1
    assert result.rows == 3


def test_partition_reruns_replace_only_their_range_and_are_idempotent(spark, fs):
    settings, _ = fs
    path = settings.table_path("fs_daily")
    full = run_feature_job(spark, settings, "fs_daily")
    whole_hash = content_hash(spark.read.format("delta").load(path))
    first = run_feature_job(spark, settings, "fs_daily", start="2026-01-02", end="2026-01-03")
    assert first.rows == 1 and first.version == full.version + 1
    again = run_feature_job(spark, settings, "fs_daily", start="2026-01-02", end="2026-01-03")
    assert again.version == first.version + 1
    assert read_arrow(path).num_rows == 3
    assert content_hash(spark.read.format("delta").load(path)) == whole_hash
    with pytest.raises(ConfigError, match="go together"):
        run_feature_job(spark, settings, "fs_daily", start="2026-01-02")


def test_merge_upserts_by_keys(spark, fs):
    settings, _ = fs
    run_feature_job(spark, settings, "fs_latest")
    run_feature_job(spark, settings, "fs_latest")
    table = read_arrow(settings.table_path("fs_latest")).to_pydict()
    assert sorted(zip(table["user_id"], table["total"], strict=True)) == [(1, 12.0), (2, 1.0), (3, -4.0)]


def test_dropping_a_column_is_refused_unless_declared(spark, fs):
    settings, folder = fs
    (folder / "fs_drop.py").write_text(textwrap.dedent('''
        from lakeray.features import feature_job

        @feature_job(name="fs_daily_v2", inputs=["fs_events"], entity_keys=["user_id"])
        def first(fs_events):
            return fs_events.select("user_id", "amount")
    '''))
    run_feature_job(spark, settings, "fs_daily_v2")
    path = settings.table_path("fs_daily_v2")
    before = table_version(spark, path)
    (folder / "fs_drop.py").write_text(textwrap.dedent('''
        from lakeray.features import feature_job

        @feature_job(name="fs_daily_v2", inputs=["fs_events"], entity_keys=["user_id"])
        def second(fs_events):
            return fs_events.selectExpr("user_id", "cast(amount as string) as amount", "event_time")
    '''))
    import sys

    for name in [m for m in sys.modules if m.startswith("lakeray_jobs_fs_drop")]:
        del sys.modules[name]
    with pytest.raises(DataQualityError, match=r"retypes \['amount double → string'\]"):
        run_feature_job(spark, settings, "fs_daily_v2")
    assert table_version(spark, path) == before


def test_history_carries_run_lineage_and_time_travel_by_timestamp(spark, fs):
    settings, _ = fs
    result = run_feature_job(spark, settings, "fs_daily")
    history = table_history(spark, result.path)
    newest = history[0]
    assert newest["version"] == result.version
    assert newest["run"]["lakeray_run_id"] == result.run_id
    assert newest["run"]["inputs"] == {"fs_events": 0}
    assert newest["run"]["code_version"] == result.code_version
    stamp = newest["timestamp"].isoformat()
    assert version_at(result.path, stamp) == result.version
    from lakeray.errors import TableNotFoundError

    with pytest.raises(TableNotFoundError, match="did not exist yet"):
        version_at(result.path, "2000-01-01T00:00:00")


@pytest.mark.parametrize("driver_max_rows", [1_000, 0], ids=["hashes-sorted-in-driver", "hashes-shuffled-in-spark"])
def test_unique_finds_duplicates_on_both_paths(spark, driver_max_rows):
    from lakeray.lakehouse.quality import evaluate, expect

    rows = [(i % 50, f"k{i // 50}") for i in range(200)]  # 200 distinct (a, b) pairs; no single column is unique
    df = spark.createDataFrame(rows, "a long, b string")
    checks = [expect.unique("a", "b"), expect.unique("a")]
    clean, per_a = evaluate(df, checks, unique_on_driver_max_rows=driver_max_rows)
    assert clean.passed and clean.failing_rows == 0
    assert not per_a.passed and per_a.failing_rows == 200  # every a appears 4 times
    dup = df.union(spark.createDataFrame([(7, "k0"), (None, None), (None, None)], "a long, b string"))
    (broken,) = evaluate(dup, [expect.unique("a", "b")], unique_on_driver_max_rows=driver_max_rows)
    # (7, k0) twice and (null, null) twice: null keys are equal to each other, as in a group-by.
    assert broken.failing_rows == 4 and len(broken.examples) == 2
    (empty,) = evaluate(df.limit(0), [expect.unique("a")], unique_on_driver_max_rows=driver_max_rows)
    assert empty.passed


@pytest.mark.parametrize("rows_seen", [200, 10**9], ids=["driver-sort", "spark-group-by"])
def test_key_hashes_repeat_only_when_keys_do(spark, rows_seen):
    from lakeray.lakehouse.quality import UNIQUE_ON_DRIVER_MAX_ROWS, _hashes_repeat

    # rows_seen picks the path: 200 rows sort in the driver, a billion go to Spark's group-by.
    distinct = spark.range(200).selectExpr("id % 50 as a", "cast(id div 50 as string) as b")
    assert not _hashes_repeat(distinct, ["a", "b"], rows_seen, UNIQUE_ON_DRIVER_MAX_ROWS)
    assert _hashes_repeat(distinct, ["a"], rows_seen, UNIQUE_ON_DRIVER_MAX_ROWS)
    assert not _hashes_repeat(distinct.limit(0), ["a"], 0 if rows_seen == 200 else rows_seen,
                              UNIQUE_ON_DRIVER_MAX_ROWS)
