"""Retention: vacuum feature and training-set tables without breaking what still points at them.

Two things point at old table versions: training-set manifests (every input table@version, and the
training set's own version) and registered models (their MLflow run's ``lakeray.input_path`` /
``lakeray.input_version`` tags). Delta's VACUUM cannot keep a list of versions, only "everything newer
than N hours", so per table lakeray widens the retention window back to the oldest referenced version's
commit (plus a minute of margin, rounded up to whole hours) and vacuums with that: every file a referenced version reads was
removed by a later commit, so it is kept. Older, unreferenced files go.

Time travel also needs the *log* of a version, which Delta drops after ``delta.logRetentionDuration``
(30 days by default); when a referenced version is older than that window allows, lakeray raises the
table's log retention to cover it (a property change, one commit) and says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lakeray import storage

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lakeray.config import Settings

__all__ = ["TableVacuum", "references", "vacuum"]

MARGIN_S = 60.0
DEFAULT_LOG_RETENTION_DAYS = 30


@dataclass
class TableVacuum:
    table: str
    latest_version: int
    retain_hours: float
    kept: dict[int, list[str]] = field(default_factory=dict)  # version -> why (which manifest / model)
    deleted_files: list[str] = field(default_factory=list)
    dry_run: bool = False
    log_retention_days: int | None = None  # set when lakeray raised it


def _manifest_refs(settings: Settings) -> dict[str, dict[int, list[str]]]:
    refs: dict[str, dict[int, list[str]]] = {}
    root = storage.join(settings.storage_root, "_manifests")
    paths = [storage.join(root, name, file) for name in storage.list_dir(root)
             for file in storage.list_dir(storage.join(root, name)) if file.startswith("v") and file.endswith(".json")]
    for path in sorted(paths):
        manifest = json.loads(storage.read_text(path))
        why = f"training-set manifest {manifest['training_set']}@{manifest['version']}"
        pins = {**manifest.get("inputs", {}), manifest["training_set"]: manifest["version"]}
        for table, version in pins.items():
            refs.setdefault(table, {}).setdefault(int(version), []).append(why)
    return refs


def _model_refs(settings: Settings) -> dict[str, dict[int, list[str]]]:
    """Table versions the registered models were trained on (from their runs' lineage tags)."""
    refs: dict[str, dict[int, list[str]]] = {}
    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///") and not os.path.isfile(uri.removeprefix("sqlite:///")):  # a local file
        return refs  # no registry yet: nothing registered (and do not create one)
    from lakeray.registry import mlflow_client

    client = mlflow_client(settings)
    tables_root = settings.table_path("x")[:-1]
    for mv in client.search_model_versions():
        tags = client.get_run(mv.run_id).data.tags
        why = f"registered model {mv.name}/{mv.version}"
        pins: dict[str, int] = {}
        if "@" in tags.get("lakeray.input", ""):  # table@version, as training logs it (portable)
            table, _, version = tags["lakeray.input"].rpartition("@")
            pins[table] = int(version)
        else:  # runs logged before the tag existed: an absolute table path and a version
            path, version = tags.get("lakeray.input_path"), tags.get("lakeray.input_version")
            if path and version is not None and path.startswith(tables_root):
                pins[path[len(tables_root):]] = int(version)
        # Every table the training set was joined from (its manifest's inputs), so lineage stays readable.
        with contextlib.suppress(ValueError, TypeError):
            pins.update({t: int(v) for t, v in json.loads(tags.get("lakeray.inputs") or "{}").items()})
        for table, version in pins.items():
            refs.setdefault(table, {}).setdefault(version, []).append(why)
    return refs


def references(settings: Settings) -> dict[str, dict[int, list[str]]]:
    """table -> version -> reasons it must stay readable."""
    refs = _manifest_refs(settings)
    for table, versions in _model_refs(settings).items():
        for version, why in versions.items():
            refs.setdefault(table, {}).setdefault(version, []).extend(why)
    return refs


def _log_retention_days(spark: SparkSession, path: str) -> float:
    from delta.tables import DeltaTable

    value = DeltaTable.forPath(spark, path).detail().first()["properties"].get("delta.logRetentionDuration")
    if not value:
        return DEFAULT_LOG_RETENTION_DAYS
    number, unit = value.removeprefix("interval").split()[:2]
    per_day = {"day": 1, "days": 1, "hour": 24, "hours": 24, "week": 1 / 7, "weeks": 1 / 7}.get(unit.lower())
    return float(number) / per_day if per_day else DEFAULT_LOG_RETENTION_DAYS


def vacuum(spark: SparkSession, settings: Settings, tables: list[str] | None = None, retain_hours: float = 168.0,
           dry_run: bool = False) -> list[TableVacuum]:
    """Vacuum ``tables`` (default: every table under the storage root), keeping referenced versions."""
    from lakeray.errors import ConfigError
    from lakeray.lakehouse.delta import table_exists, table_history, vacuum_table

    if retain_hours < 0:
        raise ConfigError(f"--retain-hours must be ≥ 0, got {retain_hours}", "pass hours to keep, e.g. 168")
    if tables is None:
        root = storage.join(settings.storage_root, "tables")
        tables = [name for name in storage.list_dir(root) if storage.is_dir(storage.join(root, name, "_delta_log"))]
    refs = references(settings)
    now = time.time()
    out = []
    for table in tables:
        path = settings.table_path(table)
        if not table_exists(spark, path):
            from lakeray.errors import TableNotFoundError

            raise TableNotFoundError(f"no Delta table {table!r} at {path}", "see the tables under storage.root")
        kept = {v: why for v, why in sorted(refs.get(table, {}).items())}
        # Commit times of every version still in the log (newest first), from one history read.
        stamps = {c["version"]: c["timestamp"].timestamp() for c in table_history(spark, path)}
        hours = retain_hours
        result = TableVacuum(table, max(stamps), hours, kept, dry_run=dry_run)
        if kept:
            oldest = min(kept)
            if oldest not in stamps:
                # Its log is already gone: time travel to it is impossible; say so rather than pretend.
                kept[oldest] = [*kept[oldest], "WARNING: this version's log was already cleaned up"]
            else:
                age_s = now - stamps[oldest] + MARGIN_S
                hours = max(hours, age_s / 3600)
                age_days = age_s / 86_400
                if not dry_run and age_days > 0.8 * _log_retention_days(spark, path):
                    days = math.ceil(age_days) + DEFAULT_LOG_RETENTION_DAYS
                    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES "
                              f"('delta.logRetentionDuration' = 'interval {days} days')")
                    result.log_retention_days = days
        result.retain_hours = math.ceil(hours)  # what vacuum_table applies
        result.deleted_files = vacuum_table(spark, path, hours, dry_run)
        out.append(result)
    return out
