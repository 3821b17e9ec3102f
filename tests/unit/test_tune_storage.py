"""Where a search keeps its folder: a local folder, or a URI in the bucket with Tune's filesystem (no
secrets in it); checkpoint locations Tune reports as ``bucket/key`` become URIs again; an object-store
root without an MLflow tracking URI is refused with the spec, before the bucket or Ray is touched."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import pytest

from lakeray import storage
from lakeray.errors import ConfigError
from lakeray.training.tune import search_folder, tune_storage, validate_search
from lakeray.training.tune_tracking import trial_checkpoint


def _settings(root: str):
    from lakeray.config import load_settings

    return load_settings(None, environ={"LAKERAY_STORAGE__ROOT": root})


def test_search_folder_is_a_uri_on_an_object_store_and_an_absolute_folder_locally(tmp_path, monkeypatch):
    assert search_folder(_settings("s3a://b/lake/"), "s1") == "s3a://b/lake/tune_runs/s1"
    monkeypatch.chdir(tmp_path)
    assert search_folder(_settings("lake"), "s1") == os.path.join(str(tmp_path), "lake", "tune_runs", "s1")


def test_tune_gets_the_bucket_filesystem_without_secrets_and_nothing_for_a_folder(monkeypatch, tmp_path):
    from lakeray.config import StorageConfig

    assert tune_storage(str(tmp_path)) == (None, str(tmp_path))
    monkeypatch.setenv("MY_KEY", "AKIA-DISTINCT-KEY")
    monkeypatch.setenv("MY_SECRET", "s3cr3t-DISTINCT-VALUE")
    store = StorageConfig(root="s3a://b/lake", endpoint_url="http://127.0.0.1:9000", access_key_env="MY_KEY",
                          secret_key_env="MY_SECRET", path_style=True, allow_http=True, timeout_s=7)
    saved = storage._default
    storage.configure(store)
    try:
        filesystem, path = tune_storage("s3a://b/lake/tune_runs/s1")
    finally:
        storage.configure(saved)
    assert path == "b/lake/tune_runs/s1"
    assert b"DISTINCT" not in pickle.dumps(filesystem)  # Tune saves it in tuner.pkl and ships it to trials


def test_trial_checkpoints_in_a_bucket_are_uris_and_local_ones_folders(tmp_path):
    one_worker = SimpleNamespace(checkpoint=SimpleNamespace(path="b/lake/tune_runs/s1/t0/checkpoint_000002"),
                                 metrics={})
    assert trial_checkpoint(one_worker, "s3://b/lake/tune_runs/s1") == \
        "s3://b/lake/tune_runs/s1/t0/checkpoint_000002"
    local = SimpleNamespace(checkpoint=SimpleNamespace(path=str(tmp_path / "checkpoint_000002")), metrics={})
    assert trial_checkpoint(local, str(tmp_path)) == str(tmp_path / "checkpoint_000002")
    # A multi-worker trial's Ray Train checkpoint comes as checkpoint_path, counted only when it is there.
    (tmp_path / "run" / "checkpoint_000060_final").mkdir(parents=True)
    reported = SimpleNamespace(checkpoint=None, metrics={"checkpoint_path": str(tmp_path / "run" / "checkpoint_000060_final")})
    assert trial_checkpoint(reported, str(tmp_path)) == str(tmp_path / "run" / "checkpoint_000060_final")
    gone = SimpleNamespace(checkpoint=None, metrics={"checkpoint_path": str(tmp_path / "run" / "checkpoint_000080")})
    assert trial_checkpoint(gone, str(tmp_path)) is None
    assert trial_checkpoint(SimpleNamespace(checkpoint=None, metrics={}), str(tmp_path)) is None


def test_an_object_store_root_without_a_tracking_uri_is_refused_with_the_spec():
    from lakeray.training.tune_spec import TuneSpec

    spec = TuneSpec.parse({"name": "s1", "train": {"name": "b", "model": {"kind": "xgboost", "rounds": 20},
                                                   "training_set": "t", "label": "label"},
                           "space": {"eta": {"loguniform": [0.01, 0.3]}}}, "s1.yaml")
    # No store answers at this root: the refusal comes before any request, and before the spec's data.
    with pytest.raises(ConfigError, match="mlflow.tracking_uri is empty"):
        validate_search(_settings("s3://no-such-bucket/lake"), spec, "s1.yaml")
