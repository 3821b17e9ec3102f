"""The README's command walk-through, run line by line as a user would, and `lakeray init` + `lakeray demo`.

The commands and the curl body are read out of README.md, so the document and this test cannot drift.
"""

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.e2e.conftest import LAKERAY, ROWS, user_env

pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.ray]


def walkthrough_commands() -> list[list[str]]:
    """The lakeray commands between the README's walkthrough markers, comments dropped."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", readme, re.S)
    assert block, "README.md lost its <!-- walkthrough:start/end --> block"
    commands = [shlex.split(line, comments=True) for line in block.group(1).splitlines()]
    return [c for c in commands if c]


def curl_body() -> dict:
    """The JSON body of the README's curl example against /predict."""
    readme = (REPO / "README.md").read_text()
    curl = re.search(r"curl -s localhost:8000/predict .*?-d '(.*?)'", readme, re.S)
    assert curl, "README.md lost its curl example"
    return json.loads(curl.group(1))


def wait_for_health(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> dict:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"lakeray serve exited {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            reply = httpx.get(f"{url}/healthz", timeout=5)
            if reply.status_code == 200:
                return reply.json()
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"no healthy endpoint at {url} after {timeout_s} s:\n{log.read_text()[-4000:]}")


def test_the_readme_walkthrough_works_in_order_and_serves_the_curl_body(tmp_path):
    import httpx

    commands = walkthrough_commands()
    assert [c[:3] for c in commands] == [["lakeray", "data", "generate"], ["lakeray", "features", "run"],
                                         ["lakeray", "features", "training-set"],
                                         ["lakeray", "train", "jobs/training/fraud_xgboost.yaml"],
                                         ["lakeray", "models", "promote"], ["lakeray", "serve"]]
    port = free_port()
    env = user_env(LAKERAY_STORAGE__ROOT=str(tmp_path / "lakehouse"), LAKERAY_SERVE__PORT=str(port))
    *batch, serve = commands
    for command in batch:
        if "--rows" in command:  # the README's size, made small
            command[command.index("--rows") + 1] = str(ROWS)
        done = subprocess.run([LAKERAY, *command[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{shlex.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}"

    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([LAKERAY, *serve[1:]], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            health = wait_for_health(url, proc, log)
            body = curl_body()
            assert sorted(body["instances"][0]) == sorted(health["features"])
            reply = httpx.post(f"{url}/predict", json=body, timeout=30)
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            assert len(answer["predictions"]) == 1 and 0.0 <= answer["predictions"][0] <= 1.0
            assert answer["model"] == "lakeray_fraud_xgb" and answer["model_version"] == 1
            # SIGTERM, as a supervisor (or a shell that backgrounded it, where SIGINT is ignored) stops it.
            deadline = time.monotonic() + 60
            while "Ctrl-C stops" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert "stopping" in log.read_text()


def test_init_then_demo_in_a_new_folder_without_config(init_project):
    project, summary = init_project.path, init_project.summary
    assert f"cd {project}" in init_project.init_stdout and "lakeray demo" in init_project.init_stdout
    assert 0.6 < summary["auc"] <= 1.0 and summary["training_set_rows"] == ROWS
    assert Path(summary["feature_job_source"]) == project / "jobs" / "features" / "customer_aggregates.py"
    preds = summary["predictions"]
    assert len(preds) >= 2 and all(0.0 <= p["fraud_probability"] <= 1.0 for p in preds)
    assert all(p["model_version"] == summary["model_version"] for p in preds)
    # Everything it wrote is inside the project: the lakehouse and MLflow store of its lakeray.yaml.
    assert (project / "lakehouse" / "tables" / "fraud_training_set" / "_delta_log").is_dir()
    assert (project / "lakehouse" / "mlflow.db").is_file()
