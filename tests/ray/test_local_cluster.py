"""`lakeray cluster up|status|down`: a local Ray (head + a worker node) and a Spark standalone master +
worker that outlive one command; lakeray commands use it; `down` leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lakeray.cluster.processes import alive
from tests.conftest import REPO, cluster_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

def _processes_with(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    zombie = fh.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                continue
            if text in cmdline and not zombie:
                found.append(int(entry))
    return found


def test_up_status_use_and_down_leave_nothing_behind(tmp_path):
    root = tmp_path / "lakehouse"
    started = cluster_cli(root, "up", "--workers", "1", "--head-cpus", "2")
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        state = json.loads((root / "cluster" / "state.json").read_text())
        assert _processes_with(state["temp_dir"]), "no Ray process carries the cluster's temp dir"

        shown = cluster_cli(root, "status", "--json")
        assert shown.returncode == 0, shown.stderr[-3000:]
        info = json.loads(shown.stdout)
        # Ray's own node list: the head and the worker node; Spark's own worker list: one, alive.
        assert len(info["nodes"]) == 2 and sum(n["head"] for n in info["nodes"]) == 1
        assert info["cpus"] == 3
        assert [w["state"] for w in info["spark_workers"]] == ["ALIVE"]
        assert info["dashboard_url"].startswith("http://127.0.0.1:")

        again = cluster_cli(root, "up")
        assert again.returncode == 1 and "already running" in again.stderr

        # A lakeray command of this project connects to the cluster instead of starting a private Ray.
        command = ("from lakeray.config import load_settings\n"
                   "from lakeray.cluster.ray_runtime import start_ray\n"
                   f"s = load_settings({str(REPO / 'lakeray.yaml')!r}, 'local', environ={{'LAKERAY_STORAGE__ROOT': {str(root)!r}}})\n"
                   "h = start_ray(s)\n"
                   "import ray, json\n"
                   "print(json.dumps({'owns': h.owns_cluster, 'cpus': h.num_cpus, 'nodes': len(ray.nodes())}))\n"
                   "h.shutdown()\n")
        probe = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-3000:]
        used = json.loads(probe.stdout.strip().splitlines()[-1])
        assert used == {"owns": False, "cpus": 3.0, "nodes": 2}

        # A host joining with a token that is not the head's: one line naming where the token came from,
        # before anything starts (another storage root: this "host" has no record of the head).
        wrong = tmp_path / "wrong_token"
        wrong.write_text(os.urandom(32).hex())
        joiner = tmp_path / "joiner"
        before = set(_processes_with("lakeray-rayj-"))
        refused = cluster_cli(joiner, "join", state["ray_address"], "--no-spark", "--cpus", "1", "--token-file", str(wrong))
        assert refused.returncode == 1
        headline = refused.stderr.strip().splitlines()[0]
        assert headline.endswith(f"the head at {state['ray_address']} refused this host's Ray token "
                                 f"(from --token-file {wrong}): it is not the head's"), refused.stderr
        assert "--token-file" in refused.stderr.splitlines()[1] and wrong.read_text() not in refused.stderr
        assert set(_processes_with("lakeray-rayj-")) == before and not (joiner / "cluster" / "hosts").exists()
        # The same for a lakeray command on a host with the wrong token: one error naming it, at once
        # (Ray itself retries for ~20 s, then says "Failed to connect").
        denied = subprocess.run([sys.executable, "-c", command], env={**os.environ, "RAY_AUTH_TOKEN_PATH": str(wrong)},
                                capture_output=True, text=True, timeout=120)
        assert denied.returncode == 1
        assert (f"ClusterError: the Ray cluster at {state['ray_address']} refused this host's token "
                f"(RAY_AUTH_TOKEN_PATH={wrong})") in denied.stderr, denied.stderr[-2000:]
    finally:
        stopped = cluster_cli(root, "down")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert not _processes_with(state["temp_dir"])
    assert not any(alive(pid) for pid in state["spark_pids"])
    assert not (root / "cluster" / "state.json").exists()
    # After down, status says there is none (exit 1) and a second down is a no-op.
    assert cluster_cli(root, "status").returncode == 1
    assert "no lakeray cluster was running" in cluster_cli(root, "down").stdout
