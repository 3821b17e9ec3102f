"""Benchmark: a lakeray feature run (pinned read, job, expectations, one Delta commit) vs plain parquet.

Method (one process, one Spark session, both sides on the same machine in the same run):
  1. Input: ``--rows`` card transactions from lakeray's own generator
     (``lakeray.features.synthetic.generate_transactions``), committed to the ``transactions`` Delta table of
     a temporary storage root exactly as the demo does (``write_table``). Not timed.
  2. Warm-up: the JVM runs one small (``--warmup-rows``) round of every side first, in a root of its own,
     so no side pays class loading, code generation or Delta's first-use costs.
  3. Three sides, each reading the same pinned ``transactions`` version and computing the example job
     ``jobs/features/customer_aggregates.py`` (per-customer windows over the past 1/7/30 days):
     - baseline: the job's DataFrame written with ``df.write.mode("overwrite").parquet(...)``, no checks;
     - raw Delta: the same DataFrame written with ``df.write.format("delta")`` (no runner), so a reader sees
       how much of the overhead is the table format and how much is the runner;
     - candidate: ``lakeray.features.runner.run_feature_job`` (discover the job, pin and read the input,
       schema guard, persist the output, evaluate the job's 5 expectations, one Delta commit with lineage
       metadata, committed row count from the Delta log, run ledger).
     Rounds alternate the order of the sides (``--repeats``, default 1 because one round at 5M rows takes
     minutes on 2 cores); each side's fastest round counts.
  4. Where the candidate's time goes: the runner's helpers (``evaluate``, ``write_table``, ``table_version``,
     ...) are wrapped with timers while it runs (behaviour unchanged; they are looked up at call time), and
     the exclusive seconds of each are recorded. ``--breakdown`` adds a step-by-step replay of the runner
     (job compute alone into Spark's ``noop`` sink, persist, each expectation, the write from the cache).
  5. Sanity: the committed rows, the parquet rows and the raw Delta rows all equal the input rows, and
     checksums of a few feature columns agree between the parquet and the committed Delta table.

Peak memory: the Spark JVM's VmHWM from /proc (reset through /proc/<pid>/clear_refs before each side, so a
side's figure is its own peak, though never below what the JVM already held when it began) plus the
Python driver's peak RSS. The machine is shared: the 1-minute load average is recorded before each side, and the
share of CPU that processes outside the benchmark used during the run (a warning above 10%).

Prints ``features_write: ratio X.XX (target 1.3)`` last and writes bench/results/features_write.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from proctree import BUSY_SHARE, OtherLoad, stat_fields  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.3
JOB = "customer_aggregates"
SOURCE = "transactions"
CHECKSUM_COLUMNS = ["cust_txn_count_30d", "cust_amount_sum_7d", "cust_amount_max_30d", "seconds_since_prev_txn"]


# ---- set-up shared with features_scaling.py ---------------------------------------------------------------

def bench_settings(root: str, driver_memory: str | None = None):
    """The shipped ``local`` profile on a temporary storage root (the caller's LAKERAY_* are ignored)."""
    from lakeray.config import load_settings

    environ = {"LAKERAY_STORAGE__ROOT": root}
    if driver_memory:
        environ["LAKERAY_SPARK__DRIVER_MEMORY"] = driver_memory
    return load_settings(REPO / "lakeray.yaml", "local", environ=environ)


def write_transactions(spark, settings, rows: int, seed: int) -> tuple[int, float]:
    """``rows`` synthetic transactions committed as the demo does; returns (version, seconds)."""
    from lakeray.features.synthetic import generate_transactions
    from lakeray.lakehouse.delta import write_table

    started = time.perf_counter()
    version = write_table(generate_transactions(spark, rows, seed), settings.table_path(SOURCE))
    return version, time.perf_counter() - started


def jvm_pid(spark) -> int:
    return int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())


def _status_kib(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); silently a no-op where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib(pid: int) -> float:
    """The JVM's peak RSS since the last reset."""
    return _status_kib(pid, "VmHWM") / 1024


def python_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jvm_cpu_s(pid: int) -> float:
    """User + system CPU seconds the JVM has used so far (robust to other work on the machine)."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options both feature benchmarks take."""
    parser.add_argument("--warmup-rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--driver-memory", default=None, help="override the profile's spark.driver_memory")


def machine() -> dict:
    import platform

    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "python": platform.python_version()}


def sums_agree(a: dict, b: dict) -> bool:
    """Same keys, and values equal up to float summation order."""
    return a.keys() == b.keys() and all(
        (a[k] is None and b[k] is None) or (a[k] is not None and b[k] is not None
                                             and math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-6))
        for k in a)


class PhaseTimer:
    """Exclusive wall seconds per wrapped function (nested calls are charged to the callee only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[float] = []  # time spent in callees, per open frame
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, label: str | None = None) -> None:
        original = getattr(owner, attr)
        label = label or attr

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                inner = self._stack.pop()
                if self._stack:
                    self._stack[-1] += elapsed
                self.seconds[label] = self.seconds.get(label, 0.0) + elapsed - inner
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def restore(self) -> None:
        while self._undo:
            owner, attr, original = self._undo.pop()
            setattr(owner, attr, original)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument_runner() -> PhaseTimer:
    """Timers around the helpers ``run_feature_job`` calls (it imports them at call time)."""
    import lakeray.features.runner as runner
    import lakeray.lakehouse.delta as delta
    import lakeray.lakehouse.quality as quality

    from pyspark.sql.classic.dataframe import DataFrame

    timer = PhaseTimer()
    for attr in ("table_version", "read_table", "table_exists", "write_table"):
        timer.wrap(delta, attr)
    timer.wrap(quality, "evaluate", "evaluate (job compute + cache fill + checks)")
    timer.wrap(runner, "_call", "job call (plan build)")
    for attr in ("discover_jobs", "check_schema", "_committed_rows", "_record"):
        timer.wrap(runner, attr)
    for attr in ("persist", "unpersist"):
        timer.wrap(DataFrame, attr)
    return timer


def run_candidate(spark, settings, timer: PhaseTimer | None = None) -> dict:
    """One ``run_feature_job``; seconds, rows and (when timed) the exclusive seconds per helper."""
    from lakeray.features.runner import run_feature_job

    if timer:
        timer.reset()
    started = time.perf_counter()
    result = run_feature_job(spark, settings, JOB)
    seconds = time.perf_counter() - started
    out = {"seconds": seconds, "rows": result.rows, "version": result.version,
           "expectations": {e["name"]: e["passed"] for e in result.expectations}}
    if timer:
        phases = {k: round(v, 3) for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
        phases["other"] = round(seconds - sum(timer.seconds.values()), 3)
        out["phases_s"] = phases
    return out


# ---- the two non-runner sides -----------------------------------------------------------------------------

def job_output(spark, settings, version: int):
    """The job's output DataFrame on ``transactions@version``, without the runner."""
    from lakeray.features.runner import discover_jobs

    job = discover_jobs(settings)[JOB]
    source = spark.read.format("delta").option("versionAsOf", version).load(settings.table_path(SOURCE))
    return job.fn(source)


def run_parquet(spark, settings, version: int, path: str) -> float:
    started = time.perf_counter()
    job_output(spark, settings, version).write.mode("overwrite").parquet(path)
    return time.perf_counter() - started


def run_raw_delta(spark, settings, version: int, path: str) -> float:
    started = time.perf_counter()
    job_output(spark, settings, version).write.format("delta").mode("overwrite").save(path)
    return time.perf_counter() - started


def checksums(df) -> dict:
    from pyspark.sql import functions as F

    aggs = [F.count(F.lit(1)).alias("rows")]
    aggs += [F.sum(c).alias(c) for c in CHECKSUM_COLUMNS]
    aggs += [F.sum(F.col(c).isNull().cast("long")).alias(f"{c}_nulls") for c in CHECKSUM_COLUMNS]
    return {k: (float(v) if v is not None else None) for k, v in df.agg(*aggs).first().asDict().items()}


def breakdown(spark, settings, version: int, scratch: str) -> dict:
    """Replay the runner's steps one by one with timers (one extra job computation + one cache build)."""
    from pyspark import StorageLevel

    from lakeray.features.runner import discover_jobs
    from lakeray.lakehouse.delta import table_version, write_table
    from lakeray.lakehouse.quality import evaluate

    job = discover_jobs(settings)[JOB]
    pid = jvm_pid(spark)
    steps: dict[str, float] = {}
    cpu: dict[str, float] = {}
    cache: dict[str, int] = {}

    def step(name, fn):
        started, cpu_before = time.perf_counter(), jvm_cpu_s(pid)
        value = fn()
        steps[name] = round(time.perf_counter() - started, 2)
        cpu[name] = round(jvm_cpu_s(pid) - cpu_before, 1)
        return value

    written = f"{scratch}/from_cache"
    step("job compute only (noop sink)", lambda: job_output(spark, settings, version).write.format("noop")
         .mode("overwrite").save())
    out = job_output(spark, settings, version)
    step("persist (planning only)", functools.partial(out.persist, StorageLevel.MEMORY_AND_DISK))
    try:
        step("job compute + cache fill (count)", out.count)
        storage = [(info.memSize(), info.diskSize()) for info in spark.sparkContext._jsc.sc().getRDDStorageInfo()]
        cache.update(memory=round(sum(m for m, _ in storage) / 2**20), disk=round(sum(d for _, d in storage) / 2**20))
        for e in job.expectations:
            step(f"expectation {e.name} (on the cache)", functools.partial(evaluate, out, [e]))
        step("all expectations together (on the cache)", functools.partial(evaluate, out, job.expectations))
        step("Delta write from the cache", functools.partial(write_table, out, written, user_metadata="{}"))
        step("table_version (history(1))", functools.partial(table_version, spark, written))
    finally:
        out.unpersist(blocking=True)
    # The alternative order (write the files first, check them, then commit): the checks' cost on the
    # freshly written files, read back with only the columns the expectations name.
    step("all expectations on the written Delta files", functools.partial(
        evaluate, spark.read.format("delta").load(written), job.expectations))
    return {"wall_s": steps, "jvm_cpu_s": cpu, "cache_mib": cache}


# ---- main -------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="input transactions")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three sides (min counts)")
    add_common_args(parser)
    parser.add_argument("--breakdown", action="store_true", help="also replay the runner step by step")
    parser.add_argument("--out", default=str(REPO / "bench/results/features_write.json"))
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    load_start = load1()
    other_load = OtherLoad()
    bench_started = time.perf_counter()

    from lakeray.lakehouse.spark import create_spark_session

    with tempfile.TemporaryDirectory(prefix="lakeray-fw-") as tmp:
        warm = bench_settings(f"{tmp}/warm", args.driver_memory)
        settings = bench_settings(f"{tmp}/lake", args.driver_memory)
        started = time.perf_counter()
        spark = create_spark_session(settings)
        pid = jvm_pid(spark)
        print(f"spark up in {time.perf_counter() - started:.1f} s (JVM pid {pid}), load {load_start}", flush=True)
        try:
            # Warm-up: every side once on a small table in a root of its own.
            started = time.perf_counter()
            warm_version, _ = write_transactions(spark, warm, args.warmup_rows, args.seed)
            run_parquet(spark, warm, warm_version, f"{tmp}/warm/parquet")
            run_raw_delta(spark, warm, warm_version, f"{tmp}/warm/raw_delta")
            run_candidate(spark, warm)
            warmup_s = time.perf_counter() - started
            print(f"warm-up ({args.warmup_rows:,} rows, all sides): {warmup_s:.1f} s", flush=True)

            version, gen_s = write_transactions(spark, settings, args.rows, args.seed)
            print(f"generated {args.rows:,} transactions ({SOURCE}@{version}) in {gen_s:.1f} s", flush=True)

            timer = instrument_runner()
            parquet_path, raw_path = f"{tmp}/out/parquet", f"{tmp}/out/raw_delta"
            sides = {"baseline": lambda: {"seconds": run_parquet(spark, settings, version, parquet_path)},
                     "raw_delta": lambda: {"seconds": run_raw_delta(spark, settings, version, raw_path)},
                     "candidate": lambda: run_candidate(spark, settings, timer)}
            runs: dict[str, list[dict]] = {name: [] for name in sides}
            for r in range(args.repeats):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for name in order:
                    load_before = load1()
                    reset_peak(pid)
                    cpu_before = jvm_cpu_s(pid)
                    record = sides[name]()
                    record.update(round=r, jvm_cpu_s=jvm_cpu_s(pid) - cpu_before, load_1m_before=load_before,
                                  jvm_peak_mib=round(peak_mib(pid)))
                    runs[name].append(record)
                    print(f"round {r} {name:<10} {record['seconds']:8.2f} s  JVM CPU {record['jvm_cpu_s']:7.1f} s  "
                          f"JVM peak {record['jvm_peak_mib']} MiB  load {load_before}", flush=True)
            timer.restore()

            best = {name: min(rs, key=lambda x: x["seconds"]) for name, rs in runs.items()}
            from lakeray.lakehouse.delta import read_table

            committed = read_table(spark, settings.table_path(JOB), best["candidate"]["version"])
            sums = {"candidate": checksums(committed),
                    "baseline": checksums(spark.read.parquet(parquet_path)),
                    "raw_delta": checksums(spark.read.format("delta").load(raw_path))}
            steps = breakdown(spark, settings, version, f"{tmp}/scratch") if args.breakdown else None
            jvm_peak_total = peak_mib(pid)  # since the last reset; the per-side figures are the useful ones
            jvm_peak_overall = max([r["jvm_peak_mib"] for rs in runs.values() for r in rs] + [jvm_peak_total])
        finally:
            spark.stop()

    cand, base, raw = (best[k]["seconds"] for k in ("candidate", "baseline", "raw_delta"))
    ratio = cand / base
    cpu = {k: min(r["jvm_cpu_s"] for r in rs) for k, rs in runs.items()}
    rows_ok = {"candidate": best["candidate"]["rows"] == args.rows,
               **{k: int(v["rows"]) == args.rows for k, v in sums.items()}}
    agree = sums_agree(sums["candidate"], sums["baseline"]) and sums_agree(sums["candidate"], sums["raw_delta"])
    load_end = load1()
    other_share = other_load.share()
    busy = other_share > BUSY_SHARE
    result = {
        "name": "features_write",
        "ratio": round(ratio, 3),
        "target": TARGET,
        "candidate_s": round(cand, 2),
        "baseline_s": round(base, 2),
        "raw_delta_s": round(raw, 2),
        "raw_delta_ratio": round(raw / base, 3),
        "runner_over_raw_delta_ratio": round(cand / raw, 3),
        "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "cpu_ratio": round(cpu["candidate"] / cpu["baseline"], 3),
        "candidate_phases_s": best["candidate"].get("phases_s"),
        "breakdown_s": steps,
        "runs": {k: [{kk: (round(vv, 2) if isinstance(vv, float) else vv) for kk, vv in r.items()
                      if kk != "phases_s"} for r in rs] for k, rs in runs.items()},
        "peak_mib": {"candidate_jvm": min(r["jvm_peak_mib"] for r in runs["candidate"]),
                     "baseline_jvm": min(r["jvm_peak_mib"] for r in runs["baseline"]),
                     "raw_delta_jvm": min(r["jvm_peak_mib"] for r in runs["raw_delta"]),
                     "jvm_overall": round(jvm_peak_overall), "python_driver": round(python_peak_mib())},
        "rows_ok": rows_ok,
        "checksums_agree": agree,
        "checksums": sums,
        "expectations": best["candidate"]["expectations"],
        "params": {"rows": args.rows, "repeats": args.repeats, "warmup_rows": args.warmup_rows, "seed": args.seed,
                   "job": JOB, "spark_master": settings.profile.spark.master,
                   "driver_memory": settings.profile.spark.driver_memory,
                   "shuffle_partitions": settings.profile.spark.shuffle_partitions,
                   "generate_s": round(gen_s, 1), "warmup_s": round(warmup_s, 1)},
        "machine": dict(machine(), load_avg_1m_at_start=load_start, load_avg_1m_at_end=load_end,
                        other_processes_cpu_share=other_share, busy=busy),
        "wall_s": round(time.perf_counter() - bench_started, 1),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'':<12}{'seconds':>10}{'x parquet':>11}{'JVM CPU s':>11}{'x parquet':>11}{'JVM peak MiB':>14}")
    for name, seconds in (("baseline", base), ("raw delta", raw), ("candidate", cand)):
        key = name.replace(" ", "_")
        print(f"{name:<12}{seconds:>10.2f}{seconds / base:>11.2f}{cpu[key]:>11.1f}{cpu[key] / cpu['baseline']:>11.2f}"
              f"{result['peak_mib'][key + '_jvm']:>14}")
    if result["candidate_phases_s"]:
        print("candidate phases (exclusive s): " + ", ".join(f"{k} {v}" for k, v in
                                                              result["candidate_phases_s"].items()))
    if steps:
        print("breakdown (wall s / JVM CPU s): " + ", ".join(f"{k} {v} / {steps['jvm_cpu_s'][k]}"
                                                             for k, v in steps["wall_s"].items()))
        print(f"cache size (MiB): {steps['cache_mib']}")
    print(f"written: {args.out}")
    failed = []
    if not all(rows_ok.values()):
        failed.append(f"row check FAILED: expected {args.rows} rows everywhere, got "
                      f"candidate {best['candidate']['rows']}, " + ", ".join(f"{k} {int(v['rows'])}"
                                                                             for k, v in sums.items()))
    if not agree:
        failed.append(f"checksum check FAILED: {sums}")
    if not all(best["candidate"]["expectations"].values()):
        failed.append(f"expectations FAILED: {best['candidate']['expectations']}")
    return finish("features_write", ratio, TARGET, failed, other_share)


def finish(name: str, ratio: float, target: float, failed: list[str], other_share: float) -> int:
    """The closing lines every feature benchmark prints; its exit status (1 when a sanity check failed)."""
    for line in failed:
        print(line)
    if other_share > BUSY_SHARE:
        print(f"WARNING: other processes used {other_share:.0%} of the machine's CPU during the run: "
              "re-run on an idle machine before trusting the figures")
    if ratio > target:
        print(f"MISSED: ratio {ratio:.2f} is above the target {target}")
    print(f"{name}: ratio {ratio:.2f} (target {target})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
