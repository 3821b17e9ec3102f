"""The feature runner records every outcome in its ledger, validates run ranges before any Spark work,
and computes a partitions job once per run (the range check reads the persisted output)."""

import dataclasses
import textwrap

import pytest

from lakeray.errors import ConfigError, DataQualityError
from lakeray.features.backfill import backfill
from lakeray.features.runner import discover_jobs, read_ledger, run_feature_job
from lakeray.lakehouse.delta import table_exists, write_table

pytestmark = pytest.mark.spark

JOBS = '''
from pyspark.sql import functions as F
from lakeray.features import feature_job

COMPUTED = {}  # accumulator per run: rows the job's UDF evaluated


@feature_job(name="ro_crash", inputs=["ro_events"], entity_keys=["user_id"])
def ro_crash(ro_events):
    raise RuntimeError("job bug: division by zero in a helper")


@feature_job(name="ro_interrupt", inputs=["ro_events"], entity_keys=["user_id"])
def ro_interrupt(ro_events):
    raise KeyboardInterrupt


@feature_job(name="ro_counted", inputs=["ro_events"], entity_keys=["user_id"], event_time="event_time",
             write_mode="partitions", partition_by=["day"])
def ro_counted(ro_events, start=None, end=None):
    counter = ro_events.sparkSession.sparkContext.accumulator(0)
    COMPUTED.setdefault("runs", []).append(counter)

    def business_day(text):
        counter.add(1)
        return text[:10]

    # The partition column comes out of a Python UDF (nondeterministic, so nothing is pushed below
    # it): any computation of the job's rows, a range check's too, evaluates it once per input row.
    udf = F.udf(business_day, "string").asNondeterministic()
    df = ro_events.withColumn("day", F.to_date(udf(F.date_format("event_time", "yyyy-MM-dd HH:mm:ss"))))
    df = df.where((F.col("day") >= start) & (F.col("day") < end))
    return df.groupBy("user_id", "day").agg(F.max("event_time").alias("event_time"), F.sum("amount").alias("amount"))


@feature_job(name="ro_leaky", inputs=["ro_events"], entity_keys=["user_id"], event_time="event_time",
             write_mode="partitions", partition_by=["day"])
def ro_leaky(ro_events, start=None, end=None):
    return ro_events.withColumn("day", F.to_date("event_time"))  # ignores the range
'''


@pytest.fixture(scope="module")
def ro(spark, settings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ro_jobs")
    (folder / "ro_jobs.py").write_text(textwrap.dedent(JOBS))
    local = dataclasses.replace(settings, profile=settings.profile.model_copy(update={"feature_paths": [str(folder)]}))
    rows = [(u, f"2026-05-0{d} 1{u}:00:00", float(d * 10 + u)) for d in range(1, 4) for u in range(4)]
    events = spark.createDataFrame(rows, "user_id long, event_time string, amount double").selectExpr(
        "user_id", "cast(event_time as timestamp) as event_time", "amount")
    write_table(events, local.table_path("ro_events"))
    return local


def test_a_crashing_job_is_recorded_as_failed_and_reraised(spark, ro):
    with pytest.raises(RuntimeError, match="division by zero"):
        run_feature_job(spark, ro, "ro_crash")
    last = read_ledger(ro, "ro_crash")[-1]
    assert last["status"] == "failed"
    assert last["error"] == "RuntimeError: job bug: division by zero in a helper"
    assert last["inputs"] == {"ro_events": 0} and last["seconds"] >= 0


def test_an_interrupted_run_is_recorded_as_interrupted_and_reraised(spark, ro):
    with pytest.raises(KeyboardInterrupt):
        run_feature_job(spark, ro, "ro_interrupt")
    last = read_ledger(ro, "ro_interrupt")[-1]
    assert last["status"] == "interrupted" and last["error"] == "KeyboardInterrupt"


@pytest.mark.parametrize(("start", "end", "message"), [
    ("2026-05-01' OR 1=1 --", "2026-05-02", "not an ISO date"),
    ("2026-05-01", "tomorrow", "not an ISO date"),
    ("2026-05-02", "2026-05-01", "not after"),
    ("2026-05-02", "2026-05-02", "not after"),
])
def test_run_ranges_are_validated_before_any_spark_work(spark, ro, start, end, message):
    before = len(read_ledger(ro, "ro_counted"))
    with pytest.raises(ConfigError, match=message):
        run_feature_job(spark, ro, "ro_counted", start=start, end=end)
    assert len(read_ledger(ro, "ro_counted")) == before  # refused before the run began


def test_rows_outside_the_range_are_refused_and_nothing_is_written(spark, ro):
    with pytest.raises(DataQualityError, match="outside"):
        run_feature_job(spark, ro, "ro_leaky", start="2026-05-01", end="2026-05-02")
    assert not table_exists(spark, ro.table_path("ro_leaky"))
    assert read_ledger(ro, "ro_leaky")[-1]["status"] == "refused"


def test_each_backfill_chunk_computes_the_job_once(spark, ro):
    computed = discover_jobs(ro)["ro_counted"].fn.__globals__["COMPUTED"]
    computed.clear()
    chunks = backfill(spark, ro, "ro_counted", "2026-05-01", "2026-05-03", force=True)
    assert [c.status for c in chunks] == ["committed", "committed"]
    # Twelve input rows: each chunk's computation evaluated the UDF once per row (the range check,
    # the expectations and the write share one cache); computing twice would count 24.
    assert [counter.value for counter in computed["runs"]] == [12, 12]
