"""`make demo-cluster` end to end: cluster/scripts/demo_cluster.py with few rows, as users run it.

Two network-namespace hosts, S3Proxy, `cluster up --head` + `join`, the whole demo on the `cluster-local`
profile; asserted from its JSON: every stage done, the tables in the bucket, Spark executors and the two
training workers on both hosts, a prediction over HTTP; then nothing of it left: its namespaces, its
processes and S3Proxy gone (checked here by name and pid, not only by the script's own word).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = REPO / "cluster" / "scripts" / "demo_cluster.py"
HEAD_IP, WORKER_IP = "10.78.0.1", "10.78.0.2"


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def test_demo_cluster_runs_the_whole_demo_on_two_hosts_and_leaves_nothing(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("make demo-cluster makes network namespaces: the test needs root and iproute2's `ip`")
    before = _namespaces()
    done = subprocess.run([sys.executable, str(SCRIPT), "--rows", "5000", "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-5000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(got["stage_seconds"]) == ["spark", "data", "features", "training_set", "ray", "train", "serve",
                                          "predict"]
    assert got["training_set_rows"] == 5000 and got["auc"] is not None and got["model_version"] >= 1
    assert len(got["predictions"]) == 6 and all(0 <= p["fraud_probability"] <= 1 for p in got["predictions"])
    # Spark's own worker list and Ray's own actor records: both hosts did work.
    assert got["spark_worker_hosts"] == [HEAD_IP, WORKER_IP]
    assert sorted(got["train_nodes"]) == [HEAD_IP, WORKER_IP]
    assert got["serve_nodes"] and set(got["serve_nodes"]) <= {HEAD_IP, WORKER_IP}
    assert got["left_running"] == []
    # Independently of the script: no namespace of its own left, no process of its run alive.
    assert not {ns for ns in _namespaces() - before if ns.startswith("lrdc")}
    work = next(line.split("work folder ")[1].strip() for line in done.stderr.splitlines() if "work folder" in line)
    assert not os.path.exists(work)  # removed after a success
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    assert work.encode() not in fh.read(), f"pid {entry} of the demo is still running"
            except OSError:
                continue
