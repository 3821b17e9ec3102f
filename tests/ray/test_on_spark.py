"""`lakeray cluster up --on-spark MASTER_URL`: Ray on an existing Spark standalone cluster (Ray on Spark).

A standalone master and one worker (the test's own, from the pyspark install, on loopback) stand for the
team's Spark cluster. `up --on-spark` leaves a detached driver holding a Spark application whose task
hosts a Ray worker node; a lakeray command connects to that Ray; `down` leaves no process and the
application is gone from the master. An unreachable master fails within a bounded wait, starting nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from lakeray.cluster.netns import wait_until
from lakeray.cluster.processes import (
    LOOPBACK,
    alive,
    free_port,
    spark_env,
    spark_home,
    spark_worker_command,
    start_jvm,
    stop_groups,
)
from tests.conftest import REPO, cluster_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

def _cmdlines() -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and alive(int(entry)):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    found[int(entry)] = fh.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return found


def _tagged(temp_dir: str) -> list[int]:
    """Processes carrying the cluster's temp dir in their command line or its tag in their environment."""
    tag = f"LAKERAY_CLUSTER_NODE={temp_dir}".encode() + b"\0"
    found = []
    for pid, cmdline in _cmdlines().items():
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                tagged = tag in fh.read()
        except OSError:
            continue
        if temp_dir in cmdline or tagged:
            found.append(pid)
    return found


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        chain.append(pid)
    return chain


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    """The team's Spark standalone cluster: a master and one 2-core worker on loopback."""
    logs = tmp_path_factory.mktemp("spark-standalone")
    port, ui_port = free_port(), free_port()
    master_url, ui = f"spark://{LOOPBACK}:{port}", f"http://{LOOPBACK}:{ui_port}"
    master = [os.path.join(spark_home(), "bin", "spark-class"), "org.apache.spark.deploy.master.Master",
              "--host", LOOPBACK, "--port", str(port), "--webui-port", str(ui_port)]
    pids = [start_jvm(master, spark_env(LOOPBACK), str(logs / "master.log")),
            start_jvm(spark_worker_command(master_url, LOOPBACK, 2, 2048, str(logs / "work")), spark_env(LOOPBACK), str(logs / "worker.log"))]
    try:
        def registered() -> bool:
            try:
                return [w["state"] for w in httpx.get(f"{ui}/json/", timeout=2).json()["workers"]] == ["ALIVE"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        if not wait_until(registered, 120):
            pytest.fail(f"the test's Spark worker did not register; see {logs}")
        yield master_url, ui
    finally:
        stop_groups(pids)


def test_ray_on_a_spark_cluster_is_used_by_lakeray_and_down_leaves_nothing(spark_cluster, tmp_path):
    master_url, ui = spark_cluster
    root = tmp_path / "lakehouse"
    started = time.monotonic()
    up = cluster_cli(root, "up", "--on-spark", master_url, "--workers", "1", "--worker-cpus", "1")
    up_s = time.monotonic() - started
    state = json.loads((root / "cluster" / "state.json").read_text()) if up.returncode == 0 else {}
    try:
        assert up.returncode == 0, up.stderr[-3000:] + up.stdout[-1000:]
        print(f"up --on-spark {up_s:.1f} s")
        assert alive(state["driver_pid"]) and state["spark_master_url"] == master_url
        # The master's own list: the application that hosts the Ray nodes is running.
        apps = httpx.get(f"{ui}/json/", timeout=5).json()
        assert [(a["id"], a["state"]) for a in apps["activeapps"]] == [(state["spark_app_id"], "RUNNING")]

        # A lakeray command of this project connects to it (no private Ray) and sees the Spark-hosted node.
        probe = subprocess.run([sys.executable, "-c", (
            "from lakeray.config import load_settings\n"
            "from lakeray.cluster.ray_runtime import start_ray\n"
            f"s = load_settings({str(REPO / 'lakeray.yaml')!r}, 'local', environ={{'LAKERAY_STORAGE__ROOT': {str(root)!r}}})\n"
            "h = start_ray(s)\n"
            "import ray, json\n"
            "nodes = [{'head': 'node:__internal_head__' in n['Resources'], 'cpus': n['Resources'].get('CPU', 0)}\n"
            "         for n in ray.nodes() if n['Alive']]\n"
            "print(json.dumps({'owns': h.owns_cluster, 'nodes': nodes}))\n"
            "h.shutdown()\n")], capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-3000:]
        used = json.loads(probe.stdout.strip().splitlines()[-1])
        assert used["owns"] is False
        assert sorted((n["head"], n["cpus"]) for n in used["nodes"]) == [(False, 1.0), (True, 0.0)]
        # The worker node runs inside a Spark executor of that application (its raylet descends from it).
        lines = _cmdlines()
        executors = {pid for pid, c in lines.items() if "CoarseGrainedExecutorBackend" in c and state["spark_app_id"] in c}
        raylets = [pid for pid, c in lines.items() if "/raylet" in c and state["temp_dir"] in c]
        assert executors and any(executors & set(_ancestors(pid)) for pid in raylets)

        shown = cluster_cli(root, "status", "--json")
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert json.loads(shown.stdout)["on_spark"]["spark_app_id"] == state["spark_app_id"]
    finally:
        stopped = cluster_cli(root, "down")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr[-2000:]
    assert _tagged(state["temp_dir"]) == [] and not alive(state["driver_pid"])
    assert not [pid for pid, c in _cmdlines().items() if state["spark_app_id"] in c]  # no executor left
    apps = httpx.get(f"{ui}/json/", timeout=5).json()
    assert apps["activeapps"] == [] and state["spark_app_id"] in [a["id"] for a in apps["completedapps"]]
    assert not (root / "cluster" / "state.json").exists()


def test_an_unreachable_master_fails_within_a_bounded_wait_and_starts_nothing(tmp_path):
    root = tmp_path / "lakehouse"
    url = f"spark://{LOOPBACK}:{free_port()}"  # nothing listens there
    started = time.monotonic()
    refused = cluster_cli(root, "up", "--on-spark", url, timeout=120)
    assert refused.returncode == 1 and f"the Spark master {url} does not answer" in refused.stderr
    assert time.monotonic() - started < 40
    assert not (root / "cluster" / "state.json").exists()
    from lakeray.cluster.on_spark import temp_root_for

    assert _tagged(temp_root_for(str(root))) == []
    bad = cluster_cli(root, "up", "--on-spark", "yarn", timeout=120)
    assert bad.returncode == 1 and "is not a Spark standalone master URL" in bad.stderr
