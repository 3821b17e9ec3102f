"""What several benchmarks share: the machine's description and a learnable synthetic Delta table.

bench/ is not a package: scripts import this as ``from benchlib import ...`` (their folder is on
sys.path when run as ``python bench/<name>.py``).
"""

from __future__ import annotations

import os
import platform

__all__ = ["machine", "make_table"]


def machine() -> dict:
    """Cores, memory and Python of this machine (every result JSON carries it)."""
    with open("/proc/meminfo", encoding="utf-8") as fh:
        mem_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal"))
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "python": platform.python_version()}


def make_table(path: str, rows: int, features: int, files: int, seed: int) -> int:
    """``row_id``, a learnable binary ``label`` and ``f00``.. float32 features as a Delta table of
    ``files`` equal files (one delta-rs commit each: a single commit splits files by bytes, unevenly);
    returns the version."""
    import numpy as np
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    # A few main effects, an interaction and a non-linearity, plus the Bernoulli draw's noise:
    # held-out AUC ≈ 0.8, far enough from 1.0 that a worse model shows.
    logit = 1.2 * x[:, 0] - 0.8 * x[:, 1] + 0.9 * x[:, 2] * x[:, 3] + 0.6 * np.abs(x[:, 4]) - 1.0
    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int32)
    columns = {"row_id": np.arange(rows, dtype=np.int64), "label": label}
    columns.update({f"f{j:02d}": x[:, j] for j in range(features)})
    table = pa.table(columns)
    per = -(-rows // files)
    for i in range(files):
        # A huge target size keeps each commit to exactly one file.
        write_deltalake(path, table.slice(i * per, per), mode="overwrite" if i == 0 else "append",
                        target_file_size=1 << 40)
    return DeltaTable(path).version()
