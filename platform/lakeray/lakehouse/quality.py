"""Expectations on a DataFrame, evaluated before a commit: the quality gate of a feature job.

An ``error`` expectation that fails stops the write (nothing is committed, the table stays at its
previous version); a ``warn`` one is reported with the run and the write goes on. Checks that can be
answered by one aggregation (nulls, ranges, row count, freshness) share a single pass over the data;
uniqueness needs a pass of its own over the keys' hashes (sorted in the driver, or shuffled in Spark for
very large outputs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lakeray.errors import DataQualityError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["Expectation", "ExpectationResult", "expect", "evaluate", "raise_on_errors"]

Kind = Literal["not_null", "unique", "between", "row_count", "freshness"]


class Expectation(BaseModel):
    """One declared check. Build them with the ``expect`` helpers rather than by hand."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    columns: list[str] = Field(default_factory=list, description="Columns the check is about.")
    min: float | None = Field(None, description="Lower bound (between, row_count), inclusive.")
    max: float | None = Field(None, description="Upper bound (between, row_count), inclusive.")
    max_age_s: float | None = Field(None, gt=0, description="freshness: newest event at most this old.")
    severity: Literal["error", "warn"] = "error"

    @model_validator(mode="after")
    def _complete(self) -> Expectation:
        if self.kind in ("not_null", "unique", "between", "freshness") and not self.columns:
            raise ValueError(f"{self.kind} needs at least one column")
        if self.kind in ("between", "row_count") and self.min is None and self.max is None:
            raise ValueError(f"{self.kind} needs min or max")
        if self.kind == "freshness" and (self.max_age_s is None or len(self.columns) != 1):
            raise ValueError("freshness needs one timestamp column and max_age_s")
        return self

    @property
    def name(self) -> str:
        bounds = "" if self.min is None and self.max is None else f"[{self.min}, {self.max}]"
        age = f"<= {self.max_age_s:g}s" if self.max_age_s else ""
        return f"{self.kind}({', '.join(self.columns)}){bounds}{age}"


class _Expect:
    """``expect.not_null("a")``, ``expect.unique("id")``, ``expect.between("x", 0, 1, severity="warn")``…"""

    @staticmethod
    def not_null(*columns: str, severity: str = "error") -> Expectation:
        return Expectation(kind="not_null", columns=list(columns), severity=severity)

    @staticmethod
    def unique(*columns: str, severity: str = "error") -> Expectation:
        return Expectation(kind="unique", columns=list(columns), severity=severity)

    @staticmethod
    def between(column: str, min: float | None = None, max: float | None = None, severity: str = "error"
                ) -> Expectation:
        return Expectation(kind="between", columns=[column], min=min, max=max, severity=severity)

    @staticmethod
    def row_count(min: int | None = None, max: int | None = None, severity: str = "error") -> Expectation:
        return Expectation(kind="row_count", min=min, max=max, severity=severity)

    @staticmethod
    def fresh(column: str, max_age_s: float, severity: str = "error") -> Expectation:
        return Expectation(kind="freshness", columns=[column], max_age_s=max_age_s, severity=severity)


expect = _Expect()


class ExpectationResult(BaseModel):
    name: str
    severity: str
    passed: bool
    failing_rows: int = 0
    detail: str = ""
    examples: list[dict[str, Any]] = Field(default_factory=list)


def _violation(e: Expectation):
    """A boolean Column that is true on a row breaking ``e`` (row-level kinds only)."""
    from functools import reduce

    from pyspark.sql import functions as F

    if e.kind == "not_null":
        return reduce(lambda a, b: a | b, [F.col(c).isNull() for c in e.columns])
    col = F.col(e.columns[0])
    checks = []
    if e.min is not None:
        checks.append(col < F.lit(e.min))
    if e.max is not None:
        checks.append(col > F.lit(e.max))
    return reduce(lambda a, b: a | b, checks)


# Up to this many rows, ``unique`` sorts the rows' 64-bit key hashes in the driver; above it, Spark
# groups by the hash. At 5M rows the driver sort took 0.6 s and the group-by's shuffle 3.1 s (2 cores).
# Driver memory at the limit: 160 MB of Arrow results (under Spark's default 1 GiB
# spark.driver.maxResultSize), held in the JVM and then in Python, plus one 160 MB numpy copy sorted in place.
UNIQUE_ON_DRIVER_MAX_ROWS = 20_000_000


def _hashes_repeat(df: DataFrame, columns: list[str], rows: int, driver_max_rows: int) -> bool:
    """Whether two rows share the 64-bit hash of ``columns``: False proves the keys distinct."""
    from pyspark.sql import functions as F

    hashed = df.select(F.xxhash64(*columns).alias("__h"))
    if rows > driver_max_rows:
        return hashed.groupBy("__h").count().where("count > 1").limit(1).count() > 0
    import numpy as np

    chunks = hashed.toArrow().column(0).chunks
    values = np.concatenate([c.to_numpy() for c in chunks]) if chunks else np.empty(0, np.int64)  # a writable copy
    del chunks  # the Arrow buffers go before the sort
    values.sort()
    return bool(np.any(values[1:] == values[:-1]))


def evaluate(df: DataFrame, expectations: list[Expectation], now_epoch_s: float | None = None,
             examples: int = 3, unique_on_driver_max_rows: int = UNIQUE_ON_DRIVER_MAX_ROWS
             ) -> list[ExpectationResult]:
    """Evaluate every expectation on ``df`` (cache it first when it is expensive to recompute).

    ``unique_on_driver_max_rows``: outputs up to this size check ``unique`` by sorting key hashes in
    the driver; larger ones shuffle them in Spark (bounded driver memory, slower).
    """
    import time

    from pyspark.sql import functions as F

    missing = sorted({c for e in expectations for c in e.columns} - set(df.columns))
    if missing:
        raise DataQualityError(f"expectations name column(s) {missing} that the output does not have",
                               "fix the expectation or the job's output; nothing was written")
    now = time.time() if now_epoch_s is None else now_epoch_s
    aggs = [F.count(F.lit(1)).alias("__rows")]
    for i, e in enumerate(expectations):
        if e.kind in ("not_null", "between"):
            aggs.append(F.sum(F.when(_violation(e), 1).otherwise(0)).alias(f"__e{i}"))
        elif e.kind == "freshness":
            aggs.append(F.max(F.col(e.columns[0]).cast("double")).alias(f"__e{i}"))
    stats = df.agg(*aggs).first().asDict()
    rows = stats["__rows"]
    results = []
    for i, e in enumerate(expectations):
        sample: list[dict[str, Any]] = []
        if e.kind in ("not_null", "between"):
            failing = int(stats[f"__e{i}"] or 0)
            detail = f"{failing} of {rows} rows"
            if failing:
                sample = [r.asDict() for r in df.where(_violation(e)).limit(examples).collect()]
        elif e.kind == "unique":
            # Distinct 64-bit row hashes prove distinct keys, and one long is cheaper to move than the key
            # columns; only when some hash repeats (a duplicate, or a collision) does the exact group-by
            # on the columns themselves count and show them.
            dupes = df.groupBy(*e.columns).count().where("count > 1")
            failing = 0 if not _hashes_repeat(df, e.columns, rows, unique_on_driver_max_rows) else \
                int(dupes.agg(F.coalesce(F.sum("count"), F.lit(0))).first()[0])
            detail = f"{failing} rows share a key with another row"
            if failing:
                sample = [r.asDict() for r in dupes.orderBy(F.desc("count")).limit(examples).collect()]
        elif e.kind == "row_count":
            ok = (e.min is None or rows >= e.min) and (e.max is None or rows <= e.max)
            failing = 0 if ok else rows
            detail = f"{rows} rows, expected [{e.min}, {e.max}]"
        else:  # freshness
            newest = stats[f"__e{i}"]
            age = None if newest is None else now - float(newest)
            failing = 0 if age is not None and age <= e.max_age_s else rows
            detail = "no rows" if age is None else f"newest row is {age:.0f} s old"
        results.append(ExpectationResult(name=e.name, severity=e.severity, passed=failing == 0,
                                         failing_rows=failing, detail=detail,
                                         examples=[{k: str(v) for k, v in r.items()} for r in sample]))
    return results


def raise_on_errors(table: str, results: list[ExpectationResult]) -> None:
    """DataQualityError listing every failed ``error`` expectation, with counts and example rows."""
    failed = [r for r in results if not r.passed and r.severity == "error"]
    if not failed:
        return
    lines = "; ".join(f"{r.name}: {r.detail}" + (f" e.g. {r.examples[0]}" if r.examples else "") for r in failed)
    raise DataQualityError(f"{table}: {len(failed)} expectation(s) failed, nothing was committed: {lines}",
                           "fix the job or its input, or relax the expectation (severity='warn')")
