"""Point-in-time join in Spark: each label row gets, per feature table, the latest feature row whose
event time is at or before the label's event time (and within a max age), never one from after it.

One pass per group of tables sharing entity keys: label rows and feature rows are unioned, ordered by
(keys, event time, feature-before-label), and ``last(struct, ignorenulls)`` over a running window
carries the newest feature row forward to each label row. Feature values travel inside a struct so a
feature whose *value* is null still counts as the latest row (``ignorenulls`` on the bare column
would skip it and leak an older value). Equal timestamps: a feature row at exactly the label's time
is visible (``<=``); among feature rows with the same key and time, a hash of the row breaks the tie
so rebuilds are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakeray.errors import DataQualityError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["FeatureSource", "point_in_time_join", "content_hash"]

_KIND_FEATURE, _KIND_LABEL = 0, 1


@dataclass(frozen=True)
class FeatureSource:
    """One feature table's rows for the join, already read at a pinned version."""

    name: str
    df: DataFrame
    entity_keys: tuple[str, ...]
    event_time: str
    columns: tuple[str, ...]
    max_age_s: float | None = None


def _check(name: str, df: DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataQualityError(f"{what} {name!r} has no column(s) {missing} (has: {', '.join(df.columns)})",
                               "fix the training-set spec; nothing was written")


def point_in_time_join(labels: DataFrame, label_keys: list[str], label_time: str,
                       sources: list[FeatureSource]) -> DataFrame:
    """``labels`` with one column per requested feature, each as of the label row's event time."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    _check("labels", labels, [*label_keys, label_time], "the labels/events table")
    out_names: dict[tuple[str, str], str] = {}
    taken = set(labels.columns)
    for src in sources:
        _check(src.name, src.df, [*src.entity_keys, src.event_time, *src.columns], "feature table")
        if len(src.entity_keys) != len(label_keys):
            raise DataQualityError(f"feature table {src.name!r} has keys {list(src.entity_keys)}, the labels "
                                   f"{label_keys}", "give the feature ref entity_keys that match the labels")
        for col in src.columns:
            name = col if col not in taken else f"{src.name}__{col}"
            if name in taken:
                raise DataQualityError(f"feature column {col!r} of {src.name!r} collides with another column",
                                       "request it once, or rename it in the feature job")
            taken.add(name)
            out_names[(src.name, col)] = name

    keys = [f"__k{i}" for i in range(len(label_keys))]
    result = labels
    # Tables with the same key columns share one window pass.
    groups: dict[tuple[str, ...], list[FeatureSource]] = {}
    for src in sources:
        groups.setdefault(src.entity_keys, []).append(src)
    label_cols = labels.columns
    for group in groups.values():
        base = result.select(*[F.col(k).alias(a) for k, a in zip(label_keys, keys, strict=True)],
                             F.col(label_time).cast("timestamp").alias("__ts"),
                             F.lit(_KIND_LABEL).alias("__kind"), F.lit(0).cast("long").alias("__tie"),
                             F.struct(*[F.col(c) for c in result.columns]).alias("__label"))
        parts = [base]
        for i, src in enumerate(group):
            ts = F.col(src.event_time).cast("timestamp")
            payload = F.struct(ts.alias("ts"), *[F.col(c) for c in src.columns])
            parts.append(src.df.select(*[F.col(k).alias(a) for k, a in zip(src.entity_keys, keys, strict=True)],
                                       ts.alias("__ts"), F.lit(_KIND_FEATURE).alias("__kind"),
                                       F.xxhash64(*[F.col(c) for c in src.columns]).alias("__tie"),
                                       payload.alias(f"__f{i}")))
        unioned = parts[0]
        for part in parts[1:]:
            unioned = unioned.unionByName(part, allowMissingColumns=True)
        window = (Window.partitionBy(*keys).orderBy("__ts", "__kind", "__tie")
                  .rowsBetween(Window.unboundedPreceding, Window.currentRow))
        carried = unioned.select("__kind", "__ts", "__label", *[
            F.last(f"__f{i}", ignorenulls=True).over(window).alias(f"__f{i}") for i in range(len(group))])
        labelled = carried.where(F.col("__kind") == _KIND_LABEL)
        selected = [F.col(f"__label.{c}").alias(c) for c in label_cols]
        for i, src in enumerate(group):
            fresh = F.col(f"__f{i}").isNotNull()
            if src.max_age_s is not None:
                age = F.col("__ts").cast("double") - F.col(f"__f{i}.ts").cast("double")
                fresh = fresh & (age <= F.lit(float(src.max_age_s)))
            for col in src.columns:
                selected.append(F.when(fresh, F.col(f"__f{i}.{col}")).alias(out_names[(src.name, col)]))
        result = labelled.select(*selected)
        label_cols = result.columns
    return result


def content_hash(df: DataFrame) -> str:
    """Order-independent hash of every row and column, with the row count in front."""
    from pyspark.sql import functions as F

    cols = [F.col(c) for c in sorted(df.columns)]
    # Two independent 64-bit row hashes, summed as exact decimals: order-independent, no overflow.
    first = F.xxhash64(*cols).cast("decimal(38,0)")
    second = F.xxhash64(F.lit("lakeray"), *cols).cast("decimal(38,0)")
    stats = df.agg(F.count(F.lit(1)).alias("n"), F.sum(first).alias("a"), F.sum(second).alias("b")).first()
    return f"{stats['n']}-{stats['a'] or 0}-{stats['b'] or 0}"
