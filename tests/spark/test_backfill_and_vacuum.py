"""Backfill (chunked, skips what the same code already committed, resumable) and reference-aware vacuum."""

import dataclasses
import textwrap
from pathlib import Path

import pytest

from lakeray.errors import ConfigError, LakerayError
from lakeray.features.backfill import backfill, plan_chunks
from lakeray.features.retention import vacuum
from lakeray.features.training_sets import TrainingSetSpec, build_training_set
from lakeray.lakehouse.delta import read_table, table_files, write_table
from lakeray.lakehouse.pit import content_hash

pytestmark = pytest.mark.spark

JOBS = '''
from pyspark.sql import functions as F
from lakeray.features import feature_job

@feature_job(name="bf_daily", inputs=["bf_events"], entity_keys=["user_id"], event_time="event_time",
             write_mode="partitions", partition_by=["day"])
def bf_daily(bf_events, start=None, end=None):
    df = bf_events.withColumn("day", F.to_date("event_time"))
    df = df.where((F.col("day") >= start) & (F.col("day") < end))
    if df.where(F.col("user_id") < 0).limit(1).count():  # a poison row: the test's stand-in for a crash
        raise RuntimeError("poison row in range")
    return df.groupBy("user_id", "day").agg(F.max("event_time").alias("event_time"), F.sum("amount").alias("amount"))
'''


@pytest.fixture(scope="module")
def bf(spark, settings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf_jobs")
    (folder / "bf_jobs.py").write_text(textwrap.dedent(JOBS))
    local = dataclasses.replace(settings, profile=settings.profile.model_copy(update={"feature_paths": [str(folder)]}))
    rows = [(u, f"2026-03-0{d} 1{u}:00:00", float(d * 10 + u)) for d in range(1, 5) for u in range(3)]
    events = spark.createDataFrame(rows, "user_id long, event_time string, amount double").selectExpr(
        "user_id", "cast(event_time as timestamp) as event_time", "amount")
    write_table(events, local.table_path("bf_events"))
    return local, folder


def test_chunks_cover_the_range_once():
    assert plan_chunks("2026-03-01", "2026-03-04") == [("2026-03-01", "2026-03-02"), ("2026-03-02", "2026-03-03"),
                                                        ("2026-03-03", "2026-03-04")]
    assert plan_chunks("2026-03-01", "2026-03-06", 2)[-1] == ("2026-03-05", "2026-03-06")
    with pytest.raises(ConfigError, match="not after"):
        plan_chunks("2026-03-02", "2026-03-01")
    with pytest.raises(ConfigError, match="not an ISO date"):
        plan_chunks("March", "2026-03-01")


def test_backfill_resumes_skips_same_code_and_force_reruns(spark, bf):
    settings, folder = bf
    path = settings.table_path("bf_daily")
    # An interrupted backfill: days 1-2 committed, then the run died (here: stopped after day 2).
    first = backfill(spark, settings, "bf_daily", "2026-03-01", "2026-03-03")
    assert [c.status for c in first] == ["committed", "committed"]
    seen = []
    resumed = backfill(spark, settings, "bf_daily", "2026-03-01", "2026-03-05", on_chunk=seen.append)
    assert [c.status for c in resumed] == ["skipped", "skipped", "committed", "committed"]
    assert seen == resumed and "same code version" in resumed[0].reason
    table = read_table(spark, path)
    assert table.count() == 12 and table.select("day").distinct().count() == 4
    digest = content_hash(table)
    # Nothing left to do: a rerun commits nothing.
    again = backfill(spark, settings, "bf_daily", "2026-03-01", "2026-03-05")
    assert all(c.status == "skipped" for c in again) and again[-1].version == resumed[-1].version
    # --force reruns every chunk; the rows are the same.
    forced = backfill(spark, settings, "bf_daily", "2026-03-02", "2026-03-04", force=True)
    assert [c.status for c in forced] == ["committed", "committed"]
    assert content_hash(read_table(spark, path)) == digest
    # Changing the job's code makes its chunks stale: they are recomputed.
    job_file = folder / "bf_jobs.py"
    job_file.write_text(job_file.read_text() + "\n# v2\n")
    try:
        changed = backfill(spark, settings, "bf_daily", "2026-03-01", "2026-03-02")
        assert [c.status for c in changed] == ["committed"]
    finally:
        job_file.write_text(job_file.read_text().replace("\n# v2\n", ""))


def test_a_failing_chunk_stops_the_backfill_and_keeps_earlier_chunks(spark, bf):
    settings, _ = bf
    bad = spark.createDataFrame([(-1, "2026-04-02 10:00:00", 1.0), (5, "2026-04-01 10:00:00", 2.0)],
                                "user_id long, event_time string, amount double").selectExpr(
        "user_id", "cast(event_time as timestamp) as event_time", "amount")
    bad.write.format("delta").mode("append").save(settings.table_path("bf_events"))
    seen = []
    with pytest.raises(Exception, match="poison row"):
        backfill(spark, settings, "bf_daily", "2026-04-01", "2026-04-04", on_chunk=seen.append)
    assert [(c.start, c.status) for c in seen] == [("2026-04-01", "committed")]
    assert read_table(spark, settings.table_path("bf_daily")).where("day = '2026-04-01'").count() == 1


def test_backfill_refuses_jobs_that_are_not_partitioned(spark, settings):
    with pytest.raises(LakerayError, match="no feature job named 'nope'"):
        backfill(spark, settings, "nope", "2026-03-01", "2026-03-02")


def _three_versions(spark, settings, name):
    for i in range(3):
        df = spark.range(5).selectExpr("id as user_id", "timestamp'2026-01-01' as event_time", f"{i} as v")
        write_table(df, settings.table_path(name))


def local_files(settings, table, version):
    return [f.removeprefix("file://") for f in table_files(settings.table_path(table), version)]


def test_vacuum_keeps_referenced_versions_and_deletes_the_rest(spark, settings):
    _three_versions(spark, settings, "vac_free")
    _three_versions(spark, settings, "vac_pinned")
    labels = spark.range(5).selectExpr("id as user_id", "timestamp'2026-01-02' as event_time", "1 as label")
    write_table(labels, settings.table_path("vac_labels"))
    spec = TrainingSetSpec.parse({"name": "vac_ts", "labels": "vac_labels", "entity_keys": ["user_id"],
                                  "event_time": "event_time",
                                  "features": [{"table": "vac_pinned", "columns": ["v"], "version": 0}]})
    built = build_training_set(spark, settings, spec)
    old_free = set(local_files(settings, "vac_free", 0)) | set(local_files(settings, "vac_free", 1))
    old_free -= set(local_files(settings, "vac_free", 2))
    old_pinned = local_files(settings, "vac_pinned", 0)

    preview = vacuum(spark, settings, ["vac_free", "vac_pinned"], retain_hours=0, dry_run=True)
    assert set(preview[0].deleted_files) == old_free and preview[1].deleted_files == []
    assert all(Path(f).exists() for f in old_free)  # dry run deletes nothing

    results = {r.table: r for r in vacuum(spark, settings, ["vac_free", "vac_pinned"], retain_hours=0)}
    assert not any(Path(f).exists() for f in old_free)
    assert all(Path(f).exists() for f in old_pinned)
    assert results["vac_pinned"].kept == {0: [f"training-set manifest vac_ts@{built.version}"]}
    assert results["vac_free"].kept == {} and len(results["vac_free"].deleted_files) == len(old_free)
    # The pinned version still reads, so the training set can still be rebuilt from its manifest.
    assert read_table(spark, settings.table_path("vac_pinned"), 0).where("v = 0").count() == 5


def test_vacuum_keeps_the_version_a_registered_model_was_trained_on(spark, settings):
    import mlflow

    from lakeray.registry import mlflow_client

    _three_versions(spark, settings, "vac_model")
    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name("vac") or client.get_experiment(client.create_experiment("vac"))
    # The tags as training logs them: a portable table@version (the path is storage-relative).
    run = client.create_run(experiment.experiment_id, tags={
        "lakeray.input": "vac_model@1", "lakeray.input_path": "tables/vac_model", "lakeray.input_version": "1"})
    client.set_terminated(run.info.run_id)
    client.create_registered_model("vac_model_clf")
    client.create_model_version("vac_model_clf", f"runs:/{run.info.run_id}/model", run.info.run_id)
    assert mlflow.get_tracking_uri() == settings.mlflow_tracking_uri

    [result] = vacuum(spark, settings, ["vac_model"], retain_hours=0)
    assert result.kept == {1: ["registered model vac_model_clf/1"]}
    assert read_table(spark, settings.table_path("vac_model"), 1).where("v = 1").count() == 5


def test_vacuum_rejects_unknown_tables(spark, settings):
    with pytest.raises(LakerayError, match="no Delta table 'vac_nope'"):
        vacuum(spark, settings, ["vac_nope"])
