"""The feature runner and Delta table operations against real Delta tables."""

import pytest

from lakeray.errors import ConfigError, TableNotFoundError
from lakeray.features.runner import discover_jobs, run_feature_job
from lakeray.features.synthetic import generate_transactions
from lakeray.lakehouse.delta import read_arrow, read_table, table_files, write_table

pytestmark = pytest.mark.spark


def test_discovery_finds_the_example_job(settings):
    jobs = discover_jobs(settings)
    job = jobs["customer_aggregates"]
    assert job.inputs == ["transactions"] and job.entity_keys == ["customer_id"]
    assert job.source.endswith("jobs/features/customer_aggregates.py")


def test_run_commits_a_version_and_reruns_do_not_duplicate(spark, settings):
    write_table(generate_transactions(spark, 3_000, seed=5), settings.table_path("transactions"))
    first = run_feature_job(spark, settings, "customer_aggregates")
    second = run_feature_job(spark, settings, "customer_aggregates")
    assert first.rows == second.rows == 3_000
    assert second.version == first.version + 1
    assert first.input_versions == second.input_versions
    assert read_arrow(first.path, second.version).num_rows == 3_000
    # Time travel: the first version is still readable as it was.
    assert read_table(spark, first.path, first.version).count() == 3_000
    # File statistics only on the declared key and event time (cheaper writes), and they survive
    # the overwrite of the second run; delta-rs reads them.
    from deltalake import DeltaTable

    table = DeltaTable(first.path)
    assert table.metadata().configuration["delta.dataSkippingStatsColumns"] == "`customer_id`,`event_time`"
    import pyarrow as pa

    stats = pa.table(table.get_add_actions(flatten=True)).to_pydict()
    assert sum(stats["num_records"]) == 3_000
    assert {k for k in stats if k.startswith("min.")} == {"min.customer_id", "min.event_time"}


def test_unknown_job_and_missing_input(spark, settings, tmp_path):
    with pytest.raises(ConfigError, match="no feature job named 'nope'"):
        run_feature_job(spark, settings, "nope")
    with pytest.raises(TableNotFoundError, match="no Delta table"):
        read_table(spark, str(tmp_path / "absent"))


def test_missing_version_is_named(spark, settings):
    path = settings.table_path("versions_t")
    write_table(spark.range(10), path)
    with pytest.raises(TableNotFoundError, match="has no version 5 \\(latest is 0\\)"):
        read_table(spark, path, 5)
    with pytest.raises(TableNotFoundError, match="has no version 5"):
        read_arrow(path, 5)


def test_tables_are_plain_delta_without_deletion_vectors(spark, settings):
    from deltalake import DeltaTable

    path = settings.table_path("plain_t")
    write_table(spark.range(100).selectExpr("id", "id * 2 as x"), path)
    table = DeltaTable(path)
    assert table.metadata().configuration.get("delta.enableDeletionVectors", "false") == "false"
    assert len(table_files(path)) >= 1
    assert sorted(read_arrow(path, columns=["x"]).column("x").to_pylist())[:3] == [0, 2, 4]


def test_session_is_sized_for_the_feature_runner(spark):
    import os

    conf = spark.conf
    # The runner's cache is filled uncompressed (10% faster fill, 5% more memory; docs/decisions.md).
    assert conf.get("spark.sql.inMemoryColumnarStorage.compressed") == "false"
    # Delta's post-commit state rebuild and VACUUM's listing run as wide as the local machine, not 50 / 10,000.
    assert int(conf.get("spark.databricks.delta.snapshotPartitions")) <= (os.cpu_count() or 1)
    assert conf.get("spark.sql.sources.parallelPartitionDiscovery.parallelism") == conf.get("spark.sql.shuffle.partitions")
