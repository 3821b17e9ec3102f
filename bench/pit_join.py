"""Benchmark: lakeray's point-in-time training set (engine auto → duckdb on one machine; and the Spark
engine) vs pandas ``merge_asof`` and DuckDB's bare ``ASOF JOIN``.

Data: ``--scale`` label rows over 100,000 entities, and 3 feature tables of as many rows each, with
random event times over 90 days. Every side answers the same question: for every label row and every
feature table, the latest feature row of the same entity at or before the label's time. Feature rows
are unique per (entity, time), so no tie-break rule (pandas: the last row; DuckDB: any; lakeray: the
larger row hash) can make the results differ.

Each side runs alone, one after the other, in this order (so none disturbs another):

1. pandas (baseline): a child process reads the parquet files and runs three ``merge_asof`` (by entity,
   sorted by time). ``baseline_s`` is its in-process time (after ``import pandas``), ``baseline_wall_s``
   the child's whole path (spawn to exit: interpreter, import, read, join), peak = the child's max RSS.
2. DuckDB bare ``ASOF JOIN`` (second baseline): a child process joins the 3 feature tables onto the
   labels over the same parquet files (``read_parquet`` in SQL, result fetched as Arrow, threads = all
   cores). Its row count and per-feature (non-null count, sum) must match pandas'.
3. lakeray cold: a fresh Python process imports lakeray and builds once with engine auto: interpreter
   start, imports, pinning + engine choice, Delta reads, join, content hash, Delta commit, manifest.
   ``candidate_cold_s`` is its wall time from before spawn to exit; peak = its max RSS.
4. lakeray steady state: ``build_training_set`` with engine auto in this process, twice; the ratio uses
   the second (the first is ``candidate_first_build_s``). No JVM starts when auto picks duckdb. Peak =
   the sampled peak of this process tree.
5. The Spark engine (``engine: spark``), in one session started only now, twice (``spark_s`` is the
   second, ``spark_cold_s`` the first; session start outside both). Peak = whole process tree (driver,
   JVM, Spark's Python workers). Stopped before the checks.
6. Checks (untimed): a pandas child writes its result, and lakeray's duckdb result and Spark result are
   each compared with it value by value (every row, sorted the same way, every column equal, NaN equal
   to NaN); the content hashes of every lakeray build (cold, steady, Spark) must be equal.
   ``results_agree`` false → exit 1.

Figures: ``ratio`` = lakeray steady ÷ pandas (target ≤ 1.0, the headline); ``duckdb_ratio`` = lakeray
steady ÷ DuckDB bare (target ≤ 1.5: the difference is pinning, hashing and the Delta commit);
``cold_ratio`` = lakeray cold whole path ÷ pandas' in-process seconds (target ≤ 1.5);
``cold_whole_path_ratio`` = lakeray cold whole path ÷ pandas' whole path (both pay an interpreter start
and their imports); ``spark_ratio`` = Spark engine steady ÷ pandas (reported, no target).

``--scale 50000000 --skip-pandas`` is the opt-in large case: one build on the engine auto picks (reported
as ``engine``) with its peak; no baselines; the Spark engine only with ``--spark``. Prints
``pit_join: ratio X (target 1.0)`` last and writes bench/results/pit_join.json (pit_join_<scale>.json
at other scales).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proctree import BUSY_SHARE, OtherLoad, tree_usage  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
TARGET = 1.0  # lakeray (auto engine) ÷ pandas merge_asof, steady state
DUCKDB_TARGET = 1.5  # lakeray ÷ DuckDB's bare ASOF JOIN
COLD_TARGET = 1.5  # lakeray fresh process, whole path ÷ pandas in-process
ENTITIES = 100_000
SPAN_S = 90 * 86_400
FEATURES = [f"f{i}" for i in range(3)]
RESULT_COLUMNS = ["entity_id", "event_time", "label", *FEATURES]


def generate(root: str, rows: int, seed: int, parquet: bool = True) -> None:
    """Parquet (for the baselines) and Delta (for lakeray) copies of the label and 3 feature tables."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    rng = np.random.default_rng(seed)
    start = np.datetime64("2026-01-01T00:00:00", "s")
    tables = {"labels": {"label": rng.integers(0, 2, rows, dtype=np.int32)}}
    for i, name in enumerate(FEATURES):
        tables[f"feat{i}"] = {name: rng.standard_normal(rows)}
    for name, cols in tables.items():
        entity, offset = rng.integers(0, ENTITIES, rows, dtype=np.int64), rng.integers(0, SPAN_S, rows)
        keep = slice(None)
        if name != "labels":  # one feature row per (entity, time): ties would make the sides differ
            keep = np.sort(np.unique(entity * SPAN_S + offset, return_index=True)[1])
        table = pa.table({"entity_id": entity[keep], "event_time": pa.array(start + offset[keep], pa.timestamp("us")),
                          **{k: v[keep] for k, v in cols.items()}})
        if parquet:
            pq.write_table(table, f"{root}/{name}.parquet")
        write_deltalake(f"{root}/lake/tables/{name}", table, mode="overwrite")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _emit(record: dict) -> None:
    """A child's last stdout line, read by the parent."""
    print(json.dumps(record), flush=True)


def pandas_baseline(root: str, save: bool = False) -> None:
    """Child process: three merge_asof. Prints seconds, peak RSS and per-feature (count, sum); with
    ``save`` writes the result for the value checks (a separate, untimed run)."""
    import pandas as pd

    started = time.perf_counter()
    out = pd.read_parquet(f"{root}/labels.parquet").sort_values("event_time", kind="stable")
    for i in range(len(FEATURES)):
        feats = pd.read_parquet(f"{root}/feat{i}.parquet").sort_values("event_time", kind="stable")
        out = pd.merge_asof(out, feats, on="event_time", by="entity_id", direction="backward",
                            allow_exact_matches=True)
    seconds = time.perf_counter() - started
    peak = _peak_rss_mib()
    stats = {f: [int(out[f].count()), float(out[f].sum())] for f in FEATURES}
    if save:
        out.to_parquet(f"{root}/pandas_result.parquet")
    _emit({"seconds": seconds, "peak_mib": peak, "rows": len(out), "stats": stats})


def duckdb_baseline(root: str) -> None:
    """Child process: DuckDB's bare ASOF JOIN of the 3 feature tables onto the labels, over the same
    parquet files, fetched as Arrow; all cores."""
    import duckdb
    import pyarrow.compute as pc

    started = time.perf_counter()
    con = duckdb.connect()
    con.execute(f"SET threads = {os.cpu_count() or 1}")
    joins = "\n".join(
        f"ASOF LEFT JOIN read_parquet('{root}/feat{i}.parquet') t{i} "
        f"ON l.entity_id = t{i}.entity_id AND l.event_time >= t{i}.event_time" for i in range(len(FEATURES)))
    picked = ", ".join(f"t{i}.{f}" for i, f in enumerate(FEATURES))
    out = con.sql(f"SELECT l.entity_id, l.event_time, l.label, {picked} "
                  f"FROM read_parquet('{root}/labels.parquet') l\n{joins}").to_arrow_table()
    seconds = time.perf_counter() - started
    peak = _peak_rss_mib()
    stats = {f: [int(pc.count(out[f]).as_py()), float(pc.sum(out[f]).as_py() or 0.0)] for f in FEATURES}
    con.close()
    _emit({"seconds": seconds, "peak_mib": peak, "rows": out.num_rows, "stats": stats,
           "threads": os.cpu_count()})


def settings_for(lake: str):
    from lakeray.config import load_settings

    return load_settings(REPO / "lakeray.yaml", "local", environ={
        "LAKERAY_STORAGE__ROOT": lake, "LAKERAY_SPARK__DRIVER_MEMORY": "8g"})


def spec_for(engine: str | None = None):
    from lakeray.features.training_sets import TrainingSetSpec

    return TrainingSetSpec.parse({
        "name": "pit_bench", "labels": "labels", "entity_keys": ["entity_id"], "event_time": "event_time",
        "features": [{"table": f"feat{i}", "columns": [f]} for i, f in enumerate(FEATURES)],
        **({"engine": engine} if engine else {})})


def lakeray_cold(lake: str, needs_spark: bool) -> None:
    """Child process: the whole path of a first build in a fresh process (the parent times spawn → exit).
    ``needs_spark`` (the parent's choose_engine said spark) starts a session first, as a user must."""
    from lakeray.features.training_sets import build_training_set

    settings = settings_for(lake)
    spark = None
    if needs_spark:
        from lakeray.lakehouse.spark import create_spark_session

        spark = create_spark_session(settings)
    started = time.perf_counter()
    result = build_training_set(spark, settings, spec_for())
    seconds = time.perf_counter() - started
    if spark is not None:
        spark.stop()
    _emit({"build_s": seconds, "peak_mib": _peak_rss_mib(), "engine": result.engine, "version": result.version,
           "content_hash": result.content_hash, "rows": result.rows})


def _child(call: str, what: str) -> tuple[dict, float]:
    """Run ``pit_join.<call>`` in a fresh interpreter; its last JSON line and its wall time (spawn to exit)."""
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); "
                            f"import pit_join; pit_join.{call}"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    lines = child.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {}), wall


def compare(pandas_path: Path, lakeray_path: str, version: int) -> tuple[bool, str]:
    """A lakeray result (one Delta version) and pandas', row by row: sorted by every column, each column
    equal (NaN equals NaN)."""
    import numpy as np
    import pandas as pd
    from deltalake import DeltaTable

    ours = DeltaTable(lakeray_path, version=version).to_pandas(columns=RESULT_COLUMNS)
    theirs = pd.read_parquet(pandas_path, columns=RESULT_COLUMNS)
    if len(ours) != len(theirs):
        return False, f"rows: lakeray {len(ours):,}, pandas {len(theirs):,}"
    ours, theirs = (df.sort_values(RESULT_COLUMNS, kind="stable", ignore_index=True) for df in (ours, theirs))
    for col in RESULT_COLUMNS:
        a, b = ours[col].to_numpy(), theirs[col].to_numpy()
        same = np.array_equal(a, b, equal_nan=True) if a.dtype.kind == "f" else np.array_equal(a, b)
        if not same:
            return False, f"column {col}: {int((a != b).sum()):,} values differ"
    return True, f"{len(ours):,} rows x {len(RESULT_COLUMNS)} columns identical"


def same_stats(a: dict, b: dict) -> bool:
    return a["rows"] == b["rows"] and all(
        a["stats"][f][0] == b["stats"][f][0] and math.isclose(a["stats"][f][1], b["stats"][f][1], rel_tol=1e-9,
                                                             abs_tol=1e-6) for f in FEATURES)


class TreePeak:
    """Peak summed RSS of this process and all its descendants (the Spark JVM and its Python workers),
    sampled every 0.2 s from /proc: per-process high-water marks would miss that they add up."""

    def __init__(self) -> None:
        import threading

        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_mib = max(self.peak_mib, tree_usage()[1] / 2**20)


def _status_mib(pid: int | str, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def jvm_peak_mib(spark) -> float:
    return _status_mib(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid(), "VmHWM")


def _timed_builds(spark, settings, spec, times: int) -> tuple[list[float], list, float]:
    """``times`` builds in this process: each one's seconds, results, and the process tree's peak."""
    from lakeray.features.training_sets import build_training_set

    seconds, results = [], []
    with TreePeak() as tree:
        for _ in range(times):
            started = time.perf_counter()
            results.append(build_training_set(spark, settings, spec))
            seconds.append(time.perf_counter() - started)
    return seconds, results, tree.peak_mib


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=5_000_000, help="label rows (= rows per feature table)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--skip-pandas", action="store_true",
                        help="candidate only, one build, no baselines (for scales pandas cannot hold)")
    parser.add_argument("--spark", action="store_true", help="with --skip-pandas: also build on the Spark engine")
    parser.add_argument("--out", default=None, help="default bench/results/pit_join.json at the default scale, "
                        "else pit_join_<scale>.json")
    args = parser.parse_args()
    default_out = REPO / "bench/results/pit_join.json"
    args.out = args.out or str(default_out if args.scale == 5_000_000 else
                               default_out.with_name(f"pit_join_{args.scale}.json"))
    baselines = not args.skip_pandas
    run_spark = baselines or args.spark

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="lakeray-pit-") as tmp:
        lake = f"{tmp}/lake"
        Path(lake).mkdir()
        # In a child, so this process's own memory (in the peaks below) holds none of the generated data.
        _, gen_s = _child(f"generate({tmp!r}, {args.scale}, {args.seed}, parquet={baselines})", "generate")
        print(f"generated {args.scale:,} label rows + 3 x {args.scale:,} feature rows in {gen_s:.1f} s", flush=True)

        other_load = OtherLoad()
        pandas = duck = cold = None
        if baselines:
            pandas, pandas_wall = _child(f"pandas_baseline({tmp!r})", "pandas baseline")
            pandas["wall_s"] = pandas_wall
            print(f"pandas merge_asof: {pandas['seconds']:.2f} s (child wall {pandas_wall:.2f} s), "
                  f"peak {pandas['peak_mib']:.0f} MiB", flush=True)
            duck, duck_wall = _child(f"duckdb_baseline({tmp!r})", "duckdb baseline")
            duck["wall_s"] = duck_wall
            print(f"duckdb ASOF JOIN: {duck['seconds']:.2f} s (child wall {duck_wall:.2f} s), "
                  f"peak {duck['peak_mib']:.0f} MiB, {duck['threads']} threads", flush=True)

        from lakeray.features.training_sets import choose_engine

        settings = settings_for(lake)
        engine, engine_reason = choose_engine(settings, spec_for())
        print(f"engine auto: {engine} ({engine_reason})", flush=True)

        if baselines:
            cold, cold_wall = _child(f"lakeray_cold({lake!r}, needs_spark={engine == 'spark'})", "lakeray cold build")
            cold["wall_s"] = cold_wall
            print(f"lakeray cold (fresh process, whole path): {cold_wall:.2f} s (build {cold['build_s']:.2f} s), "
                  f"peak {cold['peak_mib']:.0f} MiB, engine {cold['engine']}", flush=True)

        spark = None
        if engine == "spark" or run_spark:
            from lakeray.lakehouse.spark import create_spark_session
        if engine == "spark":
            spark = create_spark_session(settings)
        rss_before = _status_mib(os.getpid(), "VmRSS")
        auto_s, auto_results, auto_peak = _timed_builds(spark, settings, spec_for(), 2 if baselines else 1)
        if spark is not None:
            auto_peak = max(auto_peak, jvm_peak_mib(spark) + _status_mib(os.getpid(), "VmRSS"))
        cand_s, auto_result = auto_s[-1], auto_results[-1]
        builds = f"first build {auto_s[0]:.2f} s, steady {cand_s:.2f} s" if len(auto_s) > 1 else f"{cand_s:.2f} s"
        print(f"lakeray auto ({auto_result.engine}): {builds}, "
              f"peak (process tree) {auto_peak:.0f} MiB (this process held {rss_before:.0f} MiB before), "
              f"{auto_result.rows:,} rows", flush=True)

        spark_s = spark_results = spark_peak = None
        if run_spark:
            if spark is None:
                spark = create_spark_session(settings)
            spark_s, spark_results, spark_peak = _timed_builds(spark, settings, spec_for("spark"),
                                                               2 if baselines else 1)
            spark_peak = max(spark_peak, jvm_peak_mib(spark) + _status_mib(os.getpid(), "VmRSS"))
            builds = f"first build {spark_s[0]:.2f} s, steady {spark_s[-1]:.2f} s" if len(spark_s) > 1 else \
                f"{spark_s[0]:.2f} s"
            print(f"lakeray spark engine: {builds}, "
                  f"peak {spark_peak:.0f} MiB", flush=True)
        if spark is not None:
            spark.stop()
        other_share = other_load.share()

        checks: dict[str, str] = {}
        agree = True
        built = [("auto", auto_result)] + ([("spark", spark_results[-1])] if spark_results else [])
        hashes = {name: r.content_hash for name, r in built}
        if cold:
            hashes["cold"] = cold["content_hash"]
        if len(set(hashes.values())) != 1:
            agree = False
        checks["content_hashes"] = ("equal: " if agree else "DIFFER: ") + ", ".join(
            f"{k} {v}" for k, v in hashes.items())
        if baselines:
            reference, _ = _child(f"pandas_baseline({tmp!r}, save=True)", "pandas reference")
            path = settings.table_path("pit_bench")
            for name, result in built:
                ok, detail = compare(Path(tmp, "pandas_result.parquet"), path, result.version)
                agree &= ok
                checks[f"{name} ({result.engine}) vs pandas"] = detail
            duck_ok = same_stats(duck, reference)
            checks["duckdb bare vs pandas"] = ("rows and per-feature (count, sum) equal" if duck_ok else
                                               f"DIFFER: duckdb {duck['stats']} vs pandas {reference['stats']}")
            agree &= duck_ok
        for name, detail in checks.items():
            print(f"check {name}: {detail}", flush=True)

    base_s = pandas["seconds"] if pandas else None
    ratio = cand_s / base_s if base_s else None
    duckdb_ratio = cand_s / duck["seconds"] if duck else None
    cold_ratio = cold["wall_s"] / base_s if cold else None
    cold_whole = cold["wall_s"] / pandas["wall_s"] if cold else None
    spark_ratio = spark_s[-1] / base_s if spark_s and base_s else None
    # Without a pandas run (the large opt-in case), its peak is extrapolated linearly from the measured
    # default-scale run (its frames are a few columns per row: memory grows with rows).
    extrapolated = None
    if pandas is None and default_out.is_file():
        measured = json.loads(default_out.read_text())
        if measured.get("baseline_peak_mib"):
            extrapolated = round(measured["baseline_peak_mib"] * args.scale / measured["params"]["label_rows"])
    out = {
        "name": "pit_join",
        "ratio": _r(ratio),
        "target": TARGET,
        "candidate_s": round(cand_s, 2),
        "baseline_s": _r(base_s, 2),
        "engine": auto_result.engine,
        "engine_reason": engine_reason,
        "candidate_first_build_s": round(auto_s[0], 2),
        "duckdb_ratio": _r(duckdb_ratio),
        "duckdb_target": DUCKDB_TARGET,
        "duckdb_baseline_s": _r(duck and duck["seconds"], 2),
        "cold_ratio": _r(cold_ratio),
        "cold_target": COLD_TARGET,
        "candidate_cold_s": _r(cold and cold["wall_s"], 2),
        "candidate_cold_build_s": _r(cold and cold["build_s"], 2),
        "cold_whole_path_ratio": _r(cold_whole),
        "baseline_wall_s": _r(pandas and pandas["wall_s"], 2),
        "spark_ratio": _r(spark_ratio),
        "spark_s": _r(spark_s and spark_s[-1], 2),
        "spark_cold_s": _r(spark_s and spark_s[0], 2),
        "candidate_peak_mib": round(auto_peak),
        "candidate_cold_peak_mib": round(cold["peak_mib"]) if cold else None,
        "baseline_peak_mib": round(pandas["peak_mib"]) if pandas else None,
        "duckdb_baseline_peak_mib": round(duck["peak_mib"]) if duck else None,
        "spark_peak_mib": round(spark_peak) if spark_peak else None,
        "memory_ratio": _r(cold["peak_mib"] / pandas["peak_mib"]) if cold else None,
        "results_agree": agree,
        "results_check": checks,
        "baseline_peak_mib_extrapolated": extrapolated,
        "params": {"label_rows": args.scale, "feature_tables": 3, "rows_per_feature_table": args.scale,
                   "feature_rows_note": "drawn, then (entity, time) duplicates dropped", "entities": ENTITIES,
                   "spark_master": "local[*]", "duckdb_baseline_threads": duck["threads"] if duck else None,
                   "candidate_includes": "pinning + engine choice, Delta reads, join, content hash, Delta commit, "
                   "manifest; second build in the process (the first is candidate_first_build_s)",
                   "cold_includes": "fresh interpreter: start, imports, one build, exit (child wall time)",
                   "memory_ratio": "lakeray cold child's max RSS / pandas child's max RSS"},
        "machine": {"cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") *
                                                                 os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "other_processes_cpu_share": other_share, "busy": other_share > BUSY_SHARE},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if other_share > BUSY_SHARE:
        print(f"WARNING: other processes used {other_share:.0%} of the machine's CPU during the run: "
              "re-run on an idle machine before trusting the figures")
    if not agree:
        print("results DISAGREE: " + "; ".join(f"{k}: {v}" for k, v in checks.items()))
        return 1
    if ratio is None:
        print(f"pit_join: candidate only at {args.scale:,} rows on {auto_result.engine}: {cand_s:.1f} s, "
              f"peak {auto_peak:.0f} MiB" + (f" (pandas extrapolated: {extrapolated} MiB)" if extrapolated else "")
              + (f"; spark engine {spark_s[-1]:.1f} s, peak {spark_peak:.0f} MiB" if spark_s else ""))
        return 0
    for key, value, target in [("duckdb_ratio", duckdb_ratio, DUCKDB_TARGET), ("cold_ratio", cold_ratio, COLD_TARGET),
                               ("ratio", ratio, TARGET)]:
        if value > target:
            print(f"MISSED: {key} {value:.2f} is above the target {target}")
    print(f"pit_join: ratio {ratio:.2f} (target {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
