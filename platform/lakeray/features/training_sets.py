"""Point-in-time training sets: labels + features as of each label's time, pinned to table versions.

A build pins every input table's version, joins in Spark (:mod:`lakeray.lakehouse.pit`), writes the
result as a Delta table in one commit, and writes a manifest beside it: the spec with every version
and every join key pinned, the row count, the row-hash scheme and a content hash.
:func:`rebuild_training_set` replays a manifest and gives the same rows, bit for bit (same content
hash), as long as the pinned versions have not been vacuumed; it compares before it commits.

Each feature ref joins on its own entity: ``join_keys`` maps the feature table's key columns to the
label columns that hold them (default: the same names), so one label row can carry several entities
(a flight's origin airport and its carrier). The labels' ``entity_keys`` are the rows' identity.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lakeray import storage
from lakeray.errors import ConfigError, DataQualityError, TableNotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyspark.sql import DataFrame, SparkSession

    from lakeray.config import Settings

__all__ = ["FeatureRef", "TrainingSetSpec", "TrainingSetResult", "build_training_set", "choose_engine",
           "load_manifest", "rebuild_spec", "rebuild_training_set", "manifest_dir"]


class FeatureRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table: str = Field(description="Feature table name.")
    columns: list[str] = Field(min_length=1, description="Feature columns to take from it.")
    max_age_s: float | None = Field(None, gt=0, description="Ignore feature rows older than this.")
    version: int | None = Field(None, ge=0, description="Pinned table version (default: latest at build).")
    entity_keys: list[str] | None = Field(None, description="The feature table's key columns (default: the "
                                          "keys of join_keys, else the job's declaration, else the labels' keys).")
    join_keys: dict[str, str] | None = Field(None, description="Feature-table key column → the label column "
                                             "holding it, e.g. {carrier: op_carrier} (default: the same names).")
    event_time: str | None = Field(None, description="Event-time column (default: declaration, else labels').")

    @model_validator(mode="after")
    def _keys_agree(self) -> FeatureRef:
        if self.join_keys is not None:
            if not self.join_keys:
                raise ValueError("join_keys is empty: map each key column of the feature table to a label column")
            if self.entity_keys is not None and set(self.join_keys) != set(self.entity_keys):
                raise ValueError(f"join_keys maps {sorted(self.join_keys)} but entity_keys are "
                                 f"{sorted(self.entity_keys)}: map exactly the entity keys")
        return self


class TrainingSetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Output Delta table for the training set.")
    labels: str = Field(description="Labels/events table: entity keys + event time + label(s).")
    labels_version: int | None = Field(None, ge=0)
    entity_keys: list[str] = Field(min_length=1, description="The label rows' identity (and the default "
                                   "join keys of feature refs that declare none).")
    event_time: str
    features: list[FeatureRef] = Field(min_length=1)
    engine: Literal["auto", "duckdb", "spark"] | None = Field(
        None, description="Join engine for this set (default: the profile's training_sets.engine).")

    @classmethod
    def parse(cls, data: dict[str, Any], where: str = "training-set spec") -> TrainingSetSpec:
        from lakeray.config import parse_spec

        return parse_spec(cls, data, where, "jobs/training_set.yaml", "fix the spec")


@dataclass(frozen=True)
class TrainingSetResult:
    table: str
    version: int
    rows: int
    content_hash: str
    inputs: dict[str, int]
    manifest_path: str
    seconds: float
    engine: str = "spark"


def manifest_dir(settings: Settings, name: str) -> str:
    """``<storage root>/_manifests/<name>``: a folder or an object-store prefix (a URI string)."""
    return storage.join(settings.storage_root, "_manifests", name)


def _pin(spark: SparkSession | None, settings: Settings, table: str, version: int | None) -> int:
    from lakeray.lakehouse.delta import latest_version, table_version

    path = settings.table_path(table)
    latest = table_version(spark, path) if spark is not None else latest_version(path)
    if version is None:
        return latest
    if version > latest:
        raise TableNotFoundError(f"{table} has no version {version} (latest is {latest})",
                                 "pick a version from `lakeray features history`")
    return version


def _resolved(spark: SparkSession | None, settings: Settings, spec: TrainingSetSpec) -> TrainingSetSpec:
    """The spec with every version pinned and every key/time column and join key filled in."""
    from lakeray.features.runner import discover_jobs

    declared = discover_jobs(settings)
    refs = []
    for ref in spec.features:
        job = declared.get(ref.table)
        keys = ref.entity_keys or (list(ref.join_keys) if ref.join_keys else None) \
            or (job.entity_keys if job and job.entity_keys else spec.entity_keys)
        join_keys = {k: (ref.join_keys or {}).get(k, k) for k in keys}
        if ref.join_keys is not None and set(ref.join_keys) != set(keys):
            raise ConfigError(f"feature ref {ref.table!r}: join_keys maps {sorted(ref.join_keys)} but the table's "
                              f"keys are {keys}", "map exactly the feature table's key columns to label columns")
        refs.append(ref.model_copy(update={
            "version": _pin(spark, settings, ref.table, ref.version),
            "entity_keys": list(keys),
            "join_keys": join_keys,
            "event_time": ref.event_time or (job.event_time if job and job.event_time else spec.event_time),
        }))
    return spec.model_copy(update={"labels_version": _pin(spark, settings, spec.labels, spec.labels_version),
                                   "features": refs})


ROWS_PER_PARTITION = 2_000_000


def _join_partitions(spark: SparkSession, settings: Settings, pinned: TrainingSetSpec) -> int:
    """Enough partitions that each as-of join partition holds ~2M rows (one Python worker's memory)."""
    from lakeray.lakehouse.delta import table_rows

    floor = int(spark.conf.get("spark.sql.shuffle.partitions"))
    try:
        counts = [table_rows(settings.table_path(t), v) for t, v in _pins(pinned)]
    except Exception:  # stats unreadable (e.g. an object store without credentials for delta-rs)
        return floor
    if any(c is None for c in counts):
        return floor
    return max(floor, -(-sum(counts) // ROWS_PER_PARTITION))


def _joined(spark: SparkSession, settings: Settings, pinned: TrainingSetSpec, hash_version: int,
            max_partition_rows: int | None) -> DataFrame:
    """The point-in-time join of a pinned spec, as a DataFrame (nothing computed yet)."""
    from lakeray.lakehouse.delta import read_table
    from lakeray.lakehouse.pit import MAX_PARTITION_ROWS, FeatureSource, point_in_time_join

    labels = read_table(spark, settings.table_path(pinned.labels), pinned.labels_version)
    sources = [FeatureSource(ref.table, read_table(spark, settings.table_path(ref.table), ref.version),
                             tuple(ref.entity_keys), ref.event_time, tuple(ref.columns), ref.max_age_s,
                             tuple(ref.join_keys[k] for k in ref.entity_keys))
               for ref in pinned.features]
    return point_in_time_join(labels, pinned.entity_keys, pinned.event_time, sources,
                              partitions=_join_partitions(spark, settings, pinned), hash_version=hash_version,
                              max_partition_rows=max_partition_rows or MAX_PARTITION_ROWS)


def _spark_action(action: Callable[[], Any]) -> Any:
    """Run a Spark action; a refusal raised inside a join worker comes back as that LakerayError."""
    from lakeray.lakehouse.pit import worker_error

    try:
        return action()
    except Exception as exc:
        meant = worker_error(exc)
        if meant is not None:
            raise meant from None
        raise


def _write_manifest(settings: Settings, pinned: TrainingSetSpec, version: int, digest: str, hash_version: int,
                    engine: str, started: float, extra: dict[str, Any] | None = None) -> TrainingSetResult:
    inputs = _inputs(pinned)
    rows = int(digest.split("-", 1)[0])
    manifest = {
        "training_set": pinned.name,
        "version": version,
        "rows": rows,
        "content_hash": digest,
        "hash_version": hash_version,
        "engine": engine,
        "inputs": inputs,
        "spec": pinned.model_dump(mode="json"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    target = storage.join(manifest_dir(settings, pinned.name), f"v{version}.json")
    storage.write_text_atomic(target, json.dumps(manifest, indent=2) + "\n")  # a reader never sees half of it
    return TrainingSetResult(pinned.name, version, rows, digest, inputs, target, time.perf_counter() - started,
                             engine)


def _pins(pinned: TrainingSetSpec) -> list[tuple[str, int]]:
    """Every input table of a pinned spec with its version: the labels first, then each feature ref."""
    return [(pinned.labels, pinned.labels_version), *[(r.table, r.version) for r in pinned.features]]


def _inputs(pinned: TrainingSetSpec) -> dict[str, int]:
    return dict(_pins(pinned))


def _metadata(pinned: TrainingSetSpec, engine: str) -> str:
    return json.dumps({"training_set": pinned.name, "inputs": _inputs(pinned), "engine": engine,
                       "build_id": uuid.uuid4().hex})


def _commit(spark: SparkSession, settings: Settings, pinned: TrainingSetSpec, joined: DataFrame,
            hash_version: int, started: float, digest: str | None = None,
            extra: dict[str, Any] | None = None) -> TrainingSetResult:
    """Write ``joined`` (Spark) as one commit of ``pinned.name`` and its manifest. The content hash is
    ``digest`` when the caller already has it, else observed during the write itself (one pass)."""
    from lakeray.lakehouse.delta import read_table, table_rows, write_table
    from lakeray.lakehouse.pit import content_hash, observed_content_hash

    observed_digest = None
    if digest is None:
        joined, observed_digest = observed_content_hash(joined, hash_version)
    path = settings.table_path(pinned.name)
    meta = _metadata(pinned, "spark")
    version = _spark_action(lambda: write_table(joined, path, user_metadata=meta))
    if observed_digest is not None:
        digest = observed_digest()
        committed = table_rows(path, version)
        if digest is None or (committed is not None and int(digest.split("-", 1)[0]) != committed):
            # A retried task can add its rows to the observed sums twice: hash what was committed instead.
            digest = content_hash(read_table(spark, path, version), hash_version)
    return _write_manifest(settings, pinned, version, digest, hash_version, "spark", started, extra)


# --- the DuckDB engine (in process, no JVM) -------------------------------------------------------------


def _machine_memory_mb() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)


def _duckdb_unsupported(settings: Settings, pinned: TrainingSetSpec) -> str | None:
    """Why the duckdb engine cannot build this pinned spec (read from the Delta logs only), or None."""
    from lakeray.lakehouse.arrow_hash import hashable
    from lakeray.lakehouse.delta import read_arrow
    from lakeray.lakehouse.pit_duckdb import spark_type_name, supported_time_type

    checks = [(pinned.labels, pinned.labels_version, pinned.event_time),
              *[(r.table, r.version, r.event_time) for r in pinned.features]]
    wanted = {pinned.labels: None, **{r.table: set(r.columns) for r in pinned.features}}
    for table, version, time_col in checks:
        schema = read_arrow(settings.table_path(table), version, files=[]).schema
        if time_col in schema.names and not supported_time_type(schema.field(time_col).type):
            return (f"{table}.{time_col} is {spark_type_name(schema.field(time_col).type)} (the duckdb engine "
                    "joins on timestamp or date event times)")
        # Every output column is hashed in numpy, so its type must be one arrow_hash reproduces.
        for field in schema:
            if (wanted[table] is None or field.name in wanted[table]) and not hashable(field.type):
                return f"{table}.{field.name} is {spark_type_name(field.type)} (no Spark-identical Arrow hash)"
    return None


def _input_mb(settings: Settings, pinned: TrainingSetSpec) -> float:
    from lakeray.lakehouse.delta import table_bytes

    return sum(table_bytes(settings.table_path(t), v) for t, v in _pins(pinned)) / 2**20


def choose_engine(settings: Settings, spec: TrainingSetSpec) -> tuple[str, str]:
    """The engine a build of ``spec`` uses, and why: the spec's own ``engine``, else the profile's
    ``training_sets.engine``; ``auto`` is duckdb for a local profile whose pinned inputs are at most
    ``duckdb_max_input_mb`` of Delta files, else spark. Reads only Delta logs (no JVM).

    A forced ``duckdb`` that cannot run (object-store tables, event times that are not timestamps or
    dates) is a ConfigError naming the setting, raised before anything is read or written."""
    engine, why, _ = _choose(settings, spec)
    return engine, why


def _choose(settings: Settings, spec: TrainingSetSpec) -> tuple[str, str, TrainingSetSpec | None]:
    """:func:`choose_engine`, plus the spec it pinned (without Spark) to decide, so a duckdb build pins
    once; None when it decided without pinning."""
    cfg = settings.profile.training_sets
    wanted = spec.engine or cfg.engine
    if wanted == "spark":
        return "spark", "engine: spark", None
    local = settings.profile.spark.master.startswith("local") and storage.is_local(settings.storage_root)
    if wanted == "auto" and not local:
        return "spark", "auto: the profile is not local", None
    pinned = _resolved(None, settings, spec)
    why_not = _duckdb_unsupported(settings, pinned)
    if why_not is None and not cfg.duckdb_spill:
        need, memory = _input_mb(settings, pinned) * ARROW_EXPANSION, _duckdb_memory_mb(settings)
        if need > memory:
            why_not = (f"its inputs need about {need:,.0f} MiB in memory, over training_sets.duckdb_memory_limit_mb "
                       f"{memory:,}, and training_sets.duckdb_spill is off")
    if wanted == "duckdb":
        if why_not:
            raise ConfigError(f"training set {spec.name!r}: engine duckdb cannot build it: {why_not}",
                              "set engine: spark (or auto) in the spec or training_sets.engine in the profile"
                              + (", or turn duckdb_spill on" if not cfg.duckdb_spill else ""))
        return "duckdb", "engine: duckdb", pinned
    if why_not:
        return "spark", f"auto: {why_not}", pinned
    limit = cfg.duckdb_max_input_mb or _machine_memory_mb() // 8
    size = _input_mb(settings, pinned)
    if size > limit:
        return "spark", f"auto: inputs {size:,.0f} MiB > duckdb_max_input_mb {limit:,}", pinned
    return "duckdb", f"auto: local inputs of {size:,.0f} MiB <= {limit:,} MiB", pinned


# Arrow in memory against the same rows as compressed parquet (measured ~3-4x on the bench's tables).
ARROW_EXPANSION = 4


def _duckdb_memory_mb(settings: Settings) -> int:
    return settings.profile.training_sets.duckdb_memory_limit_mb or _machine_memory_mb() // 2


def _duckdb_joined(settings: Settings, pinned: TrainingSetSpec, hash_version: int):
    """The point-in-time join of a pinned spec as an Arrow table, in DuckDB."""
    from concurrent.futures import ThreadPoolExecutor

    import duckdb

    from lakeray.lakehouse.delta import read_arrow
    from lakeray.lakehouse.pit import FeatureSource
    from lakeray.lakehouse.pit_duckdb import point_in_time_join_arrow

    def read_source(ref) -> FeatureSource:
        wanted = list(dict.fromkeys([*ref.entity_keys, ref.event_time, *ref.columns]))
        path = settings.table_path(ref.table)
        have = read_arrow(path, ref.version, files=[]).schema.names
        # Missing columns are reported by the join's checks, with the Spark engine's words.
        table = read_arrow(path, ref.version, columns=[c for c in wanted if c in have])
        return FeatureSource(ref.table, table, tuple(ref.entity_keys), ref.event_time, tuple(ref.columns),
                             ref.max_age_s, tuple(ref.join_keys[k] for k in ref.entity_keys))

    # The tables are read side by side: a read is Parquet decoding in Arrow's threads plus per-file
    # waits (object stores), and one table alone does not keep both cores busy.
    with ThreadPoolExecutor(2) as pool:
        labels_read = pool.submit(read_arrow, settings.table_path(pinned.labels), pinned.labels_version)
        sources = list(pool.map(read_source, pinned.features))
        labels = labels_read.result()
    spill = None
    if settings.profile.training_sets.duckdb_spill:
        # DuckDB spills to a local folder: beside a local lakehouse, else in this machine's temp folder.
        root = settings.storage_root if storage.is_local(settings.storage_root) else tempfile.gettempdir()
        spill = storage.join(root, "_tmp", "duckdb")
        storage.makedirs(spill)
    memory = _duckdb_memory_mb(settings)
    try:
        return point_in_time_join_arrow(labels, pinned.entity_keys, pinned.event_time, sources, hash_version,
                                        memory_limit_mb=memory, temp_dir=spill)
    except duckdb.OutOfMemoryException as exc:
        raise DataQualityError(f"training set {pinned.name!r}: DuckDB ran out of its {memory:,} MiB "
                               f"(training_sets.duckdb_memory_limit_mb{'' if spill else ', spilling off'}): "
                               f"{str(exc).splitlines()[0]}; nothing was written",
                               "raise training_sets.duckdb_memory_limit_mb, turn duckdb_spill on, or build "
                               "with engine: spark") from None


def _duckdb_commit(settings: Settings, pinned: TrainingSetSpec, table, digest: str | None, hash_version: int,
                   started: float, extra: dict[str, Any] | None = None) -> TrainingSetResult:
    """Write ``table`` (one delta-rs commit) and its manifest. Without ``digest`` the content hash is
    computed while delta-rs writes (numpy and Rust both run without the GIL: ~0.3 s of 5M rows saved);
    the types were checked hashable before the join, so the hash cannot fail after the commit."""
    from concurrent.futures import ThreadPoolExecutor

    from lakeray.lakehouse.arrow_hash import content_hash
    from lakeray.lakehouse.delta import write_arrow

    with ThreadPoolExecutor(1) as pool:
        hashing = pool.submit(content_hash, table, hash_version) if digest is None else None
        version = write_arrow(table, settings.table_path(pinned.name), _metadata(pinned, "duckdb"))
        digest = hashing.result() if hashing is not None else digest
    return _write_manifest(settings, pinned, version, digest, hash_version, "duckdb", started, extra)


def build_training_set(spark: SparkSession | None, settings: Settings, spec: TrainingSetSpec,
                       max_partition_rows: int | None = None) -> TrainingSetResult:
    """Pin, join, write one commit, write the manifest. Bad specs fail before anything is written, and
    a failed build leaves no trace of a table that did not exist before.

    The engine is :func:`choose_engine`'s; ``spark`` may be None when it is duckdb (then no JVM starts).
    """
    from lakeray.lakehouse.pit import HASH_VERSION

    started = time.perf_counter()
    engine, _, pinned = _choose(settings, spec)
    if engine == "duckdb":
        table = _duckdb_joined(settings, pinned, HASH_VERSION)
        return _duckdb_commit(settings, pinned, table, None, HASH_VERSION, started)
    pinned = _resolved(_need_spark(spark, spec), settings, spec)
    joined = _joined(spark, settings, pinned, HASH_VERSION, max_partition_rows)
    return _commit(spark, settings, pinned, joined, HASH_VERSION, started)


def _need_spark(spark: SparkSession | None, spec: TrainingSetSpec) -> SparkSession:
    if spark is None:
        raise ConfigError(f"training set {spec.name!r} is built by the spark engine, and no Spark session was given",
                          "pass a session from lakeray.lakehouse.spark.create_spark_session (or use engine: duckdb)")
    return spark


def load_manifest(settings: Settings, name: str, version: int | None = None) -> dict[str, Any]:
    folder = manifest_dir(settings, name)
    found = sorted((n for n in storage.list_dir(folder) if re.fullmatch(r"v\d+\.json", n)),
                   key=lambda n: int(n[1:-5]))
    if version is not None:
        found = [n for n in found if n == f"v{version}.json"]
    if not found:
        which = f" version {version}" if version is not None else ""
        raise TableNotFoundError(f"no manifest for training set {name!r}{which}",
                                 "build it first with build_training_set / `lakeray features training-set`")
    return json.loads(storage.read_text(storage.join(folder, found[-1])))


def _manifest_spec(manifest: dict[str, Any]) -> tuple[TrainingSetSpec, int]:
    """The pinned spec of a manifest and its row-hash scheme. Manifests from before per-table join
    keys (no ``hash_version``: scheme 1) matched each feature table's keys to the labels' keys by
    position, and hashed with nulls skipped: both are replayed as they were."""
    hash_version = int(manifest.get("hash_version", 1))
    spec = TrainingSetSpec.parse(manifest["spec"], "manifest")
    if hash_version == 1:
        spec = spec.model_copy(update={"features": [
            ref if ref.join_keys else ref.model_copy(update={
                "join_keys": dict(zip(ref.entity_keys or spec.entity_keys, spec.entity_keys, strict=True))})
            for ref in spec.features]})
    return spec, hash_version


def rebuild_spec(manifest: dict[str, Any], name: str | None = None, engine: str | None = None) -> TrainingSetSpec:
    """The pinned spec a rebuild of ``manifest`` runs: into ``name`` (default: the same table), on
    ``engine`` (default: the spec's own, else the profile's choice)."""
    spec, _ = _manifest_spec(manifest)
    return spec.model_copy(update={"name": name or spec.name, "engine": engine or spec.engine})


def rebuild_training_set(spark: SparkSession | None, settings: Settings, manifest: dict[str, Any],
                         name: str | None = None, engine: str | None = None) -> TrainingSetResult:
    """Replay a manifest (every version pinned) and check the rows are the same, bit for bit.

    The content hash is compared *before* anything is committed: identical rows become a new version
    of the training set (or of ``name``); different rows raise DataQualityError and the training set
    is left as it was. With ``name`` the rebuilt rows are written there either way, so they can be
    compared with the original (the error then says where they are). ``engine`` (default: the profile's
    choice, which need not be the engine that built the original) gives the same hash on either engine.
    """
    started = time.perf_counter()
    spec, hash_version = _manifest_spec(manifest)
    original = f"{spec.name}@{manifest['version']}"
    target = rebuild_spec(manifest, name, engine)
    chosen, _, pinned = _choose(settings, target)
    rebuild_of = {"rebuild_of": {"training_set": spec.name, "version": manifest["version"]}}
    written = None
    if chosen == "duckdb":
        from lakeray.lakehouse.arrow_hash import content_hash as arrow_content_hash

        table = _duckdb_joined(settings, pinned, hash_version)
        digest = arrow_content_hash(table, hash_version)
        identical = digest == manifest["content_hash"]
        rebuild_of["rebuild_of"]["identical"] = identical
        if identical or name:
            written = _duckdb_commit(settings, pinned, table, digest, hash_version, started, rebuild_of)
    else:
        from pyspark import StorageLevel

        from lakeray.lakehouse.pit import content_hash

        pinned = _resolved(_need_spark(spark, target), settings, target)
        # Hash first, then commit from the same cached rows: the join runs once.
        joined = _joined(spark, settings, pinned, hash_version, None).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            digest = _spark_action(lambda: content_hash(joined, hash_version))
            identical = digest == manifest["content_hash"]
            rebuild_of["rebuild_of"]["identical"] = identical
            if identical or name:
                written = _commit(spark, settings, pinned, joined, hash_version, started, digest, rebuild_of)
        finally:
            joined.unpersist()
    if not identical:
        where = (f"; the rebuilt rows are in {written.table}@{written.version} to compare" if written else
                 f"; nothing was written, {spec.name} is unchanged")
        raise DataQualityError(f"rebuild of {original} differs: {digest} vs {manifest['content_hash']}{where}",
                               "an input version was vacuumed or rewritten: check `lakeray features history` "
                               "of the inputs " + ", ".join(f"{t}@{v}" for t, v in manifest["inputs"].items()))
    return written
