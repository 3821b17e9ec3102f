"""Point-in-time training sets: labels + features as of each label's time, pinned to table versions.

A build pins every input table's version, joins in Spark (:mod:`lakeray.lakehouse.pit`), writes the
result as a Delta table in one commit, and writes a manifest beside it: the spec with every version
pinned, the row count and a content hash. :func:`rebuild_training_set` replays a manifest and gives
the same rows, bit for bit (same content hash), as long as the pinned versions have not been vacuumed.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lakeray.errors import ConfigError, TableNotFoundError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lakeray.config import Settings

__all__ = ["FeatureRef", "TrainingSetSpec", "TrainingSetResult", "build_training_set", "load_manifest",
           "rebuild_training_set", "manifest_dir"]


class FeatureRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table: str = Field(description="Feature table name.")
    columns: list[str] = Field(min_length=1, description="Feature columns to take from it.")
    max_age_s: float | None = Field(None, gt=0, description="Ignore feature rows older than this.")
    version: int | None = Field(None, ge=0, description="Pinned table version (default: latest at build).")
    entity_keys: list[str] | None = Field(None, description="Key columns (default: the job's declaration, "
                                          "else the labels' keys).")
    event_time: str | None = Field(None, description="Event-time column (default: declaration, else labels').")


class TrainingSetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Output Delta table for the training set.")
    labels: str = Field(description="Labels/events table: entity keys + event time + label(s).")
    labels_version: int | None = Field(None, ge=0)
    entity_keys: list[str] = Field(min_length=1)
    event_time: str
    features: list[FeatureRef] = Field(min_length=1)

    @classmethod
    def parse(cls, data: dict[str, Any], where: str = "training-set spec") -> TrainingSetSpec:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{where}: {fields}", "fix the spec") from None


@dataclass(frozen=True)
class TrainingSetResult:
    table: str
    version: int
    rows: int
    content_hash: str
    inputs: dict[str, int]
    manifest_path: str
    seconds: float


def manifest_dir(settings: Settings, name: str) -> Path:
    return Path(settings.storage_root, "_manifests", name)


def _pin(spark: SparkSession, settings: Settings, table: str, version: int | None) -> int:
    from lakeray.lakehouse.delta import table_version

    latest = table_version(spark, settings.table_path(table))
    if version is None:
        return latest
    if version > latest:
        raise TableNotFoundError(f"{table} has no version {version} (latest is {latest})",
                                 "pick a version from `lakeray features history`")
    return version


def _resolved(spark: SparkSession, settings: Settings, spec: TrainingSetSpec) -> TrainingSetSpec:
    """The spec with every version pinned and every key/time column filled in."""
    from lakeray.features.runner import discover_jobs

    declared = discover_jobs(settings)
    refs = []
    for ref in spec.features:
        job = declared.get(ref.table)
        refs.append(ref.model_copy(update={
            "version": _pin(spark, settings, ref.table, ref.version),
            "entity_keys": ref.entity_keys or (job.entity_keys if job and job.entity_keys else spec.entity_keys),
            "event_time": ref.event_time or (job.event_time if job and job.event_time else spec.event_time),
        }))
    return spec.model_copy(update={"labels_version": _pin(spark, settings, spec.labels, spec.labels_version),
                                   "features": refs})


ROWS_PER_PARTITION = 2_000_000


def _join_partitions(spark: SparkSession, settings: Settings, pinned: TrainingSetSpec) -> int:
    """Enough partitions that each as-of join partition holds ~2M rows (one Python worker's memory)."""
    from lakeray.lakehouse.delta import table_rows

    floor = int(spark.conf.get("spark.sql.shuffle.partitions"))
    pins = [(pinned.labels, pinned.labels_version), *[(r.table, r.version) for r in pinned.features]]
    try:
        counts = [table_rows(settings.table_path(t), v) for t, v in pins]
    except Exception:  # stats unreadable (e.g. an object store without credentials for delta-rs)
        return floor
    if any(c is None for c in counts):
        return floor
    return max(floor, -(-sum(counts) // ROWS_PER_PARTITION))


def build_training_set(spark: SparkSession, settings: Settings, spec: TrainingSetSpec) -> TrainingSetResult:
    """Pin, join, write one commit, write the manifest. Bad specs fail before anything is written."""
    from lakeray.lakehouse.delta import read_table, table_rows, write_table
    from lakeray.lakehouse.pit import FeatureSource, content_hash, observed_content_hash, point_in_time_join

    started = time.perf_counter()
    pinned = _resolved(spark, settings, spec)
    labels = read_table(spark, settings.table_path(pinned.labels), pinned.labels_version)
    sources = [FeatureSource(ref.table, read_table(spark, settings.table_path(ref.table), ref.version),
                             tuple(ref.entity_keys), ref.event_time, tuple(ref.columns), ref.max_age_s)
               for ref in pinned.features]
    joined = point_in_time_join(labels, pinned.entity_keys, pinned.event_time, sources,
                                partitions=_join_partitions(spark, settings, pinned))
    # The content hash is aggregated during the write itself (one pass over the join, no cache).
    observed, observed_digest = observed_content_hash(joined)
    inputs = {pinned.labels: pinned.labels_version, **{r.table: r.version for r in pinned.features}}
    meta = {"training_set": pinned.name, "inputs": inputs, "build_id": uuid.uuid4().hex}
    path = settings.table_path(pinned.name)
    version = write_table(observed, path, user_metadata=json.dumps(meta))
    digest = observed_digest()
    committed = table_rows(path, version)
    if digest is None or (committed is not None and int(digest.split("-", 1)[0]) != committed):
        # A retried task can add its rows to the observed sums twice: hash what was committed instead.
        digest = content_hash(read_table(spark, path, version))
    rows = int(digest.split("-", 1)[0])
    manifest = {
        "training_set": pinned.name,
        "version": version,
        "rows": rows,
        "content_hash": digest,
        "inputs": inputs,
        "spec": pinned.model_dump(mode="json"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    folder = manifest_dir(settings, pinned.name)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"v{version}.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, target)  # a reader never sees half a manifest
    return TrainingSetResult(pinned.name, version, rows, digest, inputs, str(target), time.perf_counter() - started)


def load_manifest(settings: Settings, name: str, version: int | None = None) -> dict[str, Any]:
    folder = manifest_dir(settings, name)
    found = sorted(folder.glob("v*.json"), key=lambda p: int(p.stem[1:])) if folder.is_dir() else []
    if version is not None:
        found = [p for p in found if p.stem == f"v{version}"]
    if not found:
        which = f" version {version}" if version is not None else ""
        raise TableNotFoundError(f"no manifest for training set {name!r}{which}",
                                 "build it first with build_training_set / `lakeray features training-set`")
    return json.loads(found[-1].read_text())


def rebuild_training_set(spark: SparkSession, settings: Settings, manifest: dict[str, Any],
                         name: str | None = None) -> TrainingSetResult:
    """Replay a manifest (every version pinned) into ``name`` (default: the same table, a new version)."""
    spec = TrainingSetSpec.parse(manifest["spec"], "manifest")
    if name:
        spec = spec.model_copy(update={"name": name})
    return build_training_set(spark, settings, spec)
