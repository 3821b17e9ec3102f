"""Benchmark: rows/s delivered to a training worker by lakeray's ingest vs a plain pyarrow read.

Method (one process, both sides on the same files in the same run):
  1. Write a deterministic table (rows × float32 features + int64 id + int32 label) with delta-rs,
     one commit per equal slice, so the pinned version has ``--files`` files.
  2. Baseline: ``pyarrow.dataset.dataset(files).to_table(columns)`` over the version's file URIs (no
     Delta log, no partition values, no deletion vectors: the floor for reading those bytes).
  3. Candidate: ``read_shard`` as a worker calls it (opens the pinned version's log, plans, reads):
     world = 1 (``ratio``), and world = 2 with the two ranks' times summed plus the driver's
     ``table_shards`` plan (``world2_ratio``: the extra work of splitting, on one machine).
  4. Deletion vectors (``dv_ratio``, skip with ``--no-dv``): Spark enables deletion vectors on a copy
     of the table and deletes 1% of the rows; lakeray's read (masks applied) vs the plain pyarrow read
     of the same files (which still holds the deleted rows). Spark's start and DELETE are not timed.
Each timing is the fastest of ``--repeat`` interleaved runs (the machine is shared and noisy). Values
are checked, not only counts: every column's sum must agree with the baseline's (exit 1 if not).

Prints ``ingest: ratio X.XX (target 1.5)`` last and writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine, make_table  # noqa: E402  (bench/ is not a package)
from proctree import BUSY_SHARE, OtherLoad  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5




def sums(table) -> dict[str, float]:
    import pyarrow.compute as pc

    return {name: float(pc.sum(table.column(name).cast("float64")).as_py() or 0.0) for name in table.column_names}


def agree(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])) for k in a)


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return min(times), out




def add_deletion_vectors(source: str, target: str, every: int) -> int:
    """A copy of ``source`` with deletion vectors on and every ``every``-th id deleted (Spark)."""
    from lakeray.config import load_settings
    from lakeray.lakehouse.spark import create_spark_session

    shutil.copytree(source, target)
    settings = load_settings(REPO / "lakeray.yaml", "local", environ={
        "LAKERAY_STORAGE__ROOT": os.path.dirname(target), "LAKERAY_SPARK__DRIVER_MEMORY": "2g"})
    spark = create_spark_session(settings)
    try:
        spark.sql(f"ALTER TABLE delta.`{target}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
        spark.sql(f"DELETE FROM delta.`{target}` WHERE id % {every} = 0")
    finally:
        spark.stop()
    from deltalake import DeltaTable

    return DeltaTable(target).version()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-dv", action="store_true", help="skip the deletion-vector figure (needs Spark)")
    parser.add_argument("--out", default=str(REPO / "bench/results/ingest.json"))
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    other_load = OtherLoad()

    import pyarrow as pa
    import pyarrow.dataset as ds

    from lakeray.training.ingest import read_shard, table_shards

    with tempfile.TemporaryDirectory(prefix="lakeray-bench-ingest-") as root:
        path = os.path.join(root, "bench_ingest")
        version = make_table(path, args.rows, args.features, args.files, args.seed)
        from deltalake import DeltaTable

        files = list(DeltaTable(path).file_uris())
        columns = ["row_id", "label", *[f"f{j:02d}" for j in range(args.features)]]
        print(f"table bench_ingest@{version}: {args.rows} rows x {len(columns)} columns, {len(files)} files", flush=True)

        def baseline(file_list=files):
            return ds.dataset(file_list, format="parquet").to_table(columns=columns)

        def world1(table_path=path, table_version=version):
            return read_shard(table_path, table_version, columns, 0, 1)

        def world2(table_path=path, table_version=version):
            shards = table_shards(table_path, table_version, 2)
            return [read_shard(table_path, table_version, columns, rank, 2, shards) for rank in range(2)]

        baseline(), world1()  # warm the page cache and imports for both sides alike
        times = {"baseline": [], "world1": [], "world2": []}
        outs = {}
        for _ in range(args.repeat):  # interleaved: a noisy spell hits both sides
            for name, fn in (("baseline", baseline), ("world1", world1), ("world2", world2)):
                t, outs[name] = best(fn, 1)
                times[name].append(t)
        base_s, w1_s, w2_s = (min(times[k]) for k in ("baseline", "world1", "world2"))
        base_sums = sums(outs["baseline"])
        ok = agree(sums(outs["world1"]), base_sums)
        w2_parts = outs["world2"]
        w2_sums = [sums(p) for p in w2_parts]
        ok &= agree({k: sum(s[k] for s in w2_sums) for k in base_sums}, base_sums)
        ok &= sum(p.num_rows for p in w2_parts) == outs["baseline"].num_rows == args.rows

        dv = {}
        if not args.no_dv:
            every = 100
            dv_path = os.path.join(root, "bench_ingest_dv")
            dv_version = add_deletion_vectors(path, dv_path, every)
            dv_files = list(DeltaTable(dv_path).file_uris())
            dv_times = {"baseline": [], "candidate": []}
            for _ in range(args.repeat):
                t, dv_base = best(lambda: baseline(dv_files), 1)
                dv_times["baseline"].append(t)
                t, dv_out = best(lambda: world1(dv_path, dv_version), 1)
                dv_times["candidate"].append(t)
            kept = dv_base.filter(pa.array(dv_base.column("row_id").to_numpy() % every != 0))
            ok &= dv_out.num_rows == kept.num_rows == args.rows - (args.rows + every - 1) // every
            ok &= agree(sums(dv_out), sums(kept))
            dv_base_s, dv_cand_s = min(dv_times["baseline"]), min(dv_times["candidate"])
            dv = {"dv_ratio": round(dv_cand_s / dv_base_s, 3), "dv_candidate_s": round(dv_cand_s, 4),
                  "dv_baseline_s": round(dv_base_s, 4), "dv_deleted_rows": args.rows - dv_out.num_rows,
                  "dv_files": len(dv_files)}

    ratio = w1_s / base_s
    other_share = other_load.share()
    result = {
        "name": "ingest",
        "ratio": round(ratio, 3),
        "target": TARGET,
        "candidate_s": round(w1_s, 4),
        "baseline_s": round(base_s, 4),
        "world2_ratio": round(w2_s / base_s, 3),
        "world2_summed_s": round(w2_s, 4),
        "candidate_rows_per_s": round(args.rows / w1_s),
        "baseline_rows_per_s": round(args.rows / base_s),
        **dv,
        "values_agree": bool(ok),
        "params": {"rows": args.rows, "features": args.features, "columns": len(columns), "files": len(files),
                   "repeat": args.repeat, "timing": "fastest of the interleaved repeats",
                   "dv": "skipped" if args.no_dv else "1% of rows deleted through deletion vectors (Spark)"},
        "machine": dict(machine(), load_avg_1m_at_start=round(load_start, 2),
                        other_processes_cpu_share=round(other_share, 3)),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("params", "machine")}, indent=1))
    print(f"written: {args.out}")
    if other_share > BUSY_SHARE:
        print(f"WARNING: other processes used {other_share:.0%} of the machine's CPU during the run")
    if not ok:
        print("FAILED: lakeray's rows do not agree with the plain pyarrow read", file=sys.stderr)
        return 1
    if ratio > TARGET:
        print(f"MISSED: ratio {ratio:.2f} is above the target {TARGET}")
    print(f"ingest: ratio {ratio:.2f} (target {TARGET})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
