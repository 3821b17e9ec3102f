"""The Arrow (no JVM) row and content hashes equal Spark's on the same Delta table, type by type.

Both sides read one table written by deltalake: Spark through delta-spark, the Arrow side through
``DeltaTable.to_pyarrow_table()``, which is how the Spark and DuckDB engines meet.
"""

from __future__ import annotations

import datetime as dt
import decimal
import random
import re
import time

import numpy as np
import pyarrow as pa
import pytest

from lakeray.errors import DataQualityError
from lakeray.lakehouse import arrow_hash, pit

pytestmark = pytest.mark.spark

ROWS = 1200


def _strings(rnd: random.Random) -> list:
    alphabet = "aZ09 _-é中😀\u0000"
    out = []
    for i in range(ROWS):
        if i % 11 == 0:
            out.append(None)
        elif i < 81 * 3:  # every length 0..80 in bytes, three times over
            out.append("".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(i % 81)))
        elif i % 97 == 0:
            out.append("".join(rnd.choice(alphabet) for _ in range(rnd.randrange(1000, 1400))))
        else:
            out.append("".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 40))))
    return out


def _with_nulls(rnd: random.Random, values: list, share: float = 0.1) -> list:
    return [None if rnd.random() < share else v for v in values]


def _table() -> pa.Table:
    rnd = random.Random(17)
    specials64 = [float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1e-310, -1.5, 2.0**60]
    specials32 = [float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1e-40, -1.5, 3.4e38]

    def ints(bits: int) -> list:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return _with_nulls(rnd, [[lo, hi, 0, -1][i] if i < 4 else rnd.randint(lo, hi) for i in range(ROWS)])

    def floats(specials: list) -> list:
        return _with_nulls(rnd, [rnd.choice(specials) if rnd.random() < 0.3 else rnd.uniform(-1e6, 1e6)
                                 for _ in range(ROWS)])

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    stamps = [t0 + dt.timedelta(microseconds=rnd.randint(-2**50, 2**50)) for _ in range(ROWS)]
    strings = _strings(rnd)
    return pa.table({
        "id": pa.array(range(ROWS), pa.int64()),
        "flag": pa.array(_with_nulls(rnd, [rnd.random() < 0.5 for _ in range(ROWS)]), pa.bool_()),
        "tiny": pa.array(ints(8), pa.int8()),
        "small": pa.array(ints(16), pa.int16()),
        "count": pa.array(ints(32), pa.int32()),
        "big": pa.array(ints(64), pa.int64()),
        "ratio32": pa.array(floats(specials32), pa.float32()),
        "ratio": pa.array(floats(specials64), pa.float64()),
        "name": pa.array(strings, pa.string()),
        "blob": pa.array(_with_nulls(rnd, [s.encode() if s is not None else b"" for s in reversed(strings)]),
                         pa.binary()),
        "day": pa.array(_with_nulls(rnd, [rnd.randint(-719_162, 2_932_896) for _ in range(ROWS)]),  # years 1..9999
                        pa.int32()).cast(pa.date32()),
        "at": pa.array(_with_nulls(rnd, stamps), pa.timestamp("us", tz="UTC")),
        "local_at": pa.array(_with_nulls(rnd, [s.replace(tzinfo=None) for s in stamps]), pa.timestamp("us")),
        "price": pa.array(_with_nulls(rnd, [decimal.Decimal(rnd.randint(-10**9, 10**9)).scaleb(-2)
                                            for _ in range(ROWS)]), pa.decimal128(11, 2)),
        "amount": pa.array(_with_nulls(rnd, [decimal.Decimal(rnd.choice([10**18 - 1, -(10**18 - 1),
                                                                        rnd.randint(-10**18, 10**18)]))
                                             for _ in range(ROWS)]), pa.decimal128(18, 0)),
        "empty": pa.array([None] * ROWS, pa.float64()),
        # NaNs of other bit patterns (sign, payload) than Python's: Spark hashes every NaN alike.
        "odd_nan": pa.array(np.array([[0x7FF8000000000001, 0xFFF8000000000000, 0x7FF0000000000001, 0x3FF8000000000000]
                                      [i % 4] for i in range(ROWS)], np.uint64).view(np.float64)),
        "odd_nan32": pa.array(np.array([[0x7FC00001, 0xFFC00000, 0x7F800001, 0x3FC00000][i % 4] for i in range(ROWS)],
                                       np.uint32).view(np.float32)),
    })


@pytest.fixture(scope="module")
def tables(spark, tmp_path_factory):
    from deltalake import DeltaTable, write_deltalake

    path = str(tmp_path_factory.mktemp("arrow_hash") / "typed")
    write_deltalake(path, _table())
    arrow = DeltaTable(path).to_pyarrow_table().sort_by("id")
    return spark.read.format("delta").load(path), arrow


def _spark_by_id(df, column) -> np.ndarray:
    rows = df.select("id", column.alias("h")).orderBy("id").collect()
    return np.array([r["h"] for r in rows], np.int64)


def test_xxhash64_matches_spark_per_type(tables):
    from pyspark.sql import functions as F

    df, arrow = tables
    names = [n for n in arrow.column_names if n != "id"]
    for name in names:  # one type at a time, so a mismatch names its type
        expected = _spark_by_id(df, F.xxhash64(F.col(name)))
        got = arrow_hash.spark_xxhash64([arrow.column(name)])
        mismatched = np.flatnonzero(expected != got)
        assert not mismatched.size, (name, arrow.schema.field(name).type, arrow.column(name)[int(mismatched[0])])
    expected = _spark_by_id(df, F.xxhash64(F.lit("lakeray"), *[F.col(n) for n in names]))
    np.testing.assert_array_equal(arrow_hash.spark_xxhash64(["lakeray", *[arrow.column(n) for n in names]]),
                                  expected)
    # Chunked input and another seed.
    expected = _spark_by_id(df, F.expr("xxhash64(name, big)"))
    two_chunks = [pa.chunked_array([arrow.column(n).combine_chunks()[:500], arrow.column(n).combine_chunks()[500:]])
                  for n in ("name", "big")]
    np.testing.assert_array_equal(arrow_hash.spark_xxhash64(two_chunks), expected)


def test_arrow_layouts_hash_like_the_spark_checked_ones(tables):
    """Other Arrow layouts of the same values (DuckDB or pyarrow may hand them over) hash the same:
    large and view strings, dictionaries, other timestamp units, sliced arrays."""
    _, arrow = tables
    name, blob, at = (arrow.column(n).combine_chunks() for n in ("name", "blob", "at"))
    expected = arrow_hash.spark_xxhash64([name, blob, at])
    variants = {
        "large": [name.cast(pa.large_string()), blob.cast(pa.large_binary()), at],
        "view": [name.cast(pa.string_view()), blob.cast(pa.binary_view()), at],
        "dictionary": [name.dictionary_encode(), blob.dictionary_encode(), at],
        "nanoseconds": [name, blob, at.cast(pa.timestamp("ns", tz="UTC"))],
        "no time zone": [name, blob, at.cast(pa.timestamp("us"))],
    }
    for label, columns in variants.items():
        np.testing.assert_array_equal(arrow_hash.spark_xxhash64(columns), expected, err_msg=label)
    seconds = pa.array([-1, 0, 1_700_000_000, None], pa.timestamp("s"))
    in_micros = pa.array([-1_000_000, 0, 1_700_000_000_000_000, None], pa.timestamp("us"))
    for unit in ("s", "ms", "ns"):
        np.testing.assert_array_equal(arrow_hash.spark_xxhash64([seconds.cast(pa.timestamp(unit))]),
                                      arrow_hash.spark_xxhash64([in_micros]))
    # A null among a dictionary's values is a null row (in the v2 null mask too).
    coded = pa.table({"x": pa.DictionaryArray.from_arrays(pa.array([0, 1, None, 0], pa.int32()), pa.array(["a", None]))})
    np.testing.assert_array_equal(arrow_hash.row_hash(coded, ["x"]),
                                  arrow_hash.row_hash(pa.table({"x": pa.array(["a", None, None, "a"])}), ["x"]))
    for name in arrow.column_names:  # a slice starts at an offset into the buffers
        column = arrow.column(name).combine_chunks()
        np.testing.assert_array_equal(arrow_hash.spark_xxhash64([column.slice(123, 700)]),
                                      arrow_hash.spark_xxhash64([column])[123:823], err_msg=name)


@pytest.mark.parametrize("hash_version", [1, 2])
@pytest.mark.parametrize("seed", [None, "lakeray"])
def test_row_hash_matches_pit(tables, hash_version, seed):
    df, arrow = tables
    names = [n for n in arrow.column_names if n != "id"]
    expected = _spark_by_id(df, pit.row_hash(names, hash_version, seed))
    np.testing.assert_array_equal(arrow_hash.row_hash(arrow, names, hash_version, seed), expected)


def test_null_masks_span_several_longs(spark, tmp_path):
    """Over 62 columns the null mask is two longs; bits 31 and up are set too."""
    from deltalake import DeltaTable, write_deltalake

    rnd = random.Random(5)
    names = [f"c{i:02d}" for i in range(70)]
    write_deltalake(str(tmp_path), pa.table({
        "id": pa.array(range(300), pa.int64()),
        **{n: pa.array(_with_nulls(rnd, [rnd.randint(-5, 5) for _ in range(300)], 0.5), pa.int32()) for n in names}}))
    df = spark.read.format("delta").load(str(tmp_path))
    arrow = DeltaTable(str(tmp_path)).to_pyarrow_table().sort_by("id")
    expected = _spark_by_id(df, pit.row_hash(names))
    np.testing.assert_array_equal(arrow_hash.row_hash(arrow, names), expected)


@pytest.mark.parametrize("hash_version", [1, 2])
def test_content_hash_matches_pit(tables, hash_version):
    df, arrow = tables
    expected = pit.content_hash(df, hash_version)
    assert arrow_hash.content_hash(arrow, hash_version) == expected
    # Streamed in uneven batches, columns in another order: the same hash.
    shuffled = arrow.select(list(reversed(arrow.column_names)))
    batches = iter([*shuffled.slice(0, 7).to_batches(), *shuffled.slice(7).to_batches(max_chunksize=333)])
    assert arrow_hash.content_hash(batches, hash_version) == expected
    assert arrow_hash.content_hash(arrow.slice(0, 0), hash_version) == pit.content_hash(df.limit(0), hash_version)


@pytest.mark.parametrize("column", [pa.array([[1, 2], None], pa.list_(pa.int64())),
                                    pa.array([decimal.Decimal("1.5"), None], pa.decimal128(38, 2)),
                                    pa.array([1, 2], pa.uint32()),
                                    pa.array([1, 2], pa.time64("us"))])
def test_unsupported_type_is_refused(column):
    table = pa.table({"x": column, "id": pa.array([1, 2], pa.int64())})
    with pytest.raises(DataQualityError, match=re.escape(str(column.type))):
        arrow_hash.content_hash(table)
    with pytest.raises(DataQualityError, match="column 'x'"):
        arrow_hash.row_hash(table, ["id", "x"])
    with pytest.raises(DataQualityError):
        arrow_hash.spark_xxhash64([column])


def test_content_hash_speed_report():
    """Not a timed assertion: prints the seconds for 5M rows × (long key, timestamp, int, 3 doubles)."""
    rows = 5_000_000
    rng = np.random.default_rng(0)
    table = pa.table({
        "key": rng.integers(0, 100_000, rows),
        "event_time": pa.array(rng.integers(0, 2**50, rows), pa.timestamp("us", tz="UTC")),
        "clicks": rng.integers(-2**31, 2**31, rows).astype(np.int32),
        "a": rng.random(rows), "b": rng.random(rows),
        "c": pa.array(rng.random(rows), mask=rng.random(rows) < 0.05),
    })
    start = time.perf_counter()
    digest = arrow_hash.content_hash(table)
    print(f"arrow content_hash: {rows:,} rows x 6 columns in {time.perf_counter() - start:.2f} s ({digest})")
    assert digest.startswith(f"{rows}-")
