"""Point-in-time join in DuckDB, in process: the engine for training sets that fit one machine.

The pinned versions arrive as Arrow (read through delta-rs, no JVM). Per feature table, DuckDB's
``ASOF LEFT JOIN`` finds for every label row the feature row with the greatest (event time, tie hash)
at or before (the label's time, +∞) among the rows of the same key: the latest row at or before the
label, and among feature rows of one key and time the one with the larger tie hash, the Spark
engine's rule (:mod:`lakeray.lakehouse.pit`). Time and tie hash are packed into one 128-bit ordering
value, which costs less than deduplicating the ties first (1.2 s against 1.5 s at 5M rows).

DuckDB returns only row numbers (label row → feature row); the output is assembled in Arrow by
taking those rows from the inputs, so every value and type passes through untouched (NaN stays NaN,
an int stays an int), and the content hash (:mod:`lakeray.lakehouse.arrow_hash`, Spark's xxhash64
reimplemented) equals the Spark engine's for the same rows. The checks are the Spark engine's own
(:func:`~lakeray.lakehouse.pit.plan_output`): a spec is refused by both with the same words.

Memory: the inputs are held as Arrow in this process; DuckDB's own memory (the join's sort and hash
state) is capped at ``memory_limit_mb`` and spills to ``temp_dir`` past it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakeray.errors import DataQualityError
from lakeray.lakehouse.pit import HASH_VERSION, SourceShape, plan_output

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

__all__ = ["ArrowSource", "point_in_time_join_arrow", "spark_type_name", "supported_time_type"]


@dataclass(frozen=True)
class ArrowSource:
    """One feature table at its pinned version, as Arrow (its keys, time and requested columns)."""

    name: str
    table: pa.Table
    entity_keys: tuple[str, ...]
    event_time: str
    columns: tuple[str, ...]
    max_age_s: float | None = None
    label_keys: tuple[str, ...] | None = None

    @property
    def joins_on(self) -> tuple[str, ...]:
        return tuple(self.label_keys) if self.label_keys else tuple(self.entity_keys)


def spark_type_name(arrow_type: pa.DataType) -> str:
    """The Spark type name of an Arrow type as Delta maps them (``int64`` → ``bigint``), so both engines
    name types alike in their errors; the Arrow name for anything else."""
    import pyarrow.types as pat

    for check, name in [(pat.is_int8, "tinyint"), (pat.is_int16, "smallint"), (pat.is_int32, "int"),
                        (pat.is_int64, "bigint"), (pat.is_float32, "float"), (pat.is_float64, "double"),
                        (pat.is_boolean, "boolean"), (pat.is_date32, "date"), (pat.is_binary, "binary"),
                        (pat.is_large_binary, "binary")]:
        if check(arrow_type):
            return name
    if pat.is_string(arrow_type) or pat.is_large_string(arrow_type) or str(arrow_type) == "string_view":
        return "string"
    if pat.is_timestamp(arrow_type):
        return "timestamp" if arrow_type.tz else "timestamp_ntz"
    if pat.is_decimal(arrow_type):
        return f"decimal({arrow_type.precision},{arrow_type.scale})"
    return str(arrow_type)


def supported_time_type(arrow_type: pa.DataType) -> bool:
    """Event-time types this engine reads exactly as Spark casts them: timestamps and dates."""
    import pyarrow.types as pat

    return pat.is_timestamp(arrow_type) or pat.is_date32(arrow_type)


def _micros(column, what: str) -> np.ndarray:
    """An event-time column as int64 microseconds since the epoch (UTC), with a validity mask, as the
    Spark engine's cast to timestamp gives them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types as pat

    if pat.is_timestamp(column.type):
        values = pc.cast(column, pa.timestamp("us", tz=column.type.tz)).cast(pa.int64())
    elif pat.is_date32(column.type):
        values = pc.multiply(column.cast(pa.int32()).cast(pa.int64()), 86_400_000_000)
    else:
        raise DataQualityError(f"{what} is {spark_type_name(column.type)}: the duckdb engine joins on timestamp or "
                               "date event times", "cast it in the job, or build with engine: spark")
    return pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False), \
        pc.is_valid(column).to_numpy(zero_copy_only=False)


_ORDER = "((__t::HUGEINT << 64) + (__tie::HUGEINT + 9223372036854775808))"  # (time, tie) as one value
_LABEL_ORDER = "((__t::HUGEINT << 64) + 18446744073709551615)"  # (time, +∞): every tie at that time


def point_in_time_join_arrow(labels: pa.Table, label_keys: list[str], label_time: str, sources: list[ArrowSource],
                             hash_version: int = HASH_VERSION, memory_limit_mb: int | None = None,
                             temp_dir: str | None = None, threads: int | None = None) -> pa.Table:
    """``labels`` with one column per requested feature, each as of the label row's event time; the same
    rows as :func:`lakeray.lakehouse.pit.point_in_time_join` (same content hash)."""
    import duckdb
    import numpy as np
    import pyarrow as pa

    def types(table: pa.Table) -> dict[str, str]:
        return {f.name: spark_type_name(f.type) for f in table.schema}

    names_of = plan_output(types(labels), label_keys, label_time, [
        SourceShape(s.name, types(s.table), s.entity_keys, s.event_time, s.columns, s.joins_on) for s in sources])
    label_t, label_ok = _micros(labels.column(label_time), f"the labels' event time {label_time!r}")
    n = labels.num_rows

    con = duckdb.connect(config={"preserve_insertion_order": False})
    try:
        if memory_limit_mb:
            con.execute(f"SET memory_limit = '{int(memory_limit_mb)}MB'")
        # An empty temp directory turns DuckDB's spilling off: it fails with OutOfMemoryException instead.
        con.execute(f"SET temp_directory = '{temp_dir or ''}'")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        out = {name: labels.column(name) for name in labels.column_names}
        for src, names in zip(sources, names_of, strict=True):
            feat_t, feat_ok = _micros(src.table.column(src.event_time),
                                      f"feature table {src.name!r} event time {src.event_time!r}")
            match = _as_of(con, labels, label_t, label_ok, src, feat_t, feat_ok, hash_version)
            if src.max_age_s is not None:
                found = match >= 0
                age = label_t - feat_t[np.where(found, match, 0)]
                match = np.where(found & (age <= src.max_age_s * 1e6), match, -1)
            take = pa.array(np.where(match >= 0, match, 0), mask=match < 0)
            for name, col in zip(names, src.columns, strict=True):
                out[name] = src.table.column(col).take(take) if src.table.num_rows else \
                    pa.nulls(n, src.table.schema.field(col).type)
    finally:
        con.close()
    return pa.table(out)


def _as_of(con, labels: pa.Table, label_t, label_ok, src: ArrowSource, feat_t, feat_ok, hash_version: int):
    """Per label row, the row number of its feature row in ``src.table``, or -1."""
    import numpy as np
    import pyarrow as pa

    from lakeray.lakehouse.arrow_hash import row_hash

    n = labels.num_rows
    keys = [f"__k{i}" for i in range(len(src.entity_keys))]
    tie = row_hash(src.table, list(src.columns), hash_version) if src.table.num_rows else np.empty(0, np.int64)
    # Null times never match: they stay null here, and a null never compares in the ASOF condition.
    lab = pa.table({"__rid": np.arange(n, dtype=np.int64),
                    **{k: labels.column(c) for k, c in zip(keys, src.joins_on, strict=True)},
                    "__t": pa.array(label_t, mask=~label_ok)})
    feat = pa.table({"__fi": np.arange(src.table.num_rows, dtype=np.int64),
                     **{k: src.table.column(c) for k, c in zip(keys, src.entity_keys, strict=True)},
                     "__t": pa.array(feat_t, mask=~feat_ok), "__tie": tie})
    con.register("__lab", lab)
    con.register("__feat", feat)
    try:
        on = " AND ".join(f"l.{k} = f.{k}" for k in keys)
        pairs = con.sql(f"""
            WITH l AS (SELECT __rid, {', '.join(keys)}, {_LABEL_ORDER} AS __o FROM __lab),
                 f AS (SELECT __fi, {', '.join(keys)}, {_ORDER} AS __o FROM __feat)
            SELECT l.__rid, f.__fi FROM l ASOF JOIN f ON {on} AND l.__o >= f.__o""").to_arrow_table()
    finally:
        con.unregister("__lab")
        con.unregister("__feat")
    match = np.full(n, -1, np.int64)
    match[pairs.column("__rid").to_numpy()] = pairs.column("__fi").to_numpy()
    return match
