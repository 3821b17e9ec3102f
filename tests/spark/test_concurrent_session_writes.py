"""Writes that need Delta session settings (MERGE's commit metadata, VACUUM's retention guard) never
change the caller's session: concurrent runs in one session keep their own lineage and guards."""

import threading

import pytest

from lakeray.lakehouse.delta import merge_table, table_history, vacuum_table, write_table

pytestmark = pytest.mark.spark

GUARD = "spark.databricks.delta.retentionDurationCheck.enabled"
USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"


def _run_threads(targets):
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors


def test_concurrent_merges_each_record_their_own_metadata(spark, settings):
    tables = {name: settings.table_path(name) for name in ("cm_left", "cm_right")}
    for path in tables.values():
        write_table(spark.range(20).selectExpr("id", "id * 1.0 AS x"), path)
    rounds = 3
    barrier = threading.Barrier(len(tables))

    def merges(name, path):
        def run():
            for round_ in range(rounds):
                barrier.wait(timeout=300)  # both threads merge at the same moment, round after round
                source = spark.range(10 * round_, 10 * round_ + 15).selectExpr("id", f"id * {round_ + 2}.0 AS x")
                merge_table(source, path, ["id"], user_metadata=f"{name}-run-{round_}")
        return run

    _run_threads([merges(name, path) for name, path in tables.items()])
    for name, path in tables.items():
        merged = [c for c in table_history(spark, path) if c["operation"] == "MERGE"]
        assert sorted(c["run"]["userMetadata"] for c in merged) == [f"{name}-run-{r}" for r in range(rounds)]
    assert spark.conf.get(USER_METADATA, None) is None  # the caller's session was never changed


def test_vacuum_never_lifts_the_retention_guard_of_the_callers_session(spark, settings):
    path = settings.table_path("cm_vacuum")
    for version in range(3):
        write_table(spark.range(50).selectExpr(f"id + {version} AS id"), path)
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():  # what any other thread of this session reads meanwhile
            seen.add(spark.conf.get(GUARD, "true"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        deleted = vacuum_table(spark, path, retain_hours=0)
    finally:
        done.set()
        watcher.join(timeout=60)
    assert deleted  # the two overwritten versions' files went
    assert seen == {"true"}
    assert spark.conf.get(GUARD, "true") == "true"
