"""Find feature jobs in the project's feature folders and run one into its Delta table."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lakeray.errors import ConfigError, DataQualityError
from lakeray.features.spec import FeatureJob

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lakeray.config import Settings

__all__ = ["FeatureRunResult", "discover_jobs", "run_feature_job"]


@dataclass(frozen=True)
class FeatureRunResult:
    """What a feature run read and wrote: the lineage record of one commit."""

    table: str
    path: str
    version: int
    rows: int
    input_versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _load_module(path: Path):
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    name = f"lakeray_jobs_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported as a Python module", "check the file name")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"{path}: importing the feature job failed: {exc}",
                          "fix the job module (run it with python to see the traceback)") from exc
    return module


def discover_jobs(settings: Settings) -> dict[str, FeatureJob]:
    """Every :class:`FeatureJob` defined in ``*.py`` under the profile's ``feature_paths``."""
    jobs: dict[str, FeatureJob] = {}
    for folder in settings.profile.feature_paths:
        root = Path(settings.resolve(folder))
        if not root.is_dir():
            raise ConfigError(f"feature_paths: {root} is not a folder", "fix feature_paths in lakeray.yaml")
        for path in sorted(root.glob("*.py")):
            if path.name.startswith("_"):
                continue
            for value in vars(_load_module(path)).values():
                if not isinstance(value, FeatureJob):
                    continue
                if value.name in jobs and jobs[value.name].source != str(path):
                    raise ConfigError(f"feature table {value.name!r} is declared twice: "
                                      f"{jobs[value.name].source} and {path}", "rename one of them")
                jobs[value.name] = value.model_copy(update={"source": str(path)})
    return jobs


def run_feature_job(spark: SparkSession, settings: Settings, name: str) -> FeatureRunResult:
    """Run job ``name`` on the latest version of its inputs; one atomic overwrite commit."""
    from lakeray.lakehouse.delta import read_table, table_version, write_table

    jobs = discover_jobs(settings)
    if name not in jobs:
        known = ", ".join(sorted(jobs)) or "none"
        raise ConfigError(f"no feature job named {name!r} (known: {known})",
                          "check the name, or add the job under feature_paths")
    job = jobs[name]
    started = time.perf_counter()
    inputs = {}
    input_versions = {}
    for table in job.inputs:
        path = settings.table_path(table)
        # Pin the version first, then read exactly it: the lineage names what was really read.
        input_versions[table] = table_version(spark, path)
        inputs[table] = read_table(spark, path, input_versions[table])
    output = job.fn(**inputs)
    missing = [c for c in [*job.entity_keys, *([job.event_time] if job.event_time else [])]
               if c not in output.columns]
    if missing:
        raise DataQualityError(f"feature job {name!r} returned no column(s) {missing}",
                               f"return them from {job.fn.__name__} or fix the declaration; nothing was written")
    path = settings.table_path(name)
    version = write_table(output, path)
    rows = _committed_rows(spark, path, version)
    return FeatureRunResult(name, path, version, rows, input_versions, time.perf_counter() - started)


def _committed_rows(spark: SparkSession, path: str, version: int) -> int:
    """Row count of the commit, from the Delta log's operation metrics (no table scan)."""
    from delta.tables import DeltaTable

    history = DeltaTable.forPath(spark, path).history().where(f"version = {version}").first()
    metrics = history["operationMetrics"] or {}
    if "numOutputRows" in metrics:
        return int(metrics["numOutputRows"])
    return spark.read.format("delta").option("versionAsOf", version).load(path).count()
