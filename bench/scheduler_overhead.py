"""Benchmark: the scheduler's delay from due time to job start, and the Dagster processes' memory.

Method (docs/scheduling.md, "Measured here"; candidate and baseline in the same run):
  1. A throwaway project: a ``so_events`` Delta table and a chain of two feature jobs, ``so_totals`` →
     ``so_top``, every minute. Each job function appends ``time.time()`` to a marks file ("the job's
     function called": Spark up, inputs pinned), read the same way on both sides.
  2. Baseline: the chain run directly in one fresh process (``lakeray features run``'s body for each job:
     one interpreter and one JVM, as a scheduled run has), before and after the scheduled intervals; once
     as the two ``lakeray features run`` calls a user types (two JVMs), reported, not in the ratio.
  3. Candidate: ``lakeray scheduler start``, then ``--intervals`` due times. Per interval, from Dagster's
     run storage and the Delta histories: due → run created, → launched (RUN_STARTING), → run worker
     started (RUN_START: worker process up, code location loaded), → first job's function called, → last
     commit, → run ended. ``lakeray scheduler stop`` afterwards (and in ``finally``, on Ctrl-C or SIGTERM).
  4. Memory every 0.5 s from /proc: resident sets summed over the daemon's and the webserver's process
     groups, idle (before the first due time) and the peak during runs; the run worker and its JVM.
  5. Result check: one run and one commit per table per interval, and the committed rows equal the direct
     runs' (content hash of the sorted rows).

``ratio`` = due → last commit / direct process start → last commit (target ≤ 2.0: the scheduler adds at
most one direct run's time); ``scheduler_part`` = due → run worker started / the direct run;
``start_overhead_s`` = (due → first job called) − (direct process start → first job called). Medians
skip intervals queued behind a previous run (one run at a time) when there are others.

Prints ``scheduler_overhead: ratio X.XX (target 2.0)`` last and writes bench/results/scheduler_overhead.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import machine  # noqa: E402  (bench/ is not a package)
from proctree import BUSY_SHARE, OtherLoad, stat_fields  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
TARGET = 2.0
TABLES = ("so_totals", "so_top")
SCHEDULE = "so_totals_schedule"
# The profile of tests/spark/test_scheduler_soak.py: one local core for Spark, a small driver.
PROFILE = ('profiles:\n  local:\n    spark: {master: "local[1]", driver_memory: 512m, shuffle_partitions: 1}\n'
           '    storage: {root: lakehouse}\n')
JOBS = '''
import json, os, time
from lakeray.features import feature_job

MARKS = {marks!r}


def _mark(job):
    # The benchmark's clock for "the job's function called": both the scheduled and the direct run
    # write here, so the two start times are read the same way.
    with open(MARKS, "a") as fh:
        fh.write(json.dumps({{"job": job, "t": time.time(), "pid": os.getpid()}}) + "\\n")


@feature_job(name="so_totals", inputs=["so_events"], entity_keys=["user_id"], schedule="* * * * *")
def so_totals(so_events):
    _mark("so_totals")
    return so_events.groupBy("user_id").agg({{"amount": "sum", "*": "count"}}) \\
        .withColumnRenamed("sum(amount)", "total").withColumnRenamed("count(1)", "n")


@feature_job(name="so_top", inputs=["so_totals"], entity_keys=["user_id"])
def so_top(so_totals):
    _mark("so_top")
    return so_totals.where("total > 0").selectExpr("user_id", "total", "n", "total / n as mean")
'''
# The direct run: `lakeray features run`'s body, once per job of the chain, in one process and session.
DIRECT = """
import sys
from lakeray.config import load_settings
from lakeray.features.runner import run_feature_job
from lakeray.lakehouse.spark import spark_session
settings = load_settings("lakeray.yaml", "local")
with spark_session(settings) as spark:
    for name in sys.argv[1:]:
        print(name, run_feature_job(spark, settings, name).version, flush=True)
"""


def _procs() -> dict[int, tuple[int, int, int]]:
    """pid → (parent pid, process group, resident bytes) of every process."""
    page, seen = os.sysconf("SC_PAGE_SIZE"), {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = stat_fields(entry)
                if fields[0] != "Z":
                    seen[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[21]) * page)
            except (OSError, ValueError, IndexError):  # exited meanwhile
                continue
    return seen


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _group_cpu_s(pgid: int) -> float:
    """CPU seconds of a process group's live members, including the children they reaped (run workers)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid, (_, group, _) in _procs().items():
        if group == pgid:
            try:
                total += sum(int(v) for v in stat_fields(pid)[11:15]) / tick
            except (OSError, ValueError):
                pass
    return total


class MemorySampler(threading.Thread):
    """Every 0.5 s: the daemon group's and webserver group's resident sets, and — while a run worker lives
    (a Python child of the daemon group's code server) — the worker's and its JVM's."""

    def __init__(self, daemon_pid: int, webserver_pid: int):
        super().__init__(daemon=True)
        self.pids, self.stop_event, self.samples = (daemon_pid, webserver_pid), threading.Event(), []

    def run(self) -> None:
        daemon, web = self.pids
        while not self.stop_event.wait(0.5):
            procs = _procs()
            members = {pid: v for pid, v in procs.items() if v[1] == daemon}
            # The program's name, not its path: the JVM's jspawnhelper children live under .../java-17-.../lib.
            java = {pid for pid in members if os.path.basename(_cmdline(pid).split(" ", 1)[0]) == "java"}
            # A child the JVM is spawning shares its memory until it execs, and /proc shows it as java with
            # the JVM's resident set: not a JVM of its own, not counted twice.
            clones = {pid for pid in java if members[pid][0] in java}
            java -= clones
            members = {pid: v for pid, v in members.items() if pid not in clones}
            # The worker is the JVM's parent (pyspark starts the JVM); its code server is the worker's parent.
            # The largest of each: a finishing run's worker can overlap the next one's for a moment.
            workers = {members[j][0] for j in java if members[j][0] in members}
            self.samples.append({
                "t": time.time(),
                "daemon_group": sum(v[2] for v in members.values()),
                "webserver_group": sum(v[2] for pid, v in procs.items() if v[1] == web),
                "worker": max((members[p][2] for p in workers), default=0),
                "worker_jvm": max((members[j][2] for j in java), default=0),
                "workers": len(workers), "running": bool(java)})


def _mib(values: list[int]) -> float | None:
    return round(max(values) / 2**20, 1) if values else None


def _content_hash(path: Path, version: int) -> str:
    from deltalake import DeltaTable

    frame = DeltaTable(str(path), version=version).to_pandas()
    frame = frame[sorted(frame.columns)].sort_values("user_id").reset_index(drop=True)
    return hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()[:16]


def _commits(path: Path) -> list[dict]:
    """(version, commit time in s, interval or None) of a table, oldest first."""
    from deltalake import DeltaTable

    out = []
    for commit in DeltaTable(str(path)).history():
        meta = json.loads(commit["userMetadata"]) if commit.get("userMetadata") else {}
        out.append({"version": commit["version"], "t": commit["timestamp"] / 1000, "interval": meta.get("interval")})
    return sorted(out, key=lambda c: c["version"])


def _marks(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


class Bench:
    """The temp project, its child processes, and the scheduler it started (stopped in ``close``)."""

    def __init__(self, base: Path):
        self.base, self.project = base, base / "project"
        self.marks = base / "marks.jsonl"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LAKERAY_")}
        self.lakeray = str(Path(sys.executable).parent / "lakeray")
        self.children: list[subprocess.Popen] = []
        self.scheduler_started = False

    def setup(self, rows: int) -> None:
        import numpy as np
        import pandas as pd
        from deltalake import write_deltalake

        (self.project / "jobs" / "features").mkdir(parents=True)
        (self.project / "lakeray.yaml").write_text(PROFILE)
        (self.project / "jobs" / "features" / "so_jobs.py").write_text(JOBS.format(marks=str(self.marks)))
        rng = np.random.default_rng(16)
        # Whole-number amounts: sums are exact, so both sides' rows compare equal value by value.
        events = pd.DataFrame({"user_id": rng.integers(0, 1000, rows), "amount": rng.integers(-100, 101, rows)})
        for root in ("lakehouse", "direct", "cli"):
            write_deltalake(str(self.project / root / "tables" / "so_events"), events)

    def _spawn(self, command: list[str], env: dict[str, str], timeout_s: float) -> float:
        """Run a child in its own process group; its wall time in s (SystemExit when it fails)."""
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=self.project, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.children.append(child)
        try:
            out, _ = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{' '.join(command[:4])} did not finish within {timeout_s:.0f} s") from None
        if child.returncode != 0:
            raise SystemExit(f"{' '.join(command[:4])} failed ({child.returncode}): {out[-2000:]}")
        self.children.remove(child)
        return time.perf_counter() - started

    def direct(self, root: str, cli: bool) -> dict:
        """The chain run directly on storage root ``root``: one process (``cli`` False) or the two CLI calls."""
        env = {**self.env, "LAKERAY_STORAGE__ROOT": str(self.project / root)}
        t0 = time.time()
        if cli:
            wall = sum(self._spawn([self.lakeray, "features", "run", name], env, 600) for name in TABLES)
        else:
            wall = self._spawn([sys.executable, "-c", DIRECT, *TABLES], env, 600)
        first = min(m["t"] for m in _marks(self.marks) if m["job"] == TABLES[0] and m["t"] >= t0)
        last = _commits(self.project / root / "tables" / TABLES[-1])[-1]
        return {"wall_s": round(wall, 2), "first_job_s": round(first - t0, 2), "last_commit_s": round(last["t"] - t0, 2),
                "versions": {t: _commits(self.project / root / "tables" / t)[-1]["version"] for t in TABLES}}

    def scheduler(self, *args: str) -> float:
        return self._spawn([self.lakeray, "scheduler", *args], self.env, 300)

    def close(self) -> None:
        for child in self.children:  # a direct run interrupted by Ctrl-C or a failure: its group, JVM included
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
        if self.scheduler_started:
            self.children = []
            try:
                self.scheduler("stop")
            except SystemExit as exc:  # the CLI failed: stop the recorded groups ourselves
                print(f"scheduler stop: {exc}; stopping its process groups", file=sys.stderr)
                from lakeray.cluster.processes import stop_groups

                state = json.loads((self.home / "state.json").read_text())
                stop_groups([state["daemon_pid"], state["webserver_pid"]], 15.0)

    @property
    def home(self) -> Path:
        return self.project / "lakehouse" / "_dagster"


def _run_figures(instance, record, due: float) -> dict:
    """Seconds from the due time to each point of one run, from its Dagster events."""
    first: dict[str, float] = {}
    for entry in instance.all_logs(record.dagster_run.run_id):
        if entry.dagster_event is not None:
            first.setdefault(entry.dagster_event.event_type.name, entry.timestamp)  # the value is PIPELINE_*
    at = {"created_s": record.create_timestamp.timestamp(), "launched_s": first.get("RUN_STARTING"),
          "run_start_s": first.get("RUN_START"), "run_end_s": first.get("RUN_SUCCESS")}
    return {k: None if v is None else round(v - due, 2) for k, v in at.items()}


def _wait_intervals(bench: Bench, count: int, deadline: float) -> list:
    """The run records of the first ``count`` intervals, once each has its successful run."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(bench.home)) as instance:
        reported = set()
        while True:
            records = instance.get_run_records(dg.RunsFilter(tags={"lakeray/schedule": SCHEDULE}))
            intervals = sorted({r.dagster_run.tags["lakeray/interval"] for r in records})[:count]
            done = {r.dagster_run.tags["lakeray/interval"] for r in records if r.dagster_run.status.value == "SUCCESS"}
            for interval in sorted(done & set(intervals) - reported):
                print(f"interval {interval}: run succeeded", flush=True)
                reported.add(interval)
            if len(intervals) == count and set(intervals) <= done:
                return [r for r in records if r.dagster_run.tags["lakeray/interval"] in intervals]
            if time.time() > deadline:
                seen = [(r.dagster_run.tags["lakeray/interval"], r.dagster_run.status.value) for r in records]
                raise SystemExit(f"{count} intervals did not all succeed in time; runs {seen}")
            time.sleep(2.0)


def _measure(bench: Bench, args: argparse.Namespace) -> dict:
    import dagster as dg

    direct_before = bench.direct("direct", cli=False)
    print(f"direct run (one process): {direct_before}", flush=True)
    cli = bench.direct("cli", cli=True)
    print(f"direct run (two `lakeray features run` calls): {cli}", flush=True)
    bench.scheduler_started = True
    start_s = bench.scheduler("start")
    state = json.loads((bench.home / "state.json").read_text())
    started_at = time.time()
    print(f"scheduler started in {start_s:.1f} s; waiting for {args.intervals} interval(s)", flush=True)
    sampler = MemorySampler(state["daemon_pid"], state["webserver_pid"])
    sampler.start()
    try:
        records = _wait_intervals(bench, args.intervals, started_at + 60 * (args.intervals + 1) + args.timeout)
    finally:
        sampler.stop_event.set()
        sampler.join()
    scheduler_cpu_s = _group_cpu_s(state["daemon_pid"]) + _group_cpu_s(state["webserver_pid"])
    bench.scheduler_started = False
    bench.scheduler("stop")
    direct_after = bench.direct("direct", cli=False)
    print(f"direct run (one process, again): {direct_after}", flush=True)

    commits = {t: _commits(bench.project / "lakehouse" / "tables" / t) for t in TABLES}
    marks = _marks(bench.marks)
    intervals, problems = [], []
    with dg.DagsterInstance.from_config(str(bench.home)) as instance:
        by_interval: dict[str, list] = {}
        for record in records:
            by_interval.setdefault(record.dagster_run.tags["lakeray/interval"], []).append(record)
        previous_end = None
        for interval in sorted(by_interval):
            runs = by_interval[interval]
            success = [r for r in runs if r.dagster_run.status.value == "SUCCESS"]
            due = dt.datetime.fromisoformat(interval).timestamp()
            figures = _run_figures(instance, success[0], due)
            per_table = {t: [c for c in commits[t] if c["interval"] == interval] for t in TABLES}
            last = per_table[TABLES[-1]][0]["t"] if per_table[TABLES[-1]] else None
            # Runs go one at a time: the interval's first job was the last call before its own commit.
            own = per_table[TABLES[0]][0]["t"] if per_table[TABLES[0]] else due
            first_job = max((m["t"] for m in marks if m["job"] == TABLES[0] and due <= m["t"] <= own), default=None)
            intervals.append({"interval": interval, "runs": len(runs), "queued": previous_end is not None and previous_end > due,
                              **figures, "first_job_s": None if first_job is None else round(first_job - due, 2),
                              "last_commit_s": None if last is None else round(last - due, 2),
                              "versions": {t: [c["version"] for c in cs] for t, cs in per_table.items()}})
            previous_end = success[0].end_time
            if len(runs) != 1 or len(success) != 1:
                problems.append(f"{interval}: {len(runs)} runs, {len(success)} successful (expected exactly one)")
            for table, found in per_table.items():
                if len(found) != 1:
                    problems.append(f"{interval}: {table} has {len(found)} commits for the interval (expected one)")
    # Every commit that names an interval names a distinct one (none doubled, measured or not).
    for table in TABLES:
        named = [c["interval"] for c in commits[table] if c["interval"]]
        if len(named) != len(set(named)):
            problems.append(f"{table}: an interval committed twice: {named}")
    # Values: each scheduled commit's rows equal the direct runs' (both direct runs and the CLI chain).
    hashes = {}
    for table in TABLES:
        expected = {_content_hash(bench.project / root / "tables" / table, v)
                    for root, vs in (("direct", (0, 1)), ("cli", (0,))) for v in vs}
        got = {_content_hash(bench.project / "lakehouse" / "tables" / table, v)
               for i in intervals for v in i["versions"][table]}
        hashes[table] = {"direct": sorted(expected), "scheduled": sorted(got)}
        if len(expected) != 1 or got != expected:
            problems.append(f"{table}: the scheduled commits' rows differ from the direct run's: {hashes[table]}")

    samples = sampler.samples
    first_due = dt.datetime.fromisoformat(intervals[0]["interval"]).timestamp()
    idle = [s for s in samples if not s["running"] and s["t"] < first_due]
    busy = [s for s in samples if s["running"]]
    memory = {"daemon_group_idle_mib": _mib([s["daemon_group"] for s in idle]),
              "daemon_group_run_peak_mib": _mib([s["daemon_group"] for s in busy]),
              "webserver_group_idle_mib": _mib([s["webserver_group"] for s in idle]),
              "webserver_group_run_peak_mib": _mib([s["webserver_group"] for s in busy]),
              "run_worker_peak_mib": _mib([s["worker"] for s in busy]),
              "run_worker_jvm_peak_mib": _mib([s["worker_jvm"] for s in busy]),
              "run_workers_at_once": max((s["workers"] for s in busy), default=0),
              "samples": len(samples), "idle_samples": len(idle), "run_samples": len(busy)}
    return {"direct": [direct_before, direct_after], "cli_chain": cli, "intervals": intervals, "memory": memory,
            "scheduler_start_s": round(start_s, 1), "scheduler_cpu_s": round(scheduler_cpu_s, 1),
            "content_hashes": hashes, "problems": problems}


def _interrupted(*_: object) -> None:
    # `kill` (SIGTERM) takes Ctrl-C's way out: main's finally stops what was started.
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--intervals", type=int, default=3, help="scheduled intervals (one a minute) to measure")
    parser.add_argument("--rows", type=int, default=20000, help="rows of the source table")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds beyond the intervals' own minutes to wait for their runs (a loaded machine)")
    parser.add_argument("--out", default=str(REPO / "bench/results/scheduler_overhead.json"))
    args = parser.parse_args()
    if args.intervals < 1:
        parser.error("--intervals must be at least 1")
    signal.signal(signal.SIGTERM, _interrupted)
    base = Path(tempfile.mkdtemp(prefix="bench-scheduler-"))
    bench = Bench(base)
    load, started = OtherLoad(), time.perf_counter()
    try:
        bench.setup(args.rows)
        measured = _measure(bench, args)
    finally:
        bench.close()
        shutil.rmtree(base, ignore_errors=True)
    elapsed = time.perf_counter() - started
    # The scheduler's processes are not this process's descendants (`scheduler start` detaches them):
    # their CPU is taken out of the "other processes" share.
    other = round(max(load.share() - measured["scheduler_cpu_s"] / (elapsed * (os.cpu_count() or 1)), 0.0), 3)
    try:
        result = _summarise(measured, args, other, elapsed)
    except Exception:
        print(json.dumps(measured, indent=2), file=sys.stderr)  # minutes of measuring: keep what was read
        raise
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    for problem in measured["problems"]:
        print(f"RESULT CHECK FAILED: {problem}")
    if other > BUSY_SHARE:
        print(f"WARNING: other processes used {other:.0%} of the machine's CPU during the run")
    print(f"scheduler_overhead: ratio {result['ratio']:.2f} (target {TARGET})")
    sys.exit(0 if result["ratio"] <= TARGET and not measured["problems"] else 1)


def _summarise(measured: dict, args: argparse.Namespace, other: float, elapsed: float) -> dict:
    intervals, direct = measured["intervals"], measured["direct"]
    # Medians over the intervals that found the queue empty, when there are such: a queued interval
    # measures the previous run's length, not the scheduler.
    chosen = [i for i in intervals if not i["queued"]] or intervals

    def med(key: str, rows: list[dict]) -> float | None:
        return _median([r[key] for r in rows if r[key] is not None])

    direct_s = med("last_commit_s", direct)
    whole = med("last_commit_s", chosen)
    first, later = intervals[0], [i for i in intervals[1:] if not i["queued"]]
    points = ("created_s", "launched_s", "run_start_s", "first_job_s", "last_commit_s", "run_end_s")
    return {
        "name": "scheduler_overhead", "ratio": round(whole / direct_s, 3), "target": TARGET,
        "candidate_s": whole, "baseline_s": direct_s,
        "definitions": {
            "candidate_s": "due time → the chain's last Delta commit for the interval (median over intervals "
                           "not queued behind a previous run)",
            "baseline_s": "direct run: process start → the chain's last commit, one fresh process running "
                          "`lakeray features run`'s body for each job (one JVM, as a scheduled run has); median of 2",
            "ratio": "candidate_s / baseline_s",
            "scheduler_part": "due → run worker started (Dagster's RUN_START: tick, queue, launch, worker "
                              "process and code location loaded) / baseline_s",
            "start_overhead_s": "(due → first job's function called) − (direct process start → first job's "
                                "function called): the delay the scheduler adds to the job's start",
            "cli_chain_ratio": "candidate_s / the chain typed as two `lakeray features run` calls (two JVMs)",
            "memory": "MiB, resident sets summed over each process group; the largest sample while idle (before "
                      "the first due time) and while a run's JVM lived"},
        "scheduler_part": round(med("run_start_s", chosen) / direct_s, 3),
        "start_overhead_s": round(med("first_job_s", chosen) - med("first_job_s", direct), 2),
        "due_to": {p.removesuffix("_s") + "_s": med(p, chosen) for p in points},
        "first_interval": {"ratio": round(first["last_commit_s"] / direct[0]["last_commit_s"], 3),
                           **{p: first[p] for p in points}},
        "later_intervals": None if not later else {
            "ratio": round(med("last_commit_s", later) / direct[1]["last_commit_s"], 3),
            **{p: med(p, later) for p in points}},
        "direct_runs": direct, "cli_chain": measured["cli_chain"],
        "cli_chain_ratio": round(whole / measured["cli_chain"]["last_commit_s"], 3),
        "intervals": intervals, "memory": measured["memory"],
        "scheduler_start_s": measured["scheduler_start_s"], "scheduler_cpu_s": measured["scheduler_cpu_s"],
        "result_check": {"ok": not measured["problems"], "problems": measured["problems"],
                         "content_hashes": measured["content_hashes"]},
        "params": {"intervals": args.intervals, "rows": args.rows, "jobs": list(TABLES), "cron": "* * * * *",
                   "spark_master": "local[1]", "max_concurrent_runs": 1},
        "elapsed_s": round(elapsed, 1), "other_load_share": other,
        "load_average": [round(v, 1) for v in os.getloadavg()], "machine": machine()}


if __name__ == "__main__":
    main()
