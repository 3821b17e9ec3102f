"""Worker ingest of a pinned Delta version: every kind of table Spark writes, read back by shards.

Each table is made by real Spark/Delta (partitions, column mapping with renamed columns, deletion
vectors after DELETEs, an overwrite after the pinned version) and compared by value with Spark's own
read of the same version: the union of all ranks' rows must be exactly the version's rows.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from lakeray.errors import ConfigError
from lakeray.training.ingest import read_shard, read_version, should_stream, table_shards

pytestmark = pytest.mark.spark

WORLDS = [1, 2, 3]


def _rows_from_spark(spark, path: str, version: int, columns: list[str]) -> list[tuple]:
    df = spark.read.format("delta").option("versionAsOf", version).load(path).select(*columns)
    return sorted((tuple(r) for r in df.collect()), key=repr)


def _rows(table: pa.Table, columns: list[str]) -> list[tuple]:
    assert table.column_names == columns
    return sorted((tuple(r[c] for c in columns) for r in table.to_pylist()), key=repr)


def _union_of_ranks(path: str, version: int, columns: list[str], world: int) -> list[tuple]:
    shards = table_shards(path, version, world)
    rows = []
    for rank in range(world):
        rows += _rows(read_shard(path, version, columns, rank, world, shards), columns)
    return sorted(rows, key=repr)


def _base(spark, rows: int = 300):
    # A partition value with a space and a colon (escaped in the file path) and a null partition.
    return spark.range(0, rows).selectExpr(
        "id",
        "CASE WHEN id % 4 = 0 THEN 'north' WHEN id % 4 = 1 THEN 'a b:c' WHEN id % 4 = 2 THEN 'south' END AS region",
        "CAST(id % 2 AS INT) AS day",
        "CAST(id AS DOUBLE) * 0.5 AS x",
        "CAST(id % 3 = 0 AS INT) AS label",
    )


@pytest.fixture(scope="module")
def partitioned(spark, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ingest") / "partitioned")
    _base(spark).repartition(3).write.format("delta").partitionBy("region", "day").save(path)
    return path


@pytest.fixture(scope="module")
def column_mapped(spark, tmp_path_factory) -> str:
    """Name-mode column mapping, partitioned, with a data column and the partition column renamed:
    the files keep physical names, the log's logical names changed after the write."""
    path = str(tmp_path_factory.mktemp("ingest") / "mapped")
    (_base(spark).repartition(4).write.format("delta").option("delta.columnMapping.mode", "name")
     .partitionBy("region").save(path))
    spark.sql(f"ALTER TABLE delta.`{path}` RENAME COLUMN x TO amount")
    spark.sql(f"ALTER TABLE delta.`{path}` RENAME COLUMN region TO area")
    return path


@pytest.fixture(scope="module")
def with_deletion_vectors(spark, tmp_path_factory) -> str:
    """Version 1 and 2 each delete rows through deletion vectors (the files stay, masks are added)."""
    path = str(tmp_path_factory.mktemp("ingest") / "dv")
    (_base(spark).repartition(4).write.format("delta").option("delta.enableDeletionVectors", "true").save(path))
    spark.sql(f"DELETE FROM delta.`{path}` WHERE id % 7 = 0")
    spark.sql(f"DELETE FROM delta.`{path}` WHERE id % 11 = 0")
    return path


COLUMNS = ["id", "region", "day", "x", "label"]


@pytest.mark.parametrize("world", WORLDS)
def test_partitioned_table_union_of_shards_is_the_version(spark, partitioned, world):
    assert _union_of_ranks(partitioned, 0, COLUMNS, world) == _rows_from_spark(spark, partitioned, 0, COLUMNS)


@pytest.mark.parametrize("world", WORLDS)
def test_column_mapped_table_reads_logical_names(spark, column_mapped, world):
    from deltalake import DeltaTable

    version = DeltaTable(column_mapped).version()
    columns = ["amount", "id", "area", "label"]  # renamed data and partition columns, in a chosen order
    got = _union_of_ranks(column_mapped, version, columns, world)
    assert got == _rows_from_spark(spark, column_mapped, version, columns)
    assert all(row[0] is not None for row in got)  # deltalake's own pyarrow reader gives nulls here


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("version", [1, 2])
def test_deletion_vectors_exclude_deleted_rows(spark, with_deletion_vectors, world, version):
    got = _union_of_ranks(with_deletion_vectors, version, COLUMNS, world)
    assert got == _rows_from_spark(spark, with_deletion_vectors, version, COLUMNS)
    ids = {row[0] for row in got}
    assert not any(i % 7 == 0 for i in ids)
    assert any(i % 11 == 0 for i in ids) == (version == 1)


def test_pinned_version_survives_a_later_overwrite(spark, tmp_path):
    path = str(tmp_path / "overwritten")
    _base(spark, 100).repartition(2).write.format("delta").save(path)
    _base(spark, 40).selectExpr("id + 1000 AS id", "region", "day", "x", "label").write.format("delta") \
        .mode("overwrite").save(path)
    old = _rows(read_version(path, 0, COLUMNS), COLUMNS)
    assert old == _rows_from_spark(spark, path, 0, COLUMNS)
    assert {r[0] for r in old} == set(range(100))
    assert {r[0] for r in _rows(read_version(path, 1, COLUMNS), COLUMNS)} == set(range(1000, 1040))


@pytest.mark.parametrize("kind", ["plain", "deletion_vectors"])
def test_fewer_files_than_ranks_splits_rows(spark, tmp_path, kind):
    path = str(tmp_path / kind)
    writer = _base(spark, 101).coalesce(1).write.format("delta")
    if kind == "deletion_vectors":
        writer = writer.option("delta.enableDeletionVectors", "true")
    writer.save(path)
    version = 0
    if kind == "deletion_vectors":
        spark.sql(f"DELETE FROM delta.`{path}` WHERE id % 5 = 0")
        version = 1
    world = 3
    shards = table_shards(path, version, world)
    assert sum(1 for s in shards if s) == 1 and sum(len(s) for s in shards) == 1
    parts = [read_shard(path, version, COLUMNS, rank, world, shards) for rank in range(world)]
    expected = _rows_from_spark(spark, path, version, COLUMNS)
    assert all(p.num_rows > 0 for p in parts)
    assert max(p.num_rows for p in parts) - min(p.num_rows for p in parts) <= world
    assert sorted((r for p in parts for r in _rows(p, COLUMNS)), key=repr) == expected


def test_shards_cover_every_file_once_balanced_by_bytes(partitioned):
    from deltalake import DeltaTable

    table = DeltaTable(partitioned)
    files = set(table.file_uris())
    sizes = dict(zip(table.file_uris(), pa.table(table.get_add_actions(flatten=True)).column("size_bytes").to_pylist()))
    shards = table_shards(partitioned, 0, 3)
    assert sorted(f for s in shards for f in s) == sorted(files)
    loads = [sum(sizes[f] for f in s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes.values())  # greedy largest-first bound


def test_unknown_column_is_a_clear_error(partitioned):
    with pytest.raises(ConfigError, match="no_such_column"):
        read_version(partitioned, 0, ["id", "no_such_column"])


def test_should_stream_rule():
    gib = 1 << 30
    assert not should_stream(total_bytes=1 * gib, world=2, worker_memory_bytes=8 * gib)  # 2 GiB decoded/worker
    assert should_stream(total_bytes=4 * gib, world=2, worker_memory_bytes=8 * gib)  # 8 GiB decoded/worker


def test_lakehouse_readers_apply_column_mapping_and_deletion_vectors(spark, column_mapped, with_deletion_vectors):
    """lakehouse.delta's readers (the duckdb engine, plan checks, evaluation use them) see what Spark
    sees: deltalake's own pyarrow reader would give nulls for renamed columns and refuse deletion
    vectors."""
    import pyarrow as pa
    from deltalake import DeltaTable

    from lakeray.lakehouse.delta import iter_batches, read_arrow

    version = DeltaTable(column_mapped).version()
    columns = ["amount", "id", "area", "label"]
    expected = _rows_from_spark(spark, column_mapped, version, columns)
    assert _rows(read_arrow(column_mapped, version, columns), columns) == expected
    batches = pa.Table.from_batches(list(iter_batches(column_mapped, version, columns, batch_size=50)))
    assert _rows(batches, columns) == expected
    assert "amount" in read_arrow(column_mapped, version, files=[]).schema.names
    for dv_version in (1, 2):
        got = _rows(read_arrow(with_deletion_vectors, dv_version, COLUMNS), COLUMNS)
        assert got == _rows_from_spark(spark, with_deletion_vectors, dv_version, COLUMNS)
