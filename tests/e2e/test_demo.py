"""`lakeray demo` end to end, as a user runs it: a subprocess on the CLI, small size, real everything."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.ray]

LAKERAY = str(Path(sys.executable).parent / "lakeray")
ROWS = 20_000
KEYS = {"rows", "feature_table", "feature_table_version", "auc", "model_uri", "endpoint", "predictions"}


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-lakehouse")
    # Not the HAProxy ports and paths that this test process's own Ray (tests/ray, when it ran first) put in
    # os.environ: the demo's cluster must pick its own, as it does for a user.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_HAPROXY_")}
    env = dict(inherited, LAKERAY_STORAGE__ROOT=str(root), LAKERAY_SERVE__PORT=str(free_port()),
               LAKERAY_SPARK__DRIVER_MEMORY="2g", LAKERAY_SPARK__SHUFFLE_PARTITIONS="4")
    return env, root


def run_demo(env) -> dict:
    result = subprocess.run([LAKERAY, "--config", str(REPO / "lakeray.yaml"), "demo", "--json", "--rows", str(ROWS)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def keep_serving_demo(env, log: Path) -> dict:
    """`demo --json --keep-serving`: the summary comes out while the endpoint is up; Ctrl-C ends it cleanly."""
    import queue
    import threading

    import httpx

    with log.open("w") as stderr:
        proc = subprocess.Popen([LAKERAY, "--config", str(REPO / "lakeray.yaml"), "demo", "--json", "--keep-serving",
                                 "--rows", str(ROWS)], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        try:
            summary = json.loads(lines.get(timeout=900))
            # Still serving after the summary: the endpoint answers until the interrupt.
            row = {f: 1.0 for f in summary["features"]}
            reply = httpx.post(f"{summary['endpoint']}/predict", json={"instances": [row]}, timeout=30)
            assert reply.status_code == 200 and reply.json()["model_version"] == summary["model_version"]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "serving at " + summary["endpoint"] in log.read_text()
    return summary


@pytest.fixture(scope="module")
def first_run(demo_env):
    return run_demo(demo_env[0])


def test_demo_json_summary(first_run):
    assert KEYS <= first_run.keys()
    assert first_run["rows"] == ROWS and first_run["feature_table"] == "customer_aggregates"
    assert first_run["feature_rows"] == ROWS
    assert 0.6 < first_run["auc"] <= 1.0
    assert first_run["model_uri"].startswith("models:/lakeray_fraud_xgb@champion")
    assert first_run["endpoint"].startswith("http://127.0.0.1:")
    preds = first_run["predictions"]
    assert len(preds) >= 2 and all(0.0 <= p["fraud_probability"] <= 1.0 for p in preds)
    assert all(p["model_version"] == first_run["model_version"] for p in preds)
    assert set(first_run["stage_seconds"]) == {"spark", "data", "features", "training_set", "ray", "train", "serve",
                                               "predict"}
    assert first_run["training_set_rows"] == ROWS and all(first_run["feature_checks"].values())


def test_interrupted_demo_exits_cleanly_and_the_next_run_succeeds(first_run, demo_env):
    from lakeray.lakehouse.delta import read_arrow

    env, root = demo_env
    proc = subprocess.Popen([LAKERAY, "--config", str(REPO / "lakeray.yaml"), "demo", "--json", "--rows", str(ROWS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # Interrupt while Ray is up (training running): the worst moment to leave things behind.
    deadline = time.monotonic() + 600
    seen = ""
    while "start Ray" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
    assert "start Ray" in seen, seen[-3000:]
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, proc.stderr.read()[-3000:]

    second = keep_serving_demo(env, root.parent / "keep-serving.log")
    # Re-running overwrites: new versions, the same rows, never duplicated.
    assert second["source_table_version"] > first_run["source_table_version"]
    assert second["feature_table_version"] > first_run["feature_table_version"]
    assert second["feature_rows"] == ROWS
    tables = root / "tables"
    assert read_arrow(str(tables / "transactions")).num_rows == ROWS
    assert read_arrow(str(tables / "customer_aggregates")).num_rows == ROWS
    assert second["model_version"] > first_run["model_version"]
    assert second["training_set_hash"] == first_run["training_set_hash"]  # same seed: same rows, bit for bit
    assert second["auc"] == pytest.approx(first_run["auc"], abs=1e-9)  # same seed, same data, same model
