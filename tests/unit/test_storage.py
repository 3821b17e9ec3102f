"""Storage URIs: joins never lose the ``//`` of a URI, local paths stay what they were, and no module
builds a storage path with pathlib."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lakeray import storage
from lakeray.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "lakeray"


@pytest.mark.parametrize(("base", "parts", "expected"), [
    ("s3a://bucket", ("x",), "s3a://bucket/x"),
    ("s3a://bucket/", ("x", "y.json"), "s3a://bucket/x/y.json"),
    ("s3://bucket/lakehouse", ("tables", "t1"), "s3://bucket/lakehouse/tables/t1"),
    ("s3://bucket/lakehouse/", ("/_manifests/", "ts", "v3.json"), "s3://bucket/lakehouse/_manifests/ts/v3.json"),
    ("/data/lakehouse", ("tables", "t1"), "/data/lakehouse/tables/t1"),
    ("relative/lake", ("tables",), os.path.join("relative/lake", "tables")),
    ("file:///data/lake", ("t",), "file:///data/lake/t"),
])
def test_join(base, parts, expected):
    assert storage.join(base, *parts) == expected
    assert ":/" not in expected.replace("://", "")


def test_join_with_no_parts_is_the_base():
    assert storage.join("s3://b/x") == "s3://b/x"
    assert storage.join("/data", "", "/") == "/data"


def test_parent_name_and_scheme():
    assert storage.parent("s3a://b/x/y.json") == "s3a://b/x"
    assert storage.parent("s3a://b/x/") == "s3a://b"
    assert storage.parent("/data/x/y.json") == "/data/x"
    assert storage.name("s3://b/x/v3.json") == "v3.json"
    assert storage.name("/data/x/") == "x"
    assert [storage.scheme(u) for u in ("s3://b", "S3A://b", "/x", "file:///x", "x")] == ["s3", "s3a", "", "file", ""]
    assert storage.is_local("/x") and storage.is_local("file:///x") and not storage.is_local("s3://b/x")


def test_engine_schemes_round_trip():
    assert storage.to_spark("s3://b/x") == "s3a://b/x"
    assert storage.to_spark("s3a://b/x") == "s3a://b/x"
    assert storage.to_arrow("s3a://b/x") == "s3://b/x"
    assert storage.to_arrow("/data/x") == storage.to_spark("/data/x") == "/data/x"


def test_local_file_operations(tmp_path):
    root = str(tmp_path / "lake")
    target = storage.join(root, "_manifests", "ts", "v1.json")
    assert not storage.exists(target) and storage.list_dir(root) == []
    storage.write_text_atomic(target, '{"a": 1}\n')
    assert storage.read_text(target) == '{"a": 1}\n'
    assert storage.list_dir(storage.parent(target)) == ["v1.json"]  # no temporary file left beside it
    assert storage.is_dir(storage.join(root, "_manifests")) and not storage.is_dir(target)
    storage.remove(storage.join(root, "_manifests"))
    assert not storage.exists(target)
    storage.remove(target)  # gone already: no error


def test_settings_table_path_keeps_the_uri(tmp_path):
    from lakeray.config import load_settings

    settings = load_settings(None, environ={"LAKERAY_STORAGE__ROOT": "s3a://bucket/lake/"})
    assert settings.table_path("t1") == "s3a://bucket/lake/tables/t1"
    local = load_settings(None, environ={"LAKERAY_STORAGE__ROOT": str(tmp_path)})
    assert local.table_path("t1") == f"{tmp_path}/tables/t1"


def test_storage_settings_feed_every_engine(monkeypatch):
    from lakeray.config import StorageConfig

    monkeypatch.setenv("MY_KEY", "AKIA1")
    monkeypatch.setenv("MY_SECRET", "s3cr3t")
    cfg = StorageConfig(root="s3://b/lake", endpoint_url="http://127.0.0.1:9000", access_key_env="MY_KEY",
                        secret_key_env="MY_SECRET", path_style=True, allow_http=True)
    conf = storage.spark_conf(cfg)
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    assert conf["spark.hadoop.fs.s3a.access.key"] == "AKIA1" and conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3.impl"] == "org.apache.hadoop.fs.s3a.S3AFileSystem"
    options = storage.delta_options("s3a://b/lake/t", cfg)
    assert options["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and options["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert options["AWS_ALLOW_HTTP"] == "true" and options["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] == "false"
    assert storage.delta_options("/local/t", cfg) is None
    filesystem, path = storage.to_arrow_fs("s3a://b/lake/t", cfg)
    assert type(filesystem).__name__ == "S3FileSystem" and path == "b/lake/t"


def test_storage_settings_errors_name_the_setting(monkeypatch):
    from lakeray.config import StorageConfig, load_settings

    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    cfg = StorageConfig(root="s3://b", endpoint_url="http://h:1", access_key_env="NOT_SET_ANYWHERE",
                        secret_key_env="NOT_SET_ANYWHERE", allow_http=True)
    with pytest.raises(ConfigError, match=r"storage.access_key_env names the environment variable NOT_SET_ANYWHERE"):
        storage.delta_options("s3://b/t", cfg)
    with pytest.raises(ConfigError, match=r"storage.allow_http is off"):
        storage.spark_conf(cfg.model_copy(update={"allow_http": False}))
    with pytest.raises(ConfigError, match=r"storage.secret_key_env: .*NAME of an environment variable"):
        load_settings(None, environ={"LAKERAY_STORAGE__SECRET_KEY_ENV": "wJalr/XUtnFEMI+K7MDENG"})


# Local-only uses of pathlib / os.path in the package, each for a reason (file:line-independent:
# module → what the uses are for). Anything else that builds paths must go through lakeray.storage.
_LOCAL_ONLY = {
    "storage/": "the one package that joins paths (os.path for local ones)",
    "config.py": "the config file and the project folder are local",
    "features/spec.py": "feature job source files",
    "features/runner.py": "feature job folders in the project; the run ledger only for a local root",
    "features/imports.py": "local import sources (URIs are passed to Spark as they are)",
    "features/catalog.py": "list_tables refuses object-store roots before touching the folder",
    "demo.py": "the example project shipped in the package",
    "registry.py": "the sqlite file of a local MLflow store",
    "cli/": "click path arguments and `lakeray init` targets are local files",
    "cluster/": "local cluster state, logs, cached jars and the S3Proxy process",
    "lakehouse/spark.py": "the jar cache and Java",
    "lakehouse/delta.py": "Hadoop's own org.apache.hadoop.fs.Path (any scheme)",
    # Training run folders (run.json, progress, checkpoints) go through lakeray.storage (runtime.py and
    # api.py are in the clean list below); what is left is truly local:
    "training/xgboost_trainer.py": "model files in a checkpoint's local (temporary or downloaded) folder",
    "training/torch_trainer.py": "model files in a checkpoint's local folder; the model module's source file",
    "training/tracking.py": "plots written to a local temporary folder before MLflow uploads them",
    "training/tune": "Ray Tune folders (refused on an object-store root), tune spec files",
    "serving/client.py": "the project's serving specs",
    "scheduler/": "DAGSTER_HOME (refused on an object-store root), feature code folders, spec files, /proc",
}
# The modules that handle storage paths: never whitelisted (storage.py itself joins local paths with os.path).
_STORAGE_MODULES_MUST_BE_CLEAN = ["features/training_sets.py", "features/retention.py", "training/spec.py",
                                  "training/lineage.py", "training/ingest.py", "training/runtime.py",
                                  "training/api.py"]


def _path_uses(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if re.search(r"(?<![\w.])Path\(|\bpathlib\b|os\.path\.join\(", line) and "fs.Path(" not in line
            and "click.Path(" not in line and "hadoop" not in line]


def test_storage_paths_are_not_built_with_pathlib():
    offenders = {}
    for module in sorted(PACKAGE.rglob("*.py")):
        rel = module.relative_to(PACKAGE).as_posix()
        uses = _path_uses(module.read_text())
        if not uses:
            continue
        if rel in _STORAGE_MODULES_MUST_BE_CLEAN or not any(rel.startswith(k) for k in _LOCAL_ONLY):
            offenders[rel] = uses
    assert offenders == {}, ("build storage paths with lakeray.storage (pathlib.Path('s3a://b/x') is 's3a:/b/x'); "
                             f"or whitelist a local-only use in _LOCAL_ONLY with the reason: {offenders}")


# --- other processes: Ray workers, Serve replicas, boto3 ------------------------------------------


def _object_store_config():
    from lakeray.config import StorageConfig

    return StorageConfig(root="s3a://b/lake", endpoint_url="http://127.0.0.1:9000", access_key_env="MY_KEY",
                         secret_key_env="MY_SECRET", path_style=True, allow_http=True, timeout_s=7)


def test_worker_env_carries_settings_and_secret_names_never_values(monkeypatch):
    monkeypatch.setenv("MY_KEY", "AKIA-DISTINCT-KEY")
    monkeypatch.setenv("MY_SECRET", "s3cr3t-DISTINCT-VALUE")
    env = storage.worker_env("s3a://b/lake", _object_store_config())
    assert "DISTINCT" not in repr(env)
    assert env["LAKERAY_STORAGE__ROOT"] == "s3a://b/lake" and env["LAKERAY_STORAGE__SECRET_KEY_ENV"] == "MY_SECRET"
    assert env["LAKERAY_STORAGE__PATH_STYLE"] == "true" and env["LAKERAY_STORAGE__TIMEOUT_S"] == "7.0"
    # boto3 (MLflow's artifacts) gets references Ray expands from each node's own environment.
    assert env["AWS_ACCESS_KEY_ID"] == "${MY_KEY}" and env["AWS_SECRET_ACCESS_KEY"] == "${MY_SECRET}"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE"] == "path"
    assert storage.worker_env("/data/lake", _object_store_config()) == {}


def test_a_process_without_a_profile_resolves_the_store_from_the_worker_env(monkeypatch):
    cfg = _object_store_config()
    monkeypatch.setenv("MY_KEY", "AKIA1")
    monkeypatch.setenv("MY_SECRET", "s3cr3t")
    for name, value in storage.worker_env(cfg.root, cfg).items():
        monkeypatch.setenv(name, os.path.expandvars(value))  # what Ray does on the worker
    saved = storage._default
    storage.configure(None)
    try:
        assert storage.configured() == storage.StoreSettings.of(cfg)
        options = storage.delta_options("s3://b/lake/tables/t")
        assert options["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and options["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
        assert options["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] == "false" and options["timeout"] == "7s"
    finally:
        storage.configure(saved)


def test_ray_train_storage_filesystem_pickles_without_the_secret(monkeypatch):
    import pickle

    monkeypatch.setenv("MY_KEY", "AKIA-DISTINCT-KEY")
    monkeypatch.setenv("MY_SECRET", "s3cr3t-DISTINCT-VALUE")
    filesystem, path = storage.worker_arrow_fs("s3a://b/lake/train_runs", _object_store_config())
    assert path == "b/lake/train_runs"
    payload = pickle.dumps(filesystem)
    assert b"DISTINCT" not in payload
    assert pickle.loads(payload).handler.store == storage.StoreSettings.of(_object_store_config())


@pytest.fixture
def keep_process_store():
    """load_settings with an object-store root makes it this process's default: put the old one back."""
    saved = storage._default
    yield
    storage.configure(saved)


def test_training_run_folders_and_mlflow_artifacts_on_an_object_store_root(tmp_path, keep_process_store):
    from lakeray.config import load_settings
    from lakeray.training.runtime import run_folder
    from lakeray.training.tracking import artifact_location, check_store

    env = {"LAKERAY_STORAGE__ROOT": "s3a://b/lake", "LAKERAY_STORAGE__ENDPOINT_URL": "http://127.0.0.1:9000",
           "LAKERAY_STORAGE__ALLOW_HTTP": "true"}
    settings = load_settings(None, environ=env)
    run = run_folder(settings, "r1")
    assert run.path == "s3a://b/lake/train_runs/r1" and run.progress_file == "s3a://b/lake/train_runs/r1/progress.jsonl"
    with pytest.raises(ConfigError, match=r"the default SQLite registry cannot live in a bucket"):
        check_store(settings)
    sqlite = load_settings(None, environ={**env, "LAKERAY_MLFLOW__TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    check_store(sqlite)
    assert artifact_location(sqlite) == "s3://b/lake/mlartifacts"  # boto3's scheme, not Hadoop's s3a
    server = load_settings(None, environ={**env, "LAKERAY_MLFLOW__TRACKING_URI": "http://mlflow:5000"})
    assert artifact_location(server) is None  # the server's own artifact root
    local = load_settings(None, environ={"LAKERAY_STORAGE__ROOT": str(tmp_path)})
    assert run_folder(local, "r1").path == f"{tmp_path}/train_runs/r1"
    assert artifact_location(local) == f"file://{tmp_path}/mlartifacts"
