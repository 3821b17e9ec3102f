"""The lakehouse on an S3-compatible object store: a real S3Proxy on loopback, the root on
``s3://bucket/lakehouse``, Spark through ``s3a://`` (hadoop-aws), delta-rs and pyarrow through ``s3://``
with the same settings.

Spark needs the hadoop-aws jars on its classpath when its JVM starts, and a process holds one JVM: the
Spark half of the scenario (Delta write/merge/time travel, a feature job run, the duckdb training-set
build and the vacuum) runs once in a child process (:func:`_spark_scenario`) against the same server, so
the shared Spark session of the other tests stays as it is. This process then reads what the child
wrote, with delta-rs and pyarrow only: another process, the same credentials.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path  # local folders only: the S3Proxy data folder and the job folder

import pytest

from lakeray import storage
from lakeray.errors import ConfigError
from tests.conftest import s3_bucket

pytestmark = [pytest.mark.spark, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUCKET = "lakeray-test"
ROOT = f"s3://{BUCKET}/lakehouse"

JOBS = '''
from pyspark.sql import functions as F
from lakeray.features import feature_job

@feature_job(name="os_spend", inputs=["os_events"], entity_keys=["user_id"], event_time="event_time")
def os_spend(os_events):
    return os_events.select("user_id", "event_time", (F.col("amount") * 2).alias("amount_x2"))
'''


@pytest.fixture(scope="module")
def object_store_jars():
    """The hadoop-aws jars cached as `lakeray setup --object-store` does (a no-op once cached: the first
    time downloads ~690 MB)."""
    from lakeray.config import load_settings
    from lakeray.lakehouse.spark import object_store_jars_dir, resolve_object_store_jars

    resolve_object_store_jars(object_store_jars_dir(load_settings(REPO / "lakeray.yaml", "local", environ={})))


@pytest.fixture(scope="module")
def s3_env(s3proxy, object_store_jars, tmp_path_factory):
    """The session's S3Proxy (tests/conftest.py) with this module's bucket."""
    s3_bucket(s3proxy, BUCKET)
    jobs = tmp_path_factory.mktemp("os_jobs")
    (jobs / "os_jobs.py").write_text(textwrap.dedent(JOBS))
    return {
        "LR_TEST_S3_KEY": s3proxy.access_key,
        "LR_TEST_S3_SECRET": s3proxy.secret_key,
        "LAKERAY_STORAGE__ROOT": ROOT,
        "LAKERAY_STORAGE__ENDPOINT_URL": s3proxy.endpoint,
        "LAKERAY_STORAGE__ACCESS_KEY_ENV": "LR_TEST_S3_KEY",
        "LAKERAY_STORAGE__SECRET_KEY_ENV": "LR_TEST_S3_SECRET",
        "LAKERAY_STORAGE__PATH_STYLE": "true",
        "LAKERAY_STORAGE__ALLOW_HTTP": "true",
        "LAKERAY_STORAGE__TIMEOUT_S": "10",
        "LAKERAY_FEATURE_PATHS": str(jobs),
        "LAKERAY_SPARK__MASTER": "local[2]",
        "LAKERAY_SPARK__DRIVER_MEMORY": "1g",
        "LAKERAY_SPARK__SHUFFLE_PARTITIONS": "2",
    }


@pytest.fixture(scope="module")
def s3_settings(s3_env, monkeypatch_module):
    from lakeray.config import load_settings

    for key in ("LR_TEST_S3_KEY", "LR_TEST_S3_SECRET"):
        monkeypatch_module.setenv(key, s3_env[key])
    settings = load_settings(REPO / "lakeray.yaml", "local", environ=s3_env)
    storage.configure(settings.profile.storage)
    yield settings
    storage.configure(None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def scenario(s3_env, s3_settings, tmp_path_factory):
    """Run :func:`_spark_scenario` in a child process (its own JVM, with hadoop-aws); its findings as JSON."""
    out = tmp_path_factory.mktemp("scenario") / "result.json"
    env = {**os.environ, **s3_env, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from tests.spark.test_object_store import _spark_scenario; "
                           f"_spark_scenario({str(out)!r})"], cwd=str(tmp_path_factory.mktemp("cwd")), env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def _spark_scenario(out: str) -> None:
    """The Spark half, in one JVM: write, overwrite, merge, time travel, a feature job, a duckdb-built
    training set pinned to the feature table's first version, then VACUUM at 0 hours."""
    from lakeray.config import load_settings
    from lakeray.features.retention import vacuum
    from lakeray.features.runner import run_feature_job
    from lakeray.features.training_sets import TrainingSetSpec, build_training_set
    from lakeray.lakehouse.delta import merge_table, read_table, table_history, write_table
    from lakeray.lakehouse.spark import create_spark_session

    settings = load_settings(REPO / "lakeray.yaml", "local")
    spark = create_spark_session(settings)
    events = settings.table_path("os_events")
    schema = "user_id long, event_time string, amount double, label int"
    rows = [(u, f"2026-03-0{d} 1{u}:00:00", float(d * 10 + u), (u + d) % 2) for d in range(1, 4) for u in range(2)]

    def frame(data):
        return spark.createDataFrame(data, schema).selectExpr("user_id", "cast(event_time as timestamp) as event_time",
                                                              "amount", "label")

    result: dict = {"events_path": events}
    result["v0"] = write_table(frame(rows[:4]), events)
    result["v1"] = write_table(frame(rows), events)  # overwrite: v0's files are now only in history
    result["merge_v"] = merge_table(frame([(0, "2026-03-01 10:00:00", 99.0, 1)]), events,
                                    ["user_id", "event_time"])
    result["count_latest"] = read_table(spark, events).count()
    result["count_v0"] = read_table(spark, events, 0).count()
    result["merged_amount"] = read_table(spark, events).where("user_id = 0 and amount = 99.0").count()
    result["history"] = [c["operation"] for c in table_history(spark, events)]
    first = run_feature_job(spark, settings, "os_spend")
    second = run_feature_job(spark, settings, "os_spend")
    result["feature"] = {"path": first.path, "versions": [first.version, second.version], "rows": first.rows}
    spec = TrainingSetSpec.parse({
        "name": "os_training", "labels": "os_events", "entity_keys": ["user_id"], "event_time": "event_time",
        "engine": "duckdb", "features": [{"table": "os_spend", "columns": ["amount_x2"], "version": 0}]})
    built = build_training_set(None, settings, spec)
    result["training_set"] = {"version": built.version, "rows": built.rows, "manifest": built.manifest_path,
                              "engine": built.engine, "inputs": built.inputs, "content_hash": built.content_hash}
    scratch = settings.table_path("os_scratch")  # referenced by nothing: its replaced files go
    write_table(frame(rows[:2]), scratch)
    write_table(frame(rows[2:]), scratch)
    vacuumed = vacuum(spark, settings, tables=["os_events", "os_spend", "os_scratch"], retain_hours=0)
    result["vacuum"] = {v.table: {"kept": sorted(v.kept), "deleted": len(v.deleted_files)} for v in vacuumed}
    result["spend_v0_after_vacuum"] = read_table(spark, first.path, 0).count()
    result["cwd_entries"] = sorted(p.name for p in Path.cwd().iterdir())
    spark.stop()
    Path(out).write_text(json.dumps(result, default=str))


def test_spark_writes_merges_and_time_travels_delta_through_s3a(scenario, s3proxy):
    assert scenario["events_path"] == f"{ROOT}/tables/os_events"
    assert (scenario["v0"], scenario["v1"], scenario["merge_v"]) == (0, 1, 2)
    assert scenario["count_v0"] == 4 and scenario["count_latest"] == 6 and scenario["merged_amount"] == 1
    assert scenario["history"][:3] == ["MERGE", "WRITE", "WRITE"]
    # The objects are in the bucket (S3Proxy's folder), and nothing landed in a local folder named "s3:".
    log = Path(s3proxy.root_dir, BUCKET, "lakehouse", "tables", "os_events", "_delta_log")
    assert sorted(p.name for p in log.glob("*.json"))[:3] == [f"{v:020d}.json" for v in range(3)]
    assert not [name for name in scenario["cwd_entries"] if name.startswith("s3")]


def test_feature_job_runs_on_the_object_store(scenario, s3_settings):
    from lakeray.lakehouse.delta import latest_version, read_arrow

    feature = scenario["feature"]
    assert feature["path"] == s3_settings.table_path("os_spend") and feature["versions"] == [0, 1]
    # Read back in this process with delta-rs (s3://, storage options from the profile), version pinned.
    assert latest_version(feature["path"]) == 1
    assert read_arrow(feature["path"], 0).num_rows == feature["rows"] == 6


def test_duckdb_training_set_and_manifest_in_the_bucket(scenario, s3_settings):
    from lakeray.features.training_sets import load_manifest
    from lakeray.lakehouse.delta import read_arrow

    built = scenario["training_set"]
    assert built["engine"] == "duckdb" and built["rows"] == 6
    assert built["manifest"] == f"{ROOT}/_manifests/os_training/v{built['version']}.json"
    manifest = load_manifest(s3_settings, "os_training")
    assert manifest["content_hash"] == built["content_hash"] and manifest["inputs"] == {"os_events": 2, "os_spend": 0}
    assert read_arrow(s3_settings.table_path("os_training"), built["version"]).num_rows == 6


def test_ingest_reads_a_shard_from_the_bucket(scenario, s3_settings):
    from lakeray.training.ingest import read_shard, table_shards

    path, version = s3_settings.table_path("os_training"), scenario["training_set"]["version"]
    shards = table_shards(path, version, 2)
    assert all(uri.startswith(f"s3://{BUCKET}/") for shard in shards for uri in shard)
    parts = [read_shard(path, version, ["user_id", "amount_x2"], rank, 2, shards) for rank in range(2)]
    assert sum(p.num_rows for p in parts) == 6 and parts[0].column_names == ["user_id", "amount_x2"]


def test_vacuum_keeps_the_versions_manifests_pin(scenario, s3_settings):
    from lakeray.lakehouse.delta import read_arrow

    report = scenario["vacuum"]
    assert report["os_spend"]["kept"] == [0]  # the training set's manifest pins os_spend@0
    assert report["os_events"]["kept"] == [2]  # ... and the labels' version
    assert report["os_scratch"]["kept"] == [] and report["os_scratch"]["deleted"] > 0  # pinned by nothing
    assert scenario["spend_v0_after_vacuum"] == 6
    assert read_arrow(s3_settings.table_path("os_spend"), 0).num_rows == 6


def test_wrong_credentials_missing_bucket_and_dead_endpoint_fail_fast_naming_the_setting(s3_settings, s3proxy):
    from lakeray.cluster.object_store import _free_port
    from lakeray.lakehouse.delta import latest_version
    from lakeray.lakehouse.spark import create_spark_session

    good = s3_settings.profile.storage
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LR_TEST_S3_SECRET", "not-the-secret")
        started = time.perf_counter()
        with pytest.raises(ConfigError, match=r"rejected the credentials .*storage.access_key_env \(LR_TEST_S3_KEY\)"):
            storage.check_access(ROOT, good)
        try:
            storage.configure(good)  # the same settings, the wrong secret in the variable they name
            with pytest.raises(ConfigError, match=r"rejected the credentials"):
                latest_version(s3_settings.table_path("os_events"))
            # Before any JVM starts: the session factory checks the store first.
            with pytest.raises(ConfigError, match=r"rejected the credentials"):
                create_spark_session(s3_settings)
        finally:
            storage.configure(good)
        assert time.perf_counter() - started < 30
    with pytest.raises(ConfigError, match=r"bucket 'no-such-bucket' .* does not exist"):
        storage.check_access("s3://no-such-bucket/lakehouse", good)
    dead = good.model_copy(update={"endpoint_url": f"http://127.0.0.1:{_free_port()}", "timeout_s": 3})
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"storage.endpoint_url http://127.0.0.1:\d+ did not answer"):
        storage.check_access(ROOT, dead)
    assert time.perf_counter() - started < 30


def test_s3proxy_refuses_a_taken_port(s3proxy, tmp_path):
    from lakeray.cluster.object_store import start_s3proxy
    from lakeray.errors import ClusterError

    port = int(s3proxy.endpoint.rsplit(":", 1)[1])
    with pytest.raises(ClusterError, match=rf"port 127.0.0.1:{port} is already taken"):
        start_s3proxy(str(tmp_path), port=port)
