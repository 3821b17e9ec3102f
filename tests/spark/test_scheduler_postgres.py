"""The scheduler on Postgres storage (the cluster path): a real PostgreSQL server made for the module,
`lakeray scheduler start` on a profile whose `scheduler.postgres` names it, one run launched
through the webserver and executed by the daemon's run queue, its run and events in Postgres and no
SQLite storage beside; and the bad settings (password variable unset, wrong password, missing database,
server unreachable), each one error before anything starts."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from lakeray.config import load_settings
from lakeray.lakehouse.delta import read_table, table_version, write_table

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "lr-test-pw"

JOBS = '''
from pyspark.sql import functions as F
from lakeray.features import feature_job

@feature_job(name="pg_clean", inputs=["pg_events"], entity_keys=["user_id", "event_time"], schedule="0 0 1 1 *")
def pg_clean(pg_events):
    return pg_events.where(F.col("amount") >= 0)
'''


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: [int(x) for x in p.parts[-3].split(".")])
    if not found:  # Debian's postgresql package, as `make scheduler-tools` installs it
        subprocess.run(["make", "-C", str(REPO), "scheduler-tools"], check=True, timeout=900)
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert found, "`make scheduler-tools` did not install PostgreSQL (no /usr/lib/postgresql/*/bin/initdb)"
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on a free 127.0.0.1 port, password auth over TCP, database `dagster`; always
    stopped and removed. initdb refuses root, so the folder belongs to the `postgres` user."""
    import psycopg2

    pg_bin = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="lakeray-pg-"))
    shutil.chown(folder, "postgres", "postgres")
    (folder / "pw").write_text(PASSWORD)
    shutil.chown(folder / "pw", "postgres", "postgres")
    port = _free_port()

    def as_postgres(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120)

    try:
        as_postgres(str(pg_bin / "initdb"), "-D", str(folder / "data"), "-U", "lakeray", f"--pwfile={folder / 'pw'}",
                    "--auth-local=trust", "--auth-host=scram-sha-256")
        as_postgres(str(pg_bin / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "server.log"), "-w",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
        admin = psycopg2.connect(host="127.0.0.1", port=port, user="lakeray", password=PASSWORD, dbname="postgres")
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE dagster")
        admin.close()
        yield port
    finally:
        if (folder / "data" / "postmaster.pid").exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(pg_bin / "pg_ctl"), "-D", str(folder / "data"),
                            "-m", "immediate", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def project(spark, postgres, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sched_pg")
    (folder / "jobs" / "features").mkdir(parents=True)
    (folder / "jobs" / "features" / "pg_jobs.py").write_text(textwrap.dedent(JOBS))
    (folder / "lakeray.yaml").write_text(textwrap.dedent(f"""\
        profiles:
          local:
            spark: {{master: "local[2]", driver_memory: 1g, shuffle_partitions: 2}}
            storage: {{root: lakehouse}}
            scheduler:
              postgres: {{host: 127.0.0.1, port: {postgres}, database: dagster, user: lakeray,
                         password_env: DAGSTER_PG_PASSWORD}}
        """))
    settings = load_settings(folder / "lakeray.yaml", "local", environ={})
    events = spark.createDataFrame([(u, f"2026-03-01 1{u}:00:00", float(u) - 1.0) for u in range(4)],
                                   "user_id long, event_time string, amount double")
    write_table(events.selectExpr("user_id", "cast(event_time as timestamp) as event_time", "amount"),
                settings.table_path("pg_events"))
    return settings


def _cli(project, password: str | None = PASSWORD, **overrides: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAKERAY_", "PG")) and k != "DAGSTER_PG_PASSWORD"}
    if password is not None:
        env["DAGSTER_PG_PASSWORD"] = password
    env.update(overrides)

    def lakeray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from lakeray.cli.main import main; main()", *args],
                              cwd=project.project_dir, env=env, capture_output=True, text=True, timeout=timeout)
    return lakeray


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]


LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


def test_scheduler_bad_postgres_settings_fail_before_anything_starts(project, tmp_path):
    shutil.copytree(project.project_dir / "jobs", tmp_path / "jobs")  # a project of its own: no storage yet
    shutil.copy(project.project_dir / "lakeray.yaml", tmp_path)
    project = load_settings(tmp_path / "lakeray.yaml", "local", environ={})
    home = tmp_path / "lakehouse" / "_dagster"
    free = str(_free_port())  # nothing listens there
    # (password, profile overrides, exit code: ConfigError 2 for a wrong setting, ClusterError 1 for a server
    #  that does not answer, what the headline says, what the fix says)
    cases = [(None, {}, 2, "DAGSTER_PG_PASSWORD, which is not set", "export DAGSTER_PG_PASSWORD="),
             ("wrong-pw", {}, 2, "password authentication failed", "the password in DAGSTER_PG_PASSWORD"),
             (PASSWORD, {"LAKERAY_SCHEDULER__POSTGRES__DATABASE": "nodb"}, 2, 'database "nodb" does not exist',
              "create the database"),
             (PASSWORD, {"LAKERAY_SCHEDULER__POSTGRES__PORT": free}, 1, "Connection refused",
              f"start Postgres at 127.0.0.1:{free}")]
    for password, overrides, code, reason, fix in cases:
        started = _cli(project, password, **overrides)("scheduler", "start", timeout=120)
        assert started.returncode == code, started.stderr
        lines = started.stderr.strip().splitlines()
        assert "scheduler.postgres" in lines[0] and reason in lines[0] and fix in lines[1], started.stderr
        assert len(lines) == 2
        assert "Traceback" not in started.stderr and "wrong-pw" not in started.stderr
        assert not home.exists()  # nothing written (no state.json), so nothing was started


def test_scheduler_on_postgres_runs_a_job_through_the_daemon(spark, project, postgres):
    import psycopg2

    lakeray = _cli(project)
    home = project.project_dir / "lakehouse" / "_dagster"
    t0 = time.monotonic()
    started = lakeray("scheduler", "start")
    assert started.returncode == 0, started.stderr
    start_s = time.monotonic() - t0
    try:
        info = json.loads(lakeray("scheduler", "status", "--json").stdout)
        assert info["running"] and info["ui_answers"]
        config = (home / "dagster.yaml").read_text()
        assert "password:\n        env: DAGSTER_PG_PASSWORD" in config and PASSWORD not in config
        params = {"selector": {"repositoryLocationName": "lakeray", "repositoryName": "__repository__",
                               "jobName": "pg_clean_schedule_job"},
                  "executionMetadata": {"tags": [{"key": "lakeray/schedule", "value": "pg_clean_schedule"}]}}
        t1 = time.monotonic()
        launched = _graphql(info["url"], LAUNCH, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        with psycopg2.connect(host="127.0.0.1", port=postgres, user="lakeray", password=PASSWORD,
                              dbname="dagster") as db, db.cursor() as cursor:  # the daemon dequeues and runs it
            deadline = time.monotonic() + 400
            while True:
                cursor.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
                status = cursor.fetchone()[0]
                db.commit()
                if status in ("SUCCESS", "FAILURE", "CANCELED") or time.monotonic() > deadline:
                    break
                time.sleep(2)
            run_s = time.monotonic() - t1
            assert status == "SUCCESS", (home / "lakeray_logs" / "dagster-daemon.log").read_text()[-3000:]
            cursor.execute("SELECT dagster_event_type, asset_key FROM event_logs WHERE run_id = %s", (run_id,))
            events = cursor.fetchall()
        types = {t for t, _ in events}
        # Dagster stores the run's own start and success under their old names (PIPELINE_*).
        assert {"PIPELINE_START", "STEP_SUCCESS", "ASSET_MATERIALIZATION", "PIPELINE_SUCCESS"} <= types, types
        assert any(t == "ASSET_MATERIALIZATION" and "pg_clean" in (key or "") for t, key in events)
        assert read_table(spark, project.table_path("pg_clean")).count() == 3  # the negative amount dropped
        assert table_version(spark, project.table_path("pg_clean")) == 0
        assert sorted(p.name for p in home.rglob("*.db")) == []  # no SQLite run, event or schedule storage
        listed = lakeray("runs", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {row["run_id"]: row for row in map(json.loads, listed.stdout.splitlines())}
        assert rows[run_id]["status"] == "success" and rows[run_id]["versions"] == {"pg_clean": 0}
        print(f"\nscheduler start on Postgres {start_s:.1f} s; launch → SUCCESS {run_s:.1f} s")
    finally:
        stopped = lakeray("scheduler", "stop")
    assert stopped.returncode == 0 and str(info["daemon_pid"]) in stopped.stdout
    for pid in (info["daemon_pid"], info["webserver_pid"]):
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert not (home / "state.json").exists()
