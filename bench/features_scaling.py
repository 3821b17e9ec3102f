"""Benchmark: how a lakeray feature run scales from ``--small`` to ``--large`` input events (10x by default).

Method (one process, one Spark session on the shipped ``local`` profile):
  1. Inputs: ``--small`` and ``--large`` card transactions from lakeray's own generator
     (``lakeray.features.synthetic.generate_transactions``, Spark-side and partition-independent), each
     committed as the ``transactions`` Delta table of its own temporary storage root, as the demo does.
     Not timed (10M rows take about a minute on an idle 2-core machine, so there is no need for a
     numpy/delta-rs shortcut that would also have to reproduce the generator's values).
  2. Warm-up: one small (``--warmup-rows``) run in a root of its own, so neither size pays JVM cold start.
  3. Runs: ``run_feature_job`` of the example job ``customer_aggregates`` (pinned read, per-customer windows,
     expectations on the persisted output, one Delta commit) on the small input, the large input, and
     the small input again. Ratio = time(large) / fastest time(small); the fixed cost of a run (history
     lookups, planning) makes the small run relatively expensive, the window sorts' n·log n and any
     spilling of the persisted output make the large one more so. Linear would be large/small = 10.
  4. The runner's helpers are timed while it runs (see features_write.py) to show which phase scales worse.
  5. Sanity: every run commits exactly as many rows as its input has, and every expectation passes.

Peak memory: the Spark JVM's VmHWM from /proc, reset before each run (never below what the JVM held when
the run began), plus the Python driver's peak RSS. JVM CPU seconds are recorded next to wall seconds:
on a shared machine they are the figure that other work disturbs least.

Prints ``features_scaling: ratio X.XX (target 12)`` last and writes bench/results/features_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proctree import BUSY_SHARE, OtherLoad  # noqa: E402  (bench/ is not a package)
from features_write import (  # noqa: E402  (bench/ is not a package)
    REPO,
    add_common_args,
    bench_settings,
    finish,
    instrument_runner,
    jvm_cpu_s,
    jvm_pid,
    load1,
    machine,
    peak_mib,
    python_peak_mib,
    reset_peak,
    run_candidate,
    write_transactions,
)

TARGET = 12.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1_000_000, help="input transactions of the small run")
    parser.add_argument("--large", type=int, default=10_000_000, help="input transactions of the large run")
    parser.add_argument("--small-repeats", type=int, default=2, help="small runs (one before, the rest after "
                        "the large one); the fastest counts")
    add_common_args(parser)
    parser.add_argument("--out", default=str(REPO / "bench/results/features_scaling.json"))
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    load_start = load1()
    other_load = OtherLoad()
    bench_started = time.perf_counter()

    from lakeray.lakehouse.spark import create_spark_session

    with tempfile.TemporaryDirectory(prefix="lakeray-fs-") as tmp:
        sizes = {"small": args.small, "large": args.large}
        roots = {name: bench_settings(f"{tmp}/{name}", args.driver_memory) for name in sizes}
        warm = bench_settings(f"{tmp}/warm", args.driver_memory)
        spark = create_spark_session(roots["small"])
        pid = jvm_pid(spark)
        try:
            started = time.perf_counter()
            write_transactions(spark, warm, args.warmup_rows, args.seed)
            run_candidate(spark, warm)
            warmup_s = time.perf_counter() - started
            print(f"warm-up ({args.warmup_rows:,} rows): {warmup_s:.1f} s, load {load_start}", flush=True)
            generate_s = {}
            for name, rows in sizes.items():
                _, generate_s[name] = write_transactions(spark, roots[name], rows, args.seed)
                print(f"generated {rows:,} transactions for the {name} run in {generate_s[name]:.1f} s", flush=True)

            timer = instrument_runner()
            order = ["small", "large"] + ["small"] * max(0, args.small_repeats - 1)
            runs: dict[str, list[dict]] = {"small": [], "large": []}
            for name in order:
                load_before = load1()
                reset_peak(pid)
                cpu_before = jvm_cpu_s(pid)
                record = run_candidate(spark, roots[name], timer)
                record.update(jvm_cpu_s=round(jvm_cpu_s(pid) - cpu_before, 1), load_1m_before=load_before,
                              jvm_peak_mib=round(peak_mib(pid)), input_rows=sizes[name])
                runs[name].append(record)
                print(f"{name:<6} {sizes[name]:>12,} rows {record['seconds']:8.2f} s  JVM CPU {record['jvm_cpu_s']:7.1f} s"
                      f"  JVM peak {record['jvm_peak_mib']} MiB  load {load_before}", flush=True)
            timer.restore()
        finally:
            spark.stop()

    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}
    small_s, large_s = best["small"]["seconds"], best["large"]["seconds"]
    ratio = large_s / small_s
    cpu = {name: min(r["jvm_cpu_s"] for r in rs) for name, rs in runs.items()}
    rows_ok = all(r["rows"] == r["input_rows"] for rs in runs.values() for r in rs)
    checks_ok = all(all(r["expectations"].values()) for rs in runs.values() for r in rs)
    load_end = load1()
    other_share = other_load.share()
    busy = other_share > BUSY_SHARE
    settings = roots["small"]
    result = {
        "name": "features_scaling",
        "ratio": round(ratio, 3),
        "target": TARGET,
        "size_ratio": round(args.large / args.small, 3),
        "small_s": round(small_s, 2),
        "large_s": round(large_s, 2),
        "cpu_s": {"small": cpu["small"], "large": cpu["large"]},
        "cpu_ratio": round(cpu["large"] / cpu["small"], 3) if cpu["small"] else None,
        "throughput_rows_per_s": {"small": round(args.small / small_s), "large": round(args.large / large_s)},
        "phases_s": {name: best[name].get("phases_s") for name in best},
        "runs": {name: [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "phases_s"}
                        for r in rs] for name, rs in runs.items()},
        "peak_mib": {"small_jvm": min(r["jvm_peak_mib"] for r in runs["small"]),
                     "large_jvm": runs["large"][0]["jvm_peak_mib"], "python_driver": round(python_peak_mib())},
        "rows_ok": rows_ok,
        "expectations_ok": checks_ok,
        "params": {"small": args.small, "large": args.large, "small_repeats": args.small_repeats,
                   "warmup_rows": args.warmup_rows, "seed": args.seed, "job": "customer_aggregates",
                   "spark_master": settings.profile.spark.master, "driver_memory": settings.profile.spark.driver_memory,
                   "shuffle_partitions": settings.profile.spark.shuffle_partitions,
                   "generate_s": {k: round(v, 1) for k, v in generate_s.items()}, "warmup_s": round(warmup_s, 1)},
        "machine": dict(machine(), load_avg_1m_at_start=load_start, load_avg_1m_at_end=load_end,
                        other_processes_cpu_share=other_share, busy=busy),
        "wall_s": round(time.perf_counter() - bench_started, 1),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'':<8}{'rows':>12}{'seconds':>10}{'JVM CPU s':>11}{'rows/s':>10}{'JVM peak MiB':>14}")
    for name in ("small", "large"):
        print(f"{name:<8}{sizes[name]:>12,}{best[name]['seconds']:>10.2f}{cpu[name]:>11.1f}"
              f"{result['throughput_rows_per_s'][name]:>10,}{result['peak_mib'][name + '_jvm']:>14}")
    for name in ("small", "large"):
        phases = best[name].get("phases_s") or {}
        print(f"{name} phases (exclusive s): " + ", ".join(f"{k} {v}" for k, v in phases.items() if v >= 0.05))
    print(f"written: {args.out}")
    failed = []
    if not rows_ok:
        failed.append("row check FAILED: " + ", ".join(f"{r['input_rows']} in, {r['rows']} committed"
                                                       for rs in runs.values() for r in rs))
    if not checks_ok:
        failed.append("expectations FAILED: " + str([r["expectations"] for rs in runs.values() for r in rs]))
    return finish("features_scaling", ratio, TARGET, failed, other_share)


if __name__ == "__main__":
    sys.exit(main())
