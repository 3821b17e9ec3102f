"""`lakeray tune` on an object-store root: a real S3Proxy on loopback, the project's profile naming
``s3://`` and the variables holding the credentials, the search folder in the bucket.

The search is `lakeray tune` as users run it (its own process, its own local Ray), killed (SIGKILL of
its whole process tree) once a trial has finished, and continued with ``--resume`` from what is in the
bucket: Tune's experiment state, the trials' results and checkpoints. Nothing of the search is on the
local disk; the best trial's model is registered with its artifacts in the bucket and loads from there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lakeray import storage
from tests.conftest import bucket_cli_env, bucket_storage, kill_tree, write_learnable

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUCKET = "lakeray-tune"
ROOT = f"s3://{BUCKET}/lakehouse"
KEY_VAR, SECRET_VAR = "LR_TUNE_S3_KEY", "LR_TUNE_S3_SECRET"
LAKERAY = os.path.join(os.path.dirname(sys.executable), "lakeray")
SEARCH = "bucket_search"
TRIALS, ROUNDS = 4, 800


@pytest.fixture(scope="module")
def project(s3proxy, tmp_path_factory):
    """A project folder whose profiles keep everything in a bucket of the session's S3Proxy
    (tests/conftest.py; the registry: local SQLite); ``no_tracking`` leaves mlflow.tracking_uri empty."""
    store = bucket_storage(s3proxy, BUCKET, ROOT, KEY_VAR, SECRET_VAR)
    folder = tmp_path_factory.mktemp("bucket_tune_project")
    (folder / "lakeray.yaml").write_text(textwrap.dedent(f"""\
        default_profile: bucket
        profiles:
          bucket:
            ray: {{op_timeout_s: 300}}
            storage: {json.dumps(store.model_dump(exclude_none=True))}
            mlflow: {{tracking_uri: "sqlite:///{folder}/mlflow.db", experiment: bucket_tune, model_name: bucket_tuned}}
          no_tracking:
            storage: {json.dumps(store.model_dump(exclude_none=True))}
        """))
    # One trial at a time, each long enough (800 rounds, depth 8) that the kill lands between trials.
    (folder / "tune.yaml").write_text(textwrap.dedent(f"""\
        name: {SEARCH}
        train:
          name: bucket_tuned
          model: {{kind: xgboost, rounds: {ROUNDS}, params: {{max_depth: 8, eta: 0.05}}}}
          training_set: tune_set
          label: label
          features: {{all_except: []}}
          split: {{kind: hash, column: row_id}}
          scaling: {{num_workers: 1, cpus_per_worker: 1, use_gpu: false}}
          registry: {{alias: challenger}}
        space: {{eta: {{loguniform: [0.01, 0.3]}}}}
        scheduler: {{kind: none}}
        num_samples: {TRIALS}
        max_concurrent: 1
        report_every: 50
        checkpoint_every: 100
        """))
    secrets = {KEY_VAR: s3proxy.access_key, SECRET_VAR: s3proxy.secret_key}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in secrets.items():
            mp.setenv(name, value)
        uri = storage.join(ROOT, "tables", "tune_set")
        write_learnable(uri, 12_000, 8, seed=11, storage_options=storage.delta_options(uri, store))
    return folder, store, secrets


def _objects(store, prefix: str) -> list:
    import pyarrow.fs as pa_fs

    filesystem = storage.to_arrow_fs(ROOT, store)[0]
    return filesystem.get_file_info(pa_fs.FileSelector(f"{BUCKET}/lakehouse/{prefix}", recursive=True,
                                                       allow_not_found=True))


def _terminated_in_state(store) -> dict[str, str]:
    """Trial id → its result.json, for the trials that Tune's experiment state in the bucket holds as
    TERMINATED (the driver uploads the state and the trials' result files together, every 2 s)."""
    folder = storage.join(ROOT, "tune_runs", SEARCH)
    states = sorted(n for n in storage.list_dir(folder) if n.startswith("experiment_state-") and n.endswith(".json"))
    if not states:
        return {}
    trials = [json.loads(t[0]) for t in json.loads(storage.read_text(storage.join(folder, states[-1])))["trial_data"]]
    done = {}
    for trial in trials:
        if trial["status"] == "TERMINATED":
            done[trial["trial_id"]] = storage.read_text(storage.join(folder, trial["relative_logdir"], "result.json"))
    return done


def test_a_search_in_the_bucket_is_killed_resumed_from_the_bucket_and_registers_the_best(project, monkeypatch):
    folder, store, secrets = project
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    env = bucket_cli_env(folder, secrets)
    storage.configure(store)  # this process reads the bucket with the same settings
    try:
        driver = subprocess.Popen([LAKERAY, "tune", "tune.yaml", "--json"], cwd=folder, env=env,
                                  start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            # Killed as soon as the state in the bucket holds a finished trial (the later ones still run).
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and driver.poll() is None and not _terminated_in_state(store):
                time.sleep(0.3)
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            kill_tree(driver.pid)
            driver.wait(30)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        before = _terminated_in_state(store)
        assert 1 <= len(before) < TRIALS, "the search finished before its driver was killed"

        # The search so far is only in the bucket: Tune's state and the first trial's checkpoints.
        assert not list(folder.rglob("tune_runs"))
        keys = [i.path for i in _objects(store, f"tune_runs/{SEARCH}")]
        assert any(k.endswith(f"{SEARCH}/tuner.pkl") for k in keys)
        assert any("/checkpoint_" in k and k.endswith("/model.ubj") for k in keys)

        time.sleep(2)
        resumed = subprocess.run([LAKERAY, "tune", "tune.yaml", "--resume", "--json"], cwd=folder, env=env,
                                 capture_output=True, text=True, timeout=400)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        summary = json.loads(resumed.stdout[resumed.stdout.index("{"):])
        assert summary["resumed"] and len(summary["trials"]) == TRIALS
        assert summary["folder"] == f"{ROOT}/tune_runs/{SEARCH}"
        assert all(t["final"] and t["rounds"] == ROUNDS for t in summary["trials"])
        assert summary["metrics"]["auc"] > 0.75
        # A finished trial was not started again: its results are what they were before the kill.
        after = _terminated_in_state(store)
        for trial_id, results in before.items():
            assert after[trial_id] == results, trial_id
            last = json.loads(results.splitlines()[-1])
            assert last["final"] and last["rounds"] == ROUNDS

        # Every trial's final checkpoint and lakeray's search record are objects; nothing local.
        infos = _objects(store, f"tune_runs/{SEARCH}")
        states = [i.path for i in infos if i.path.endswith("/lakeray_state.json")]
        # By trial id: a trial started after Tune's last state upload before the kill is not in the
        # restored state; the searcher draws it again (same id and config) into a new trial folder.
        with_checkpoints = {re.search(r"/_trial_([0-9a-f]+_\d{5})_", p).group(1) for p in states}
        assert with_checkpoints == {t["trial_id"] for t in summary["trials"]}
        assert any(i.path.endswith(f"{SEARCH}/lakeray_search.json") for i in infos)
        assert not list(folder.rglob("tune_runs"))
        state = json.loads(storage.read_text(storage.join(ROOT, "tune_runs", SEARCH, "lakeray_search.json")))
        assert summary["model"] == f"models:/bucket_tuned/{state['registered']['version']}"
    finally:
        storage.configure(None)

    # MLflow: the registry in local SQLite, the best model's artifacts (and the parent run's) in the bucket.
    import mlflow

    db = f"sqlite:///{folder}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=db, registry_uri=db)
    version = client.get_model_version_by_alias("bucket_tuned", "challenger")
    assert summary["model"].endswith(f"/{version.version}")
    assert client.get_run(version.run_id).info.artifact_uri.startswith(f"{ROOT}/mlartifacts/")
    assert client.get_run(summary["parent_run_id"]).info.artifact_uri.startswith(f"{ROOT}/mlartifacts/")
    artifacts = _objects(store, "mlartifacts")
    assert any(i.base_name == "MLmodel" for i in artifacts)
    assert any(i.path.endswith("plots/trials.png") for i in artifacts)

    # Loadable with only what a worker gets (the runtime env's variables, secrets by reference).
    from lakeray.serving.model import load_served_model

    for name, value in storage.worker_env(ROOT, store).items():
        monkeypatch.setenv(name, os.path.expandvars(value))
    served = load_served_model(db, f"models:/bucket_tuned/{version.version}")
    rows = [{**dict.fromkeys(served.features, 0.0), "f0": f0, "f1": -f0} for f0 in (2.0, -2.0)]
    scores = served.predict(served.matrix(rows))
    assert scores[0] > 0.5 > scores[1]


def test_wrong_credentials_fail_before_any_trial(project):
    folder, store, secrets = project
    started = time.perf_counter()
    proc = subprocess.run([LAKERAY, "tune", "tune.yaml", "--json"], cwd=folder,
                          env=bucket_cli_env(folder, {**secrets, SECRET_VAR: "not-the-secret"}), capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "rejected the credentials" in out
    assert f"storage.secret_key_env ({SECRET_VAR})" in out
    assert "Traceback" not in proc.stderr and "not-the-secret" not in out
    assert time.perf_counter() - started < 60


def test_search_folder_checks_in_the_bucket_and_no_tracking_uri_refused(project, monkeypatch):
    """No Ray: what the CLI checks before it starts one, against the bucket."""
    from lakeray.config import load_settings
    from lakeray.errors import ConfigError
    from lakeray.training.tune import check_search_folder, load_tune_spec, search_folder, validate_search

    folder, _, secrets = project
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    try:
        settings = load_settings(folder / "lakeray.yaml")
        assert search_folder(settings, "fresh") == f"{ROOT}/tune_runs/fresh"
        assert check_search_folder(settings, "fresh", resume=False) == f"{ROOT}/tune_runs/fresh"
        with pytest.raises(ConfigError, match="no search 'fresh' to resume"):
            check_search_folder(settings, "fresh", resume=True)
        storage.write_text_atomic(storage.join(ROOT, "tune_runs", "taken", "lakeray_search.json"), "{}")
        with pytest.raises(ConfigError, match="already exists"):
            check_search_folder(settings, "taken", resume=False)

        spec = load_tune_spec(str(folder / "tune.yaml"))
        no_tracking = load_settings(folder / "lakeray.yaml", "no_tracking")
        with pytest.raises(ConfigError, match="mlflow.tracking_uri is empty"):
            validate_search(no_tracking, spec, "tune.yaml")
        setup, plan = validate_search(no_tracking, spec, "tune.yaml", register=False)  # --no-register: fine
        assert setup.tune.name == SEARCH and plan.num_workers == 1
    finally:
        storage.configure(None)
