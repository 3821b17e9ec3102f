"""The real scheduler under crashes: `lakeray scheduler start` runs three dependent feature jobs on a
per-minute schedule (Dagster's shortest cadence: its scheduler wakes once a minute) while the daemon is
SIGKILLed at seeded random moments and started again with `lakeray scheduler start`. Every due interval
must end committed exactly once, in dependency order, none lost, none doubled — read from the Delta
histories and from Dagster's run storage — and no run may be left in progress.
"""

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.spark, pytest.mark.slow]

JOBS = '''
from lakeray.features import feature_job

@feature_job(name="sk_a", inputs=["sk_events"], entity_keys=["user_id"], schedule="* * * * *", catchup="all")
def sk_a(sk_events):
    return sk_events.groupBy("user_id").sum("amount").withColumnRenamed("sum(amount)", "total")

@feature_job(name="sk_b", inputs=["sk_a"], entity_keys=["user_id"])
def sk_b(sk_a):
    return sk_a.where("total > 0")

@feature_job(name="sk_c", inputs=["sk_b"], entity_keys=["user_id"])
def sk_c(sk_b):
    return sk_b.selectExpr("user_id", "total * 2 as doubled")
'''
TABLES = ("sk_a", "sk_b", "sk_c")
# The whole soak, kills and restarts included, must settle within this (≈4 min on a quiet machine). A run
# is a fresh worker process and Spark JVM: at load ≈ 20 one took 2.5–3.5 min, so a busy machine needs a
# longer bound (SCHEDULER_SOAK_WINDOW_S=1500).
WINDOW_S = float(os.environ.get("SCHEDULER_SOAK_WINDOW_S", "540"))
IN_PROGRESS = ("NOT_STARTED", "QUEUED", "STARTING", "STARTED", "CANCELING")


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def test_daemon_sigkilled_at_random_moments_every_interval_commits_exactly_once(tmp_path):
    import dagster as dg
    import pandas as pd
    from deltalake import DeltaTable, write_deltalake

    from lakeray.cluster.processes import group_members

    (tmp_path / "jobs" / "features").mkdir(parents=True)
    (tmp_path / "jobs" / "features" / "sk_jobs.py").write_text(JOBS)
    (tmp_path / "lakeray.yaml").write_text('profiles:\n  local:\n    spark: {master: "local[1]", driver_memory: 512m, '
                                           'shuffle_partitions: 1}\n    storage: {root: lakehouse}\n')
    lakehouse = tmp_path / "lakehouse"
    write_deltalake(str(lakehouse / "tables" / "sk_events"), pd.DataFrame({"user_id": [1, 2, 3, 1], "amount": [5.0, -2.0, 7.0, 1.0]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKERAY_")}
    home = lakehouse / "_dagster"
    rng = random.Random(16)

    def lakeray(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from lakeray.cli.main import main; main()", *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)

    def state() -> dict:
        return json.loads((home / "state.json").read_text())

    def runs(instance) -> list:
        return instance.get_run_records(dg.RunsFilter(tags={"lakeray/schedule": "sk_a_schedule"}))

    def wait_for(what: str, predicate, deadline: float) -> None:
        while not predicate():
            if time.monotonic() > deadline:
                with dg.DagsterInstance.from_config(str(home)) as instance:
                    seen = [(r.dagster_run.tags.get("lakeray/interval"), r.dagster_run.status.value,
                             r.dagster_run.tags.get("dagster/parent_run_id", "")[:8]) for r in runs(instance)]
                pytest.fail(f"soak: {what} did not happen within {WINDOW_S:.0f} s; kills {kills}; runs {seen}")
            time.sleep(1.0)

    started = lakeray("scheduler", "start")
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + WINDOW_S
    kills, memory = [], {}
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            # Kill 1: the daemon's whole process group (daemon, code server, run worker and its Spark) a
            # random moment after the first run started: mid-run, before or after a commit.
            wait_for("a first run", lambda: any(r.dagster_run.status.value == "STARTED" for r in runs(instance)),
                     deadline)
            time.sleep(rng.uniform(2.0, 12.0))
            kills.append(("group", time.time()))
            os.killpg(state()["daemon_pid"], signal.SIGKILL)
            again = lakeray("scheduler", "start")
            assert again.returncode == 0, again.stderr
            # Kill 2: the daemon process alone, a random moment after the restart (its children stay
            # behind; the next start stops them, fails their run, and the ticks it slept through are
            # evaluated when it is back).
            time.sleep(rng.uniform(3.0, 20.0))
            memory = {"daemon_group_mb": round(sum(_rss_mb(p) for p in group_members(state()["daemon_pid"])), 1),
                      "webserver_group_mb": round(sum(_rss_mb(p) for p in group_members(state()["webserver_pid"])), 1)}
            kills.append(("daemon", time.time()))
            os.kill(state()["daemon_pid"], signal.SIGKILL)
            again = lakeray("scheduler", "start")
            assert again.returncode == 0, again.stderr
            # Settle: every due time up to the last restart has a run (those the daemon slept through are
            # caught up), and those runs have finished. Later intervals keep coming once a minute; they
            # are not waited for (on a busy machine a run takes longer than a minute).
            last_interval = dt.datetime.fromtimestamp(time.time() // 60 * 60, dt.timezone.utc).isoformat()

            def window() -> list:
                return [r for r in runs(instance) if r.dagster_run.tags["lakeray/interval"] <= last_interval]

            wait_for("the last interval's run", lambda: any(r.dagster_run.tags["lakeray/interval"] == last_interval
                                                            for r in window()), deadline)
            # A crashed run is marked FAILURE first and re-executed by Dagster's run-retry daemon a
            # moment later (run monitoring polls every 15 s): "nothing in progress" alone can be seen in
            # that gap. Wait, within the window, until every interval has its success and nothing runs.
            def settled() -> bool:
                records = window()
                done = {r.dagster_run.tags["lakeray/interval"] for r in records if r.dagster_run.status.value == "SUCCESS"}
                return not [r for r in records if r.dagster_run.status.value in IN_PROGRESS] and \
                    {r.dagster_run.tags["lakeray/interval"] for r in records} <= done

            wait_for("every interval up to the last to have its successful run, nothing in progress", settled,
                     deadline)
            records = window()
    finally:
        final = state()
        stopped = lakeray("scheduler", "stop")
    assert stopped.returncode == 0
    assert not group_members(final["daemon_pid"]) and not group_members(final["webserver_pid"])
    with_status: dict[str, list[str]] = {}
    for record in records:
        with_status.setdefault(record.dagster_run.tags["lakeray/interval"], []).append(record.dagster_run.status.value)
    intervals = sorted(with_status)
    first = dt.datetime.fromisoformat(intervals[0])
    expected = [(first + dt.timedelta(minutes=i)).isoformat() for i in range(len(intervals))]
    assert intervals == expected and last_interval in intervals, with_status  # none lost
    assert all(statuses.count("SUCCESS") == 1 for statuses in with_status.values()), with_status
    assert not [s for statuses in with_status.values() for s in statuses if s in IN_PROGRESS]
    # The Delta histories: each table holds one commit per interval (none doubled), and within an
    # interval the tables were committed in dependency order.
    commits: dict[str, dict[str, int]] = {}
    for table in TABLES:
        history = DeltaTable(str(lakehouse / "tables" / table)).history()
        marked = [(json.loads(c["userMetadata"])["interval"], c["version"]) for c in history if c.get("userMetadata")]
        assert len({i for i, _ in marked}) == len(marked), (table, marked)  # no interval committed twice
        assert sorted(i for i, _ in marked if i <= last_interval) == expected, (table, marked)
        commits[table] = dict(marked)
    timestamps = {t: {c["version"]: c["timestamp"] for c in DeltaTable(str(lakehouse / "tables" / t)).history()} for t in TABLES}
    for interval in expected:
        order = [timestamps[t][commits[t][interval]] for t in TABLES]
        assert order == sorted(order), (interval, order)
    retried = [r for r in records if r.dagster_run.tags.get("dagster/parent_run_id")]
    successes = [r for r in records if r.dagster_run.status.value == "SUCCESS"]
    delays = sorted(r.start_time - dt.datetime.fromisoformat(r.dagster_run.tags["lakeray/interval"]).timestamp()
                    for r in successes if not r.dagster_run.tags.get("dagster/parent_run_id"))
    print(f"\nsoak: {len(expected)} intervals, {len(records)} runs ({len(retried)} retries), kills {kills}, "
          f"due→run start s: {[round(d, 1) for d in delays]}, memory {memory}")
