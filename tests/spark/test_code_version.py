"""A feature job's code version covers what its result depends on: the job file, the project modules it
imports (transitively), and lakeray's own version and runner code."""

import dataclasses
import textwrap

import pytest

from lakeray.features.backfill import backfill
from lakeray.features.runner import find_job
from lakeray.lakehouse.delta import write_table

pytestmark = pytest.mark.spark

HELPER = '''
from pyspark.sql import functions as F

from _cv_units import FACTOR


def scaled(column):
    return F.col(column) * FACTOR
'''

UNITS = "FACTOR = 2.0\n"

JOB = '''
from pyspark.sql import functions as F
from lakeray.features import feature_job

from _cv_helpers import scaled


@feature_job(name="cv_daily", inputs=["cv_events"], entity_keys=["user_id"], event_time="event_time",
             write_mode="partitions", partition_by=["day"])
def cv_daily(cv_events, start=None, end=None):
    df = cv_events.withColumn("day", F.to_date("event_time")).where((F.col("day") >= start) & (F.col("day") < end))
    return df.select("user_id", "event_time", "day", scaled("amount").alias("amount"))
'''


@pytest.fixture(scope="module")
def cv(spark, settings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cv_jobs")
    (folder / "_cv_units.py").write_text(UNITS)
    (folder / "_cv_helpers.py").write_text(textwrap.dedent(HELPER))
    (folder / "cv_jobs.py").write_text(textwrap.dedent(JOB))
    local = dataclasses.replace(settings, profile=settings.profile.model_copy(update={"feature_paths": [str(folder)]}))
    events = spark.createDataFrame([(1, "2026-06-01 10:00:00", 1.5), (2, "2026-06-02 11:00:00", 2.5)],
                                   "user_id long, event_time string, amount double").selectExpr(
        "user_id", "cast(event_time as timestamp) as event_time", "amount")
    write_table(events, local.table_path("cv_events"))
    return local, folder


def test_editing_an_imported_helper_changes_the_code_version_and_reruns_the_chunk(spark, cv):
    settings, folder = cv
    first = backfill(spark, settings, "cv_daily", "2026-06-01", "2026-06-02")
    assert [c.status for c in first] == ["committed"]
    assert [c.status for c in backfill(spark, settings, "cv_daily", "2026-06-01", "2026-06-02")] == ["skipped"]
    before = find_job(settings, "cv_daily").code_version
    helper = folder / "_cv_helpers.py"
    helper.write_text(helper.read_text() + "\n# rounding changed\n")
    after_helper = find_job(settings, "cv_daily").code_version
    assert after_helper != before
    assert [c.status for c in backfill(spark, settings, "cv_daily", "2026-06-01", "2026-06-02")] == ["committed"]
    # A module the helper imports counts too (transitively).
    units = folder / "_cv_units.py"
    units.write_text(units.read_text() + "# units doc\n")
    assert find_job(settings, "cv_daily").code_version not in {before, after_helper}


def test_code_version_covers_lakerays_version_and_runner(cv):
    import hashlib
    from pathlib import Path

    settings, folder = cv
    job = find_job(settings, "cv_daily")
    job_file_only = hashlib.sha256(Path(job.source).read_bytes()).hexdigest()[:12]
    assert job.code_version != job_file_only
    # Same inputs, same answer: the version is a pure function of the files it covers.
    assert find_job(settings, "cv_daily").code_version == job.code_version
