"""The end-to-end path on the embedded default: data → features → training set → training → endpoint.

Each stage hands the next a *committed version*, never a DataFrame or a file list: the generator
commits ``transactions@N``; the declared feature job reads exactly that version, passes its quality
gate and commits ``customer_aggregates@M``; the labels are split off into ``fraud_labels@L``; the
point-in-time training set joins them as of each label's time into ``fraud_training_set@S`` with a
manifest; training reads exactly ``@S`` and tags the MLflow run with it; Serve loads the version the
``champion`` alias pointed to at deploy time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from lakeray.config import Settings
    from lakeray.features.training_sets import TrainingSetResult

__all__ = ["DemoResult", "run_demo", "build_demo_training_set", "write_labels", "example_project", "demo_train_spec",
           "STAGES",
           "FEATURE_JOB", "LABEL", "ID_COLUMN"]

STAGES = ["spark", "data", "features", "training_set", "ray", "train", "serve", "predict"]
FEATURE_JOB = "customer_aggregates"
SOURCE_TABLE = "transactions"
LABELS_TABLE = "fraud_labels"
TRAINING_SET = "fraud_training_set"
ENTITY_KEY = "customer_id"
EVENT_TIME = "event_time"
LABEL = "is_fraud"
ID_COLUMN = "transaction_id"


@dataclass
class DemoResult:
    rows: int = 0
    source_table: str = SOURCE_TABLE
    source_table_version: int | None = None
    feature_table: str = FEATURE_JOB
    feature_table_version: int | None = None
    feature_rows: int = 0
    feature_checks: dict[str, bool] = field(default_factory=dict)
    training_set: str = TRAINING_SET
    training_set_version: int | None = None
    training_set_rows: int = 0
    training_set_hash: str | None = None
    features: list[str] = field(default_factory=list)
    auc: float | None = None
    train_rows: int = 0
    test_rows: int = 0
    train_s: float | None = None
    train_startup_s: float | None = None
    train_load_s: float | None = None  # part of train_startup_s: the workers' Delta read
    model_uri: str | None = None
    model_version: int | None = None
    run_id: str | None = None
    endpoint: str | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)
    feature_job_source: str | None = None  # the file of the feature job that ran
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


Progress = Callable[[str, str], None]  # (stage, event): event is "start", "done", or a one-line note to show


@contextmanager
def _stage(result: DemoResult, name: str, progress: Progress) -> Iterator[None]:
    progress(name, "start")
    started = time.perf_counter()
    yield
    result.stage_seconds[name] = round(time.perf_counter() - started, 2)
    progress(name, "done")


def _sample_instances(settings: Settings, result: DemoResult, count: int) -> tuple[list[dict], list[dict]]:
    """A few held-out rows (half of them frauds where there are any) as /predict instances.

    Reads the training set batch by batch, only the needed columns, and stops once it has enough
    rows of each class (the driver never holds the whole table).
    """
    import math

    import pyarrow as pa
    import pyarrow.compute as pc

    from lakeray.lakehouse.delta import iter_batches
    from lakeray.training.data import holdout_mask

    want_frauds = count // 2
    found: dict[int, list[dict]] = {1: [], 0: []}
    for batch in iter_batches(settings.table_path(TRAINING_SET), result.training_set_version,
                              columns=[ID_COLUMN, LABEL, *result.features]):
        ids = batch.column(ID_COLUMN).to_numpy(zero_copy_only=False)
        held = batch.filter(pa.array(holdout_mask(ids, settings.profile.train.test_fraction)))
        for label, room in ((1, want_frauds - len(found[1])), (0, count - len(found[0]))):
            if room > 0:
                found[label] += held.filter(pc.equal(held.column(LABEL), label)).slice(0, room).to_pylist()
        if len(found[1]) >= want_frauds and len(found[0]) >= count - want_frauds:
            break
    frauds = found[1]
    normal = found[0][: count - len(frauds)]
    instances, meta = [], []
    for part in (normal, frauds):
        for row in part:
            instances.append({f: (None if row[f] is None or math.isnan(row[f]) else row[f])
                              for f in result.features})
            meta.append({ID_COLUMN: row[ID_COLUMN], LABEL: row[LABEL]})
    return instances, meta


def build_demo_training_set(spark: Any, settings: Settings, source_version: int, feature_version: int
                            ) -> tuple[TrainingSetResult, list[str]]:
    """Split the labels off ``transactions@source_version`` and join them point-in-time with the features.

    Labels live apart from features; the join brings them together as of each label's event time,
    pinned to the versions given. Returns the build result and the feature column names.
    """
    from lakeray.features.training_sets import TrainingSetSpec, build_training_set
    from lakeray.lakehouse.delta import read_table

    labels_version = write_labels(spark, settings, SOURCE_TABLE, source_version)
    feature_columns = [c for c in read_table(spark, settings.table_path(FEATURE_JOB), feature_version).columns
                       if c not in (ID_COLUMN, ENTITY_KEY, EVENT_TIME)]
    built = build_training_set(spark, settings, TrainingSetSpec(
        name=TRAINING_SET, labels=LABELS_TABLE, labels_version=labels_version, entity_keys=[ENTITY_KEY],
        event_time=EVENT_TIME,
        features=[{"table": FEATURE_JOB, "version": feature_version, "columns": feature_columns}]))
    return built, feature_columns


def write_labels(spark: Any, settings: Settings, source_table: str, source_version: int,
                 labels_table: str = LABELS_TABLE) -> int:
    """Split the labels (id, customer, time, label) off ``source_table@source_version`` into
    ``labels_table``; one overwrite commit, returns its version. Labels live apart from features."""
    from lakeray.lakehouse.delta import read_table, write_table

    labels = read_table(spark, settings.table_path(source_table), source_version)
    return write_table(labels.select(ID_COLUMN, ENTITY_KEY, EVENT_TIME, LABEL), settings.table_path(labels_table))


def demo_train_spec(training_set_version: int, num_workers: int | None = None, cpus_per_worker: int | None = None):
    """The example project's train spec (jobs/training/fraud_xgboost.yaml) pinned to the demo's training
    set version. The demo deploys what it just trained, so the new version gets ``champion`` directly
    (a project's own runs get ``challenger`` and `lakeray models promote` decides). ``num_workers`` /
    ``cpus_per_worker`` replace the spec's scaling (``make demo-cluster`` trains on both hosts)."""
    from lakeray.training.spec import load_train_spec

    spec = load_train_spec(example_project() / "jobs" / "training" / "fraud_xgboost.yaml")
    scaling = {k: v for k, v in (("num_workers", num_workers), ("cpus_per_worker", cpus_per_worker)) if v}
    if scaling:
        spec = spec.model_copy(update={"scaling": spec.scaling.model_copy(update=scaling)})
    return spec.model_copy(update={"training_set": f"{TRAINING_SET}@{training_set_version}",
                                   "registry": spec.registry.model_copy(update={"alias": "champion"})})


def example_project() -> Path:
    """The example project that ships inside the package (``lakeray init`` copies it)."""
    from pathlib import Path

    return Path(__file__).resolve().parent / "examples" / "project"


def _with_feature_job(settings: Settings) -> tuple[Settings, str, str | None]:
    """Settings whose ``feature_paths`` declare the demo's job, that job's file, and a note when it is not
    the project's own. The profile's existing folders come first; when none of them declares the job
    (an empty folder, built-in defaults), the example shipped in the package runs instead. Missing folders
    are skipped here only: a real ``features run`` still refuses them."""
    from dataclasses import replace
    from pathlib import Path

    from lakeray.features.runner import discover_jobs

    present = [f for f in settings.profile.feature_paths if Path(settings.resolve(f)).is_dir()]
    if present:
        own = replace(settings, profile=settings.profile.model_copy(update={"feature_paths": present}))
        job = discover_jobs(own).get(FEATURE_JOB)
        if job is not None:
            return own, job.source or "", None
    folder = example_project() / "jobs" / "features"
    packaged = replace(settings, profile=settings.profile.model_copy(update={"feature_paths": [str(folder)]}))
    source = discover_jobs(packaged)[FEATURE_JOB].source or ""
    note = (f"no feature job {FEATURE_JOB} under feature_paths ({', '.join(settings.profile.feature_paths)}): "
            f"running the example shipped with lakeray ({source})")
    return packaged, source, note


def run_demo(settings: Settings, rows: int = 200_000, seed: int = 42, predictions: int = 6,
             progress: Progress | None = None, serve_forever: Callable[[DemoResult], None] | None = None,
             train_workers: int | None = None, train_cpus: int | None = None) -> DemoResult:
    """Run every stage; Spark, Ray and Serve are shut down on the way out (exceptions and Ctrl-C too)."""
    import httpx

    from lakeray.cluster.ray_runtime import start_ray
    from lakeray.features.runner import run_feature_job
    from lakeray.features.synthetic import generate_transactions
    from lakeray.lakehouse.delta import write_table
    from lakeray.lakehouse.spark import create_spark_session
    from lakeray.serving.deploy import deploy_model
    from lakeray.training.api import train

    progress = progress or (lambda stage, event: None)
    result = DemoResult(rows=rows)
    settings, result.feature_job_source, note = _with_feature_job(settings)
    if note:
        progress("features", note)
    spark = ray_handle = None
    try:
        with _stage(result, "spark", progress):
            spark = create_spark_session(settings)
        with _stage(result, "data", progress):
            # Overwrite: a second demo run commits a new version with the same rows, never duplicates.
            result.source_table_version = write_table(generate_transactions(spark, rows, seed),
                                                      settings.table_path(SOURCE_TABLE))
        with _stage(result, "features", progress):
            run = run_feature_job(spark, settings, FEATURE_JOB)
            result.feature_table_version, result.feature_rows = run.version, run.rows
            result.feature_checks = {c["name"]: c["passed"] for c in run.expectations}
        with _stage(result, "training_set", progress):
            built, _ = build_demo_training_set(spark, settings, result.source_table_version,
                                                             run.version)
            result.training_set_version, result.training_set_rows = built.version, built.rows
            result.training_set_hash = built.content_hash
        # Spark is done: give its memory and cores back before Ray starts on the same machine.
        spark.stop()
        spark = None
        with _stage(result, "ray", progress):
            ray_handle = start_ray(settings)
        with _stage(result, "train", progress):
            spec = demo_train_spec(result.training_set_version, train_workers, train_cpus)
            report = train(settings, spec, "demo train spec (jobs/training/fraud_xgboost.yaml)")
            result.features = report.outcome.plan.features
            result.auc = round(report.evaluation.metrics["auc"], 4)
            result.train_rows, result.test_rows = report.outcome.train_rows, report.outcome.valid_rows
            result.train_s = round(report.outcome.train_s, 2)
            result.train_startup_s = round(report.outcome.startup_s, 2)
            result.train_load_s = round(report.outcome.load_s, 2)
            result.model_uri = report.model.uri
            result.model_version = report.model.version
            result.run_id = report.model.run_id
        with _stage(result, "serve", progress):
            endpoint = deploy_model(settings, report.model.uri)
            result.endpoint = endpoint.url
        with _stage(result, "predict", progress):
            instances, meta = _sample_instances(settings, result, predictions)
            reply = httpx.post(f"{endpoint.url}/predict", json={"instances": instances}, timeout=30.0)
            reply.raise_for_status()
            body = reply.json()
            result.predictions = [{**m, "fraud_probability": round(p, 4), "model_version": body["model_version"]}
                                  for m, p in zip(meta, body["predictions"], strict=True)]
        if serve_forever is not None:
            serve_forever(result)
        return result
    finally:
        if spark is not None:
            spark.stop()
        if ray_handle is not None:
            ray_handle.shutdown()
