"""`lakeray demo` end to end, as a user runs it: a subprocess on the CLI, small size, real everything. The
first run is the one in a folder `lakeray init` made (tests/e2e/conftest.py); the re-runs go to the same folder."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import LAKERAY, ROWS

pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.ray]

KEYS = {"rows", "feature_table", "feature_table_version", "auc", "model_uri", "endpoint", "predictions"}


def keep_serving_demo(project: Path, env, log: Path) -> dict:
    """`demo --json --keep-serving`: the summary comes out while the endpoint is up; Ctrl-C ends it cleanly."""
    import queue
    import threading

    import httpx

    with log.open("w") as stderr:
        proc = subprocess.Popen([LAKERAY, "demo", "--json", "--keep-serving", "--rows", str(ROWS)], cwd=project,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
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
def first_run(init_project):
    """The first demo in a folder `lakeray init` made (tests/e2e/conftest.py; test_readme_walkthrough checks
    the folder): its lakehouse is where the re-runs below write."""
    return init_project.summary


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


def test_interrupted_demo_exits_cleanly_and_the_next_run_succeeds(first_run, init_project, tmp_path):
    from lakeray.lakehouse.delta import read_arrow

    env, root = init_project.env, init_project.path / "lakehouse"
    proc = subprocess.Popen([LAKERAY, "demo", "--json", "--rows", str(ROWS)], cwd=init_project.path,
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

    second = keep_serving_demo(init_project.path, env, tmp_path / "keep-serving.log")
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
