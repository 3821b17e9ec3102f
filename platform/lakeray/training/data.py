"""Delta → training arrays: each worker reads its share of one pinned table version, without a JVM.

Rows are split into train/test by a hash of an id column, so the split is the same on every worker,
in every run, at every cluster size: the held-out AUC compares like with like across runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

__all__ = ["TableSlice", "shard_files", "holdout_mask", "to_matrix", "read_slice"]


@dataclass(frozen=True)
class TableSlice:
    """Which rows of which table version a worker trains on."""

    path: str
    version: int
    files: list[str] | None  # None: every file, then rows are sliced by rank
    rank: int
    world: int


def shard_files(files: list[str], world: int) -> list[list[str]] | None:
    """Round-robin files over ``world`` workers; None when there are too few files to give each one."""
    if len(files) < world:
        return None
    return [files[rank::world] for rank in range(world)]


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


def read_slice(sl: TableSlice, columns: list[str]) -> pa.Table:
    """The rows of ``sl`` (a file shard, or a row slice of the whole version when files are few)."""
    from lakeray.lakehouse.delta import read_arrow

    if sl.files is not None:
        return read_arrow(sl.path, sl.version, columns=columns, files=sl.files)
    table = read_arrow(sl.path, sl.version, columns=columns)
    per = -(-table.num_rows // sl.world)
    return table.slice(sl.rank * per, per)
