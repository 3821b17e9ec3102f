"""Delta → training arrays: each worker reads its share of one pinned table version, without a JVM.

Rows are split into train/test by a hash of an id column, so the split is the same on every worker,
in every run, at every cluster size: the held-out AUC compares like with like across runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from lakeray.training.spec import TrainPlan

__all__ = ["holdout_mask", "to_matrix", "WorkerData", "encode",
           "validation_mask", "labels", "load_split", "iter_split", "iter_validation", "plan_columns"]


def holdout_mask(ids: np.ndarray, test_fraction: float) -> np.ndarray:
    """True for held-out rows: a multiplicative hash of the id, so any id scheme splits evenly."""
    import numpy as np

    mixed = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return mixed < np.uint64(int(test_fraction * (1 << 24)))


def to_matrix(table: pa.Table, columns: list[str]) -> np.ndarray:
    """Float32 feature matrix (nulls → NaN, which XGBoost treats as missing)."""
    import numpy as np

    out = np.empty((table.num_rows, len(columns)), dtype=np.float32)
    for j, name in enumerate(columns):
        out[:, j] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return out


@dataclass
class WorkerData:
    """One worker's rows, encoded: float32 features (categories as codes, missing as NaN), 0/1 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    feature_types: list[str]  # "q" numeric, "c" categorical (XGBoost's names)


def encode(table: pa.Table, plan: TrainPlan) -> np.ndarray:
    """The plan's features as a float32 matrix: numbers as they are, strings/booleans as the index of
    their value in the plan's vocabulary (unseen values and nulls → NaN, XGBoost's missing)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types as pat

    out = np.empty((table.num_rows, len(plan.features)), dtype=np.float32)
    for j, name in enumerate(plan.features):
        col = table.column(name)
        if name in plan.categorical:
            if pat.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            if pat.is_boolean(col.type):
                col = pc.cast(col, "string")
            codes = pc.index_in(col, value_set=pa.array(plan.categorical[name], type=pa.string()))
            out[:, j] = codes.to_numpy(zero_copy_only=False).astype(np.float32)  # nulls come out as NaN
        else:
            out[:, j] = col.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return out


def validation_mask(table: pa.Table, plan: TrainPlan) -> np.ndarray:
    """True for the held-out rows: the same rows on every worker, in every run, at any cluster size."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.types as pat

    col = table.column(plan.split_column)
    if plan.split_kind == "hash":
        return holdout_mask(col.to_numpy(zero_copy_only=False), plan.split_fraction or 0.2)
    if pat.is_date(col.type):
        col = pc.cast(col, "timestamp[us]")
    micros = pc.cast(pc.cast(col, "timestamp[us]"), "int64").to_numpy(zero_copy_only=False)
    return np.nan_to_num(micros.astype(np.float64), nan=-np.inf) >= plan.split_cutoff_us


def labels(table: pa.Table, plan: TrainPlan) -> np.ndarray:
    import numpy as np

    return table.column(plan.label).to_numpy(zero_copy_only=False).astype(np.float32)


def plan_columns(plan: TrainPlan) -> list[str]:
    return list(dict.fromkeys([plan.split_column, plan.label, *plan.features]))


def load_split(plan: TrainPlan, rank: int, world: int, shards: list[list[str]] | None = None) -> WorkerData:
    """This worker's share of the pinned version, read by the worker itself (never through the driver)."""
    from lakeray.training.ingest import read_shard

    table = read_shard(plan.path, plan.version, plan_columns(plan), rank, world, shards)
    held = validation_mask(table, plan)
    x, y = encode(table, plan), labels(table, plan)
    types = ["c" if f in plan.categorical else "q" for f in plan.features]
    return WorkerData(x[~held], y[~held], x[held], y[held], types)


def iter_split(plan: TrainPlan, rank: int, world: int, shards: list[list[str]] | None,
               held_out: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This worker's training (or held-out) rows, encoded, one data file at a time: the streamed
    ingest for shards that would not fit in memory as a whole (``plan.extra["stream"]``)."""
    from lakeray.training.ingest import iter_shard

    for table in iter_shard(plan.path, plan.version, plan_columns(plan), rank, world, shards):
        mask = validation_mask(table, plan)
        if not held_out:
            mask = ~mask
        if mask.any():
            yield encode(table, plan)[mask], labels(table, plan)[mask]


def iter_validation(plan: TrainPlan, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The held-out rows batch by batch (driver-side evaluation: memory is one batch plus what is kept)."""
    from lakeray.lakehouse.delta import iter_batches

    import pyarrow as pa

    for batch in iter_batches(plan.path, plan.version, columns=columns or plan_columns(plan)):
        table = pa.Table.from_batches([batch])
        yield table.filter(pa.array(validation_mask(table, plan)))
