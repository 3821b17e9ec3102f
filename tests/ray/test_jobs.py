"""`lakeray jobs` against a real `lakeray cluster up` cluster (Ray head only, started once for the module):
scripts and lakeray commands as Ray jobs, metadata, logs, `ray job submit` compatibility, stop (driver,
its child processes and its Ray tasks end; a Delta table written in a loop keeps only whole commits),
and the errors a user can hit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lakeray.cluster.netns import wait_until
from lakeray.cluster.processes import alive
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = os.path.dirname(sys.executable)
LAKERAY = os.path.join(BIN, "lakeray")
ROWS = 50_000

HELLO = """\
import os, sys
print("hello from the job; storage root", os.environ["LAKERAY_STORAGE__ROOT"], flush=True)
sys.exit(int(sys.argv[1]))
"""

# Appends whole batches to a Delta table until stopped (bounded); a Ray task and a child process of the
# driver (as Spark's JVM is one) run alongside, and their pids are written where the test finds them.
WRITER = """\
import os, subprocess, sys, time
import numpy as np, pyarrow as pa, ray
from deltalake import write_deltalake

table, rows, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ray.init()  # the cluster the job runs on: Ray sets RAY_ADDRESS for the driver

@ray.remote(num_cpus=1)
def hold(path):
    with open(path + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(600)

task = hold.remote(os.path.join(out, "task.pid"))
child = subprocess.Popen(["sleep", "600"])
with open(os.path.join(out, "driver.pids.tmp"), "w") as fh:
    fh.write(f"{os.getpid()} {child.pid}")
os.replace(os.path.join(out, "driver.pids.tmp"), os.path.join(out, "driver.pids"))
for batch in range(400):
    # four files per commit: a stop between them must leave no trace in the table
    data = pa.table({"batch": np.full(rows, batch, dtype=np.int64), "part": np.arange(rows) % 4,
                     "x": np.random.default_rng(batch).random(rows)})
    write_deltalake(table, data, mode="append", partition_by=["part"])
    print(f"batch {batch} committed", flush=True)
"""


@dataclass
class Project:
    path: Path
    root: Path
    env: dict[str, str]
    netns: str  # the cluster and every command that talks to it run in this network namespace
    dashboard: str = ""

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]

    def lakeray(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(LAKERAY, *args), cwd=self.path, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


def _git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs")
    path, root = base / "project", base / "lakehouse"
    path.mkdir()
    shutil.copy(REPO / "lakeray.yaml", path / "lakeray.yaml")
    (path / "hello.py").write_text(HELLO)
    (path / "writer.py").write_text(WRITER)
    (path / ".gitignore").write_text("/scratch/\n")
    _git(path, "init", "-q")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "project")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAKERAY_", "RAY_ADDRESS", "RAY_API_SERVER"))}
    env["LAKERAY_STORAGE__ROOT"] = str(root)
    # A network namespace of its own (loopback only): `ray start --head` gives the head's dashboard agent,
    # which runs the Jobs API's jobs, the fixed port 52365, and any other Ray on the machine that holds
    # it (a test session's local Ray, a second cluster) would leave this cluster without a job agent.
    netns = f"lrjobs{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    proj = Project(path, root, env, netns)
    temp_dir = None
    try:
        subprocess.run(proj.command("ip", "link", "set", "lo", "up"), check=True, timeout=30)
        up = proj.lakeray("cluster", "up", "--workers", "0", "--no-spark", "--head-cpus", "3", timeout=300)
        assert up.returncode == 0, up.stderr[-3000:]
        state = json.loads((root / "cluster" / "state.json").read_text())
        proj.dashboard, temp_dir = state["dashboard_url"], state["temp_dir"]
        yield proj
    finally:
        down = proj.lakeray("cluster", "down", timeout=120)
        if temp_dir:
            _kill_renamed_leftovers(temp_dir)
        subprocess.run(["ip", "netns", "delete", netns], timeout=30)
        assert down.returncode == 0, down.stderr[-2000:]


def _kill_renamed_leftovers(temp_dir: str) -> None:
    """Ray's dashboard agent renames itself (`ray::DashboardAgent`) and may outlive `cluster down`, which
    finds processes by the temp dir in their command lines: end the ones this module's cluster started
    (their open files are in its temp dir), so the next cluster gets port 52365."""
    import signal

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if not fh.read().startswith(b"ray::"):
                    continue
            if any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(temp_dir) for fd in os.listdir(f"/proc/{entry}/fd")):
                os.kill(int(entry), signal.SIGKILL)
        except OSError:
            continue


def _status(project: Project, job_id: str) -> dict:
    shown = project.lakeray("jobs", "status", job_id, "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    return json.loads(shown.stdout)


def test_script_job_exit_status_metadata_and_logs(project):
    ok = project.lakeray("jobs", "submit", "--id", "hello-ok", "--wait", "hello.py", "0")
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert f"hello from the job; storage root {project.root}" in ok.stdout  # streamed while it ran
    state = _status(project, "hello-ok")
    assert state["status"] == "SUCCEEDED" and state["entrypoint"] == "python hello.py 0"
    meta = state["metadata"]
    assert meta["lakeray.git_commit"] == _git(project.path, "rev-parse", "HEAD")
    assert meta["lakeray.git_dirty"] == "false"
    assert meta["lakeray.spec"] == "hello.py"
    import hashlib

    assert meta["lakeray.spec_sha256"] == hashlib.sha256(HELLO.encode()).hexdigest()
    assert meta["lakeray.command"] == "hello.py 0" and meta["lakeray.user"]

    # A failing job: --wait exits with the driver's exit code; an uncommitted file marks the code dirty.
    (project.path / "notes.txt").write_text("not committed\n")
    failed = project.lakeray("jobs", "submit", "--id", "hello-fail", "--wait", "--", "python", "hello.py", "3")
    assert failed.returncode == 3, failed.stdout[-2000:] + failed.stderr[-2000:]
    state = _status(project, "hello-fail")
    assert state["status"] == "FAILED" and state["driver_exit_code"] == 3
    assert state["metadata"]["lakeray.git_dirty"] == "true"
    logs = project.lakeray("jobs", "logs", "hello-fail")
    assert logs.returncode == 0 and "hello from the job" in logs.stdout
    shown = project.lakeray("jobs", "status", "hello-fail")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "job hello-fail: FAILED (exit 3)" in shown.stdout and "+ uncommitted changes" in shown.stdout
    assert "spec:        hello.py sha256 " in shown.stdout


def test_lakeray_command_job_reads_the_submitters_lakehouse(project):
    import pyarrow as pa
    from deltalake import write_deltalake

    write_deltalake(str(project.root / "tables" / "job_input"), pa.table({"id": [1, 2, 3]}))
    done = project.lakeray("jobs", "submit", "--id", "tables-list", "--wait", "--", "lakeray", "tables", "list",
                           "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    listed = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("[")))
    assert [(t["name"], t["rows"]) for t in listed] == [("job_input", 3)]
    assert _status(project, "tables-list")["metadata"]["lakeray.command"] == "lakeray tables list --json"


def test_official_ray_job_cli_and_lakeray_jobs_share_the_cluster(project):
    env = {**project.env, "RAY_AUTH_MODE": "token"}  # `ray job` reads the token from ~/.ray/auth_token
    official = subprocess.run(project.command(os.path.join(BIN, "ray"), "job", "submit", "--address", project.dashboard,
                               "--submission-id", "from-ray-cli", "--", "echo", "official"), env=env,
                              capture_output=True, text=True, timeout=180, cwd=project.path)
    assert official.returncode == 0, official.stderr[-3000:]
    listed = project.lakeray("jobs", "list", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    jobs = {job["submission_id"]: job for job in json.loads(listed.stdout)}
    assert jobs["from-ray-cli"]["status"] == "SUCCEEDED" and jobs["from-ray-cli"]["entrypoint"] == "echo official"
    table = project.lakeray("jobs", "list")
    assert "from-ray-cli" in table.stdout and "hello-ok" in table.stdout
    # ... and the other way round: `ray job logs` reads a job lakeray submitted.
    theirs = subprocess.run(project.command(os.path.join(BIN, "ray"), "job", "logs", "--address", project.dashboard,
                                            "hello-ok"),
                            env=env, capture_output=True, text=True, timeout=120)
    assert theirs.returncode == 0 and "hello from the job" in theirs.stdout


def _wait_for(check, timeout_s: float, what: str):
    found = wait_until(check, timeout_s)
    assert found, f"{what} within {timeout_s} s"
    return found


def test_stop_mid_write_ends_the_job_and_leaves_whole_commits(project, tmp_path):
    from deltalake import DeltaTable

    table = str(project.root / "tables" / "stopped_writer")
    waiting = subprocess.Popen(project.command(LAKERAY, "jobs", "submit", "--id", "writer", "--wait", "--", "python",
                                               "writer.py", table, str(ROWS), str(tmp_path)), cwd=project.path,
                               env=project.env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def versions() -> int:
            try:
                return DeltaTable(table).version() >= 2
            except Exception:  # noqa: BLE001 (no table yet)
                return False

        _wait_for(versions, 150, "the job committed no 3 versions")
        _wait_for(lambda: (tmp_path / "driver.pids").exists() and (tmp_path / "task.pid").exists(), 60,
                  "the job wrote no pids")
        pids = [*map(int, (tmp_path / "driver.pids").read_text().split()), int((tmp_path / "task.pid").read_text())]
        assert all(alive(pid) for pid in pids)
        stopped = project.lakeray("jobs", "stop", "writer", "--timeout", "60")
        assert stopped.returncode == 0, stopped.stderr[-2000:]
        assert "STOPPED" in stopped.stdout
        out, _ = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 143, out[-2000:]  # --wait exits with the job's status
    assert _status(project, "writer")["status"] == "STOPPED"
    # The driver, the process it started and its Ray task are gone (Ray ends a dead driver's workers).
    _wait_for(lambda: not any(alive(pid) for pid in pids), 30, "a process of the stopped job is still alive")

    # Every version is whole: version v holds batches 0..v with ROWS rows each (Delta commits are atomic;
    # files of a batch the stop cut short are on disk but in no commit).
    import pyarrow.compute as pc

    final = DeltaTable(table)
    latest = final.version()
    for version in sorted({0, latest // 2, latest}):
        batches = DeltaTable(table, version=version).to_pyarrow_table(columns=["batch"])["batch"]
        counts = {row["values"]: row["counts"] for row in pc.value_counts(batches).to_pylist()}
        assert counts == {batch: ROWS for batch in range(version + 1)}, version
    for entry in (Path(table) / "_delta_log").glob("*.json"):
        for line in entry.read_text().splitlines():
            json.loads(line)
    # No job keeps writing after the stop.
    time.sleep(2)
    assert DeltaTable(table).version() == latest


def test_errors_name_the_fix(project, tmp_path):
    unknown = project.lakeray("jobs", "status", "no-such-job")
    assert unknown.returncode == 1 and "no job 'no-such-job'" in unknown.stderr and "lakeray jobs list" in unknown.stderr

    # No cluster for this storage root, no dashboard address: the error names both ways out.
    elsewhere = {**project.env, "LAKERAY_STORAGE__ROOT": str(tmp_path / "empty")}
    none = subprocess.run([LAKERAY, "jobs", "list"], cwd=project.path, env=elsewhere, capture_output=True, text=True,
                          timeout=60)
    assert none.returncode == 1
    assert "lakeray cluster up" in none.stderr and "ray.dashboard_address" in none.stderr
    assert "Traceback" not in none.stderr

    # A dashboard that does not answer: a bounded wait, one line.
    started = time.monotonic()
    dead = project.lakeray("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}", timeout=60)
    assert dead.returncode == 1 and "does not answer" in dead.stderr
    assert time.monotonic() - started < 30

    wrong = subprocess.run([LAKERAY, "jobs", "list"], cwd=project.path, timeout=60, capture_output=True, text=True,
                           env={**elsewhere, "LAKERAY_RAY__DASHBOARD_ADDRESS": "ray://head:10001"})
    assert wrong.returncode == 2 and "ray.dashboard_address" in wrong.stderr


def test_upload_leaves_out_large_files_and_refuses_over_the_cap(tmp_path):
    from lakeray.cluster.job_env import plan_upload
    from lakeray.config import load_settings
    from lakeray.errors import ConfigError

    shutil.copy(REPO / "lakeray.yaml", tmp_path / "lakeray.yaml")
    (tmp_path / "small.py").write_text("print(1)\n")
    (tmp_path / "model.bin").write_bytes(os.urandom(3 * 2**20))
    for name in ("a", "b", "c"):
        (tmp_path / f"data_{name}.csv").write_bytes(os.urandom(2**20))
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "big").write_bytes(b"0" * 2**20)
    (tmp_path / "lakehouse" / "tables").mkdir(parents=True)
    (tmp_path / "lakehouse" / "tables" / "part.parquet").write_bytes(b"0" * 2**20)
    settings = load_settings(tmp_path / "lakeray.yaml", "local", environ={})  # storage root: ./lakehouse

    plan = plan_upload(settings, max_file_bytes=2 * 2**20, cap_bytes=16 * 2**20)
    assert plan.large_files == [("model.bin", 3 * 2**20)] and "/model.bin" in plan.excludes
    assert {".venv", "/lakehouse"} <= set(plan.excludes)
    assert plan.files == 5 and plan.bytes == 3 * 2**20 + len("print(1)\n") + len((tmp_path / "lakeray.yaml").read_bytes())

    with pytest.raises(ConfigError) as over:
        plan_upload(settings, max_file_bytes=4 * 2**20, cap_bytes=5 * 2**20)
    message = str(over.value)
    assert "over Ray's upload cap of 5 MiB" in message and "model.bin (3.0 MiB)" in message
    assert ".gitignore or .rayignore" in message


def test_job_env_metadata_and_spec_paths(tmp_path, monkeypatch):
    from lakeray.cluster.job_env import entrypoint, job_metadata, plan_upload, runtime_env
    from lakeray.config import load_settings
    from lakeray.errors import ConfigError

    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    shutil.copy(REPO / "lakeray.yaml", project / "lakeray.yaml")
    (project / "jobs" / "spec.yaml").write_text("model: {kind: xgboost}\n")
    (tmp_path / "outside.yaml").write_text("x: 1\n")
    monkeypatch.chdir(project)  # commands name paths as the user types them, from the project folder
    monkeypatch.setenv("LAKERAY_TRAIN__NUM_WORKERS", "3")
    monkeypatch.setenv("LAKERAY_CLUSTER_NODE", "/tmp/lakeray-ray-x")
    settings = load_settings(project / "lakeray.yaml", "local", environ={"LAKERAY_STORAGE__ROOT": str(tmp_path / "lh")})

    meta = job_metadata(settings, ["lakeray", "train", "jobs/spec.yaml", "--json"])
    import hashlib

    assert meta["lakeray.spec"] == "jobs/spec.yaml"
    assert meta["lakeray.spec_sha256"] == hashlib.sha256(b"model: {kind: xgboost}\n").hexdigest()
    assert meta["lakeray.git_commit"] == "" and meta["lakeray.git_dirty"] == "false"  # not a git checkout
    assert "lakeray.spec" not in job_metadata(settings, ["lakeray", "features", "run", "customer_aggregates"])
    with pytest.raises(ConfigError, match="runs in the project folder"):
        job_metadata(settings, ["lakeray", "train", str(tmp_path / "outside.yaml")])
    assert entrypoint(["jobs/spec.yaml"]) == "jobs/spec.yaml"  # only a .py file runs with python
    with pytest.raises(ConfigError, match="no command"):
        entrypoint([])

    renv = runtime_env(settings, plan_upload(settings), local_cluster=True)
    env = renv["env_vars"]
    assert env["LAKERAY_STORAGE__ROOT"] == str(tmp_path / "lh") and env["LAKERAY_PROFILE"] == "local"
    assert env["LAKERAY_TRAIN__NUM_WORKERS"] == "3" and env["LAKERAY_RAY__ADDRESS"] == "auto"
    assert env["LAKERAY_CONFIG"] == "lakeray.yaml" and "LAKERAY_CLUSTER_NODE" not in env
    assert env["PATH"] == f"{BIN}:${{PATH}}" and "pip" not in renv
    assert "PATH" not in runtime_env(settings, plan_upload(settings), local_cluster=False)["env_vars"]
    with pytest.raises(ConfigError, match="no requirements.lock"):
        runtime_env(settings, plan_upload(settings), local_cluster=False, pip=True)
    (project / "requirements.lock").write_text("numpy==2.4.0\n")
    assert runtime_env(settings, plan_upload(settings), local_cluster=False, pip=True)["pip"] == str(
        project / "requirements.lock")
