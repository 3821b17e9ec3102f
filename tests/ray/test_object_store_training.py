"""`lakeray train` on an object-store root: a real S3Proxy on loopback, the project's profile naming
``s3://`` and the variables holding the credentials, nothing on the local disk.

The run is `lakeray train` as users run it (its own process, its own local Ray), with the storage
settings only in the config file: the Ray workers see no ``LAKERAY_STORAGE__*`` unless lakeray puts them
in the runtime env, so reading the training set at all proves that hand-off. Rank 0 is SIGKILLed after a
checkpoint; Ray Train restarts the group from the checkpoint in the bucket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path  # local folders only: the S3Proxy data folder and the project folder

import pytest

from lakeray import storage
from tests.conftest import bucket_cli_env, bucket_storage, write_learnable

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUCKET = "lakeray-train"
ROOT = f"s3://{BUCKET}/lakehouse"
KEY_VAR, SECRET_VAR = "LR_TRAIN_S3_KEY", "LR_TRAIN_S3_SECRET"
LAKERAY = os.path.join(os.path.dirname(sys.executable), "lakeray")


@pytest.fixture(scope="module")
def project(s3proxy, tmp_path_factory):
    """A project folder whose only profile keeps everything in the bucket (the registry: local SQLite), on
    the session's S3Proxy (tests/conftest.py)."""
    store = bucket_storage(s3proxy, BUCKET, ROOT, KEY_VAR, SECRET_VAR)
    folder = tmp_path_factory.mktemp("bucket_project")
    (folder / "lakeray.yaml").write_text(textwrap.dedent(f"""\
        default_profile: bucket
        profiles:
          bucket:
            ray: {{op_timeout_s: 300}}
            storage: {json.dumps(store.model_dump(exclude_none=True))}
            mlflow: {{tracking_uri: "sqlite:///{folder}/mlflow.db", experiment: bucket, model_name: bucket_xgb}}
        """))
    (folder / "train.yaml").write_text(textwrap.dedent("""\
        name: bucket_xgb
        model: {kind: xgboost, rounds: 300, params: {max_depth: 8, eta: 0.05}}
        training_set: bucket_set
        label: label
        features: {all_except: []}
        split: {kind: hash, column: row_id}
        scaling: {num_workers: 2, cpus_per_worker: 1}
        checkpoint_every: 10
        max_failures: 2
        registry: {alias: challenger}
        """))
    env = {KEY_VAR: s3proxy.access_key, SECRET_VAR: s3proxy.secret_key}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        uri = storage.join(ROOT, "tables", "bucket_set")
        write_learnable(uri, 20_000, 8, seed=3, files=4, storage_options=storage.delta_options(uri, store))
    return folder, store, env


def _bucket_fs(store):
    return storage.to_arrow_fs(ROOT, store)[0]


def _progress(store, run_dir: str) -> list[dict]:
    try:
        text = storage.read_text(storage.join(run_dir, "progress.jsonl"))
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_lakeray_train_keeps_its_run_checkpoints_and_artifacts_in_the_bucket(project, monkeypatch):
    import mlflow
    import pyarrow.fs as pa_fs

    folder, store, secrets = project
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    storage.configure(store)  # this process reads the bucket with the same settings
    try:
        proc = subprocess.Popen([LAKERAY, "train", "train.yaml", "--json"],
                                cwd=folder, env=bucket_cli_env(folder, secrets), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        runs = storage.join(ROOT, "train_runs")
        killed: dict = {}
        deadline = time.monotonic() + 240
        # SIGKILL rank 0 (the progress writer) once a checkpoint at round >= 30 is in the bucket.
        while proc.poll() is None and not killed and time.monotonic() < deadline:
            for run_id in storage.list_dir(runs):
                ckpt = [e for e in _progress(store, storage.join(runs, run_id)) if e["event"] == "checkpoint"]
                if ckpt and ckpt[-1]["step"] >= 30:
                    os.kill(ckpt[-1]["pid"], signal.SIGKILL)
                    killed.update(pid=ckpt[-1]["pid"], step=ckpt[-1]["step"])
            time.sleep(0.3)
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        assert proc.returncode == 0, out[-2000:] + err[-4000:]
        summary = json.loads(out[out.index("{"):])

        # The run folder and Ray Train's checkpoints are objects in the bucket.
        run_dir = storage.join(runs, summary["run_id"])
        names = storage.list_dir(run_dir)
        assert {"run.json", "progress.jsonl"} <= set(names)
        final = [n for n in names if n.startswith("checkpoint_") and n.endswith("_final")]
        assert final and {"model.ubj", "lakeray_state.json"} <= set(storage.list_dir(storage.join(run_dir, final[0])))
        infos = _bucket_fs(store).get_file_info(pa_fs.FileSelector(f"{BUCKET}/lakehouse/train_runs", recursive=True))
        assert any(i.path.endswith("/model.ubj") and i.size > 0 for i in infos)
        assert not [p for p in folder.iterdir() if p.name.startswith("s3") or p.name in ("lakehouse", "train_runs")]

        # The killed group restarted from a checkpoint read back from the bucket, and finished every round.
        assert killed and summary["path"] == "ray-train" and summary["restarts"] >= 1
        assert summary["steps"] == 300 and summary["metrics"]["auc"] > 0.75
        resumed = [e for e in _progress(store, run_dir) if e["event"] == "resumed"]
        assert resumed and 10 <= resumed[0]["step"] <= 300

        # MLflow: the registry stays in local SQLite, the artifacts are in the bucket.
        # registry_uri too: an earlier test in this process may have set a global registry URI, which a
        # client given only tracking_uri would use.
        db = f"sqlite:///{folder}/mlflow.db"
        client = mlflow.MlflowClient(tracking_uri=db, registry_uri=db)
        version = client.get_model_version_by_alias("bucket_xgb", "challenger")
        artifact_uri = client.get_run(version.run_id).info.artifact_uri
        assert artifact_uri.startswith(f"{ROOT}/mlartifacts/")
        artifacts = _bucket_fs(store).get_file_info(pa_fs.FileSelector(f"{BUCKET}/lakehouse/mlartifacts",
                                                                       recursive=True))
        assert any(i.base_name == "MLmodel" for i in artifacts)
        assert any(i.path.endswith("lakeray/spec.json") for i in artifacts)
    finally:
        storage.configure(None)

    # A Serve replica (or any worker) has what the runtime env gives it: the LAKERAY_STORAGE__* and boto3
    # variables, secrets as ${NAME} expanded from the node's own environment. With only that, the
    # replica's loader reads the registered version and its features.json from the bucket, and scores.
    from lakeray.serving.model import load_served_model

    worker = storage.worker_env(ROOT, store)
    assert secrets[SECRET_VAR] not in json.dumps(worker) and worker["AWS_SECRET_ACCESS_KEY"] == f"${{{SECRET_VAR}}}"
    for name, value in worker.items():
        monkeypatch.setenv(name, os.path.expandvars(value))
    # Deploy pins the alias to its version (models:/name/N) before the replica loads it.
    served = load_served_model(f"sqlite:///{folder}/mlflow.db", f"models:/bucket_xgb/{version.version}")
    assert served.version == int(version.version) and served.features[:2] == ["f0", "f1"]
    rows = [{**dict.fromkeys(served.features, 0.0), "f0": f0, "f1": -f0} for f0 in (2.0, -2.0)]
    scores = served.predict(served.matrix(rows))
    assert scores[0] > 0.5 > scores[1]


def test_wrong_credentials_fail_before_any_worker_starts(project):
    folder, _, secrets = project
    started = time.perf_counter()
    proc = subprocess.run([LAKERAY, "train", "train.yaml", "--json"], cwd=folder,
                          env=bucket_cli_env(folder, {**secrets, SECRET_VAR: "not-the-secret"}), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "rejected the credentials" in proc.stdout + proc.stderr
    assert f"storage.secret_key_env ({SECRET_VAR})" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and time.perf_counter() - started < 60
    assert "not-the-secret" not in proc.stdout + proc.stderr


def test_one_worker_checkpoints_and_progress_are_objects_and_resume_from_the_bucket(project, monkeypatch):
    """The one-worker path (a Ray task) writes its own checkpoints: upload complete folders, state file
    last; a folder without it (an upload cut short) is never picked; resume downloads the newest."""
    from types import SimpleNamespace

    from lakeray.training.runtime import RunFolder, _TaskContext, latest_checkpoint

    _, store, secrets = project
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    storage.configure(store)
    try:
        run = RunFolder(storage.join(ROOT, "train_runs"), "one-worker")
        plan = SimpleNamespace(cpus_per_worker=1)

        def model(text: str):
            return lambda folder: Path(folder, "model.txt").write_text(text)

        first = _TaskContext(plan, run, 0, 1, False, 0)
        first.progress(0, {}, "started")
        first.progress(10, {"valid_auc": 0.7})
        first.checkpoint(10, {"valid_auc": 0.7}, model("ten"))
        first.checkpoint(20, {"valid_auc": 0.8}, model("twenty"), final=True)
        storage.write_text_atomic(storage.join(run.path, "checkpoint_000030", "model.txt"), "cut short")
        newest = latest_checkpoint(run.path)
        assert newest == f"{ROOT}/train_runs/one-worker/checkpoint_000020_final"
        found, step = _TaskContext(plan, run, 0, 1, False, 1).resume()
        assert step == 20 and Path(found, "model.txt").read_text() == "twenty" and storage.is_local(found)
        events = [json.loads(line) for line in storage.read_text(run.progress_file).splitlines()]
        assert [e["event"] for e in events] == ["started", "step", "checkpoint", "checkpoint", "resumed"]
        assert [e["attempt"] for e in events] == [0, 0, 0, 0, 1]
    finally:
        storage.configure(None)
