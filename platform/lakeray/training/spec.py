"""Train specs: what to train, on which pinned rows, how; validated against the table before any worker starts.

A ``TrainSpec`` is a YAML file (``jobs/training/*.yaml``). :func:`plan_training` pins the training set
to one Delta version, checks every named column and its type against that version's schema, works out
the feature list, the categorical vocabularies and the split, and returns a :class:`TrainPlan`: a frozen
description that workers receive (it pickles) and that MLflow records. Every problem a user can make
in a spec is a ConfigError or DataQualityError here, naming the field, before Ray spends a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lakeray.errors import ClusterError, ConfigError, DataQualityError

if TYPE_CHECKING:
    import pyarrow as pa

    from lakeray.config import Settings

__all__ = ["TrainSpec", "ModelSpec", "SplitSpec", "ScalingSpec", "EarlyStopping", "MetricSpec", "RegisterSpec",
           "TrainPlan", "load_train_spec", "plan_training", "resolve_gpu", "DEFAULT_TORCH_MODULE"]

DEFAULT_TORCH_MODULE = "lakeray.training.torch_models:TabularMLP"
# Metrics a spec may optimise, with the direction that is better.
_METRICS = {"auc": "max", "aucpr": "max", "logloss": "min", "error": "min", "rmse": "min", "mae": "min"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Model):
    kind: Literal["xgboost", "torch"] = Field(description="xgboost (Ray Train XGBoost) or torch (TorchTrainer, DDP).")
    module: str | None = Field(None, description="torch only: `package.module:Factory` building the nn.Module "
                               f"(default {DEFAULT_TORCH_MODULE}); called as Factory(num_features, "
                               "categorical_cardinalities, **params).")
    params: dict[str, Any] = Field(default_factory=dict, description="xgboost.train params, or the torch "
                                   "module's keyword arguments.")
    rounds: int = Field(100, ge=1, description="Boosting rounds (xgboost) or epochs (torch).")
    batch_size: int = Field(1024, ge=1, description="torch: rows per step per worker.")
    learning_rate: float = Field(1e-3, gt=0, description="torch: AdamW learning rate.")
    seed: int = Field(7, description="Seed for boosting subsampling / torch initialisation and shuffling.")

    @model_validator(mode="after")
    def _module_only_for_torch(self) -> ModelSpec:
        if self.module is not None and self.kind != "torch":
            raise ValueError("module is only for kind: torch (xgboost has no module)")
        if self.module is not None and ":" not in self.module:
            raise ValueError(f"module {self.module!r} must be `package.module:Factory`")
        return self


class FeatureSelect(_Model):
    all_except: list[str] = Field(default_factory=list, description="Every numeric, boolean and string column "
                                  "except these (and the label and split column).")


class SplitSpec(_Model):
    kind: Literal["hash", "time"] = Field("hash", description="hash: rows whose id hashes below `fraction` are "
                                          "held out; time: rows at or after `cutoff` (or the latest `fraction`).")
    column: str = Field(description="The id column (hash) or the time column (time).")
    fraction: float | None = Field(None, gt=0, lt=1, description="Held-out share (default 0.2).")
    cutoff: str | None = Field(None, description="time only: ISO timestamp; rows at or after it are held out.")

    @model_validator(mode="after")
    def _one_rule(self) -> SplitSpec:
        if self.kind == "hash" and self.cutoff is not None:
            raise ValueError("cutoff is only for kind: time")
        if self.kind == "time" and self.cutoff is not None and self.fraction is not None:
            raise ValueError("give either cutoff or fraction for a time split, not both")
        if self.cutoff is None and self.fraction is None:
            self.fraction = 0.2
        return self


class ScalingSpec(_Model):
    num_workers: int = Field(1, ge=1, description="Training workers. 1 trains in one Ray task without a worker "
                             "group (seconds less start-up); >1 runs a Ray Train worker group (data parallel).")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and threads) per worker.")
    use_gpu: Literal["auto"] | bool = Field("auto", description="auto: one GPU per worker when the cluster has "
                                            "that many; true: require them (error otherwise); false: CPU.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Where a worker group's workers go (Ray placement-group strategy): PACK fills one "
        "node first (fastest collectives); SPREAD puts them on different nodes where it can, so losing a host "
        "costs fewer workers; STRICT_* refuse to start otherwise. Ignored for one worker.")


class EarlyStopping(_Model):
    rounds: int = Field(ge=1, description="Stop after this many rounds/epochs without improving the metric "
                        "on the validation split.")


class MetricSpec(_Model):
    name: str = Field("auc", description=f"Metric to optimise and compare models on: {', '.join(_METRICS)}.")
    mode: Literal["max", "min"] | None = Field(None, description="Better direction (default: the metric's own).")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in _METRICS:
            raise ValueError(f"unknown metric {value!r}; one of {', '.join(_METRICS)}")
        return value

    @property
    def direction(self) -> str:
        return self.mode or _METRICS[self.name]


class RegisterSpec(_Model):
    model_name: str | None = Field(None, description="Registered model name (default: mlflow.model_name).")
    alias: str | None = Field("challenger", description="Alias the new version gets (null: none). "
                              "`lakeray models promote` moves champion.")


class TrainSpec(_Model):
    name: str = Field(description="Run name prefix and the default checkpoint folder name.")
    model: ModelSpec
    training_set: str = Field(description="`table@version`, or `table` for its latest version at plan time "
                              "(a training set's manifest is found by the same name).")
    label: str
    features: list[str] | FeatureSelect = Field(description="A list of columns, or {all_except: [...]}.")
    categorical: list[str] = Field(default_factory=list, description="String/boolean feature columns to treat as "
                                   "categories (string features are categorical anyway).")
    split: SplitSpec
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint_every: int = Field(25, ge=1, description="Checkpoint (and report) every N rounds/epochs; "
                                  "never every round (each Ray Train report costs ~2 s).")
    max_failures: int = Field(1, ge=0, description="Worker failures survived by restarting from the last checkpoint.")
    early_stopping: EarlyStopping | None = None
    metric: MetricSpec = Field(default_factory=MetricSpec)
    registry: RegisterSpec = Field(default_factory=RegisterSpec, description="Where the trained model is registered.")
    ingest: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: each worker holds its shard's rows; stream (xgboost): rows go file by file "
        "into XGBoost's quantised matrix, about 4x less memory; auto: stream when a shard would not fit "
        "in half a worker's memory.")

    @field_validator("training_set")
    @classmethod
    def _table_at_version(cls, value: str) -> str:
        name, _, version = value.partition("@")
        if not name or (version and not version.isdigit()):
            raise ValueError(f"{value!r} must be `table` or `table@version` (a non-negative integer)")
        return value

    @model_validator(mode="after")
    def _metric_fits_model(self) -> TrainSpec:
        if self.ingest == "stream" and self.model.kind != "xgboost":
            raise ValueError("ingest: stream is for xgboost (the torch trainer holds its rows as tensors)")
        if self.model.kind == "torch" and self.metric.name not in ("auc", "logloss", "aucpr", "error"):
            raise ValueError(f"metric {self.metric.name!r}: the torch trainer is a binary classifier "
                             "(auc, aucpr, logloss, error)")
        return self

    @classmethod
    def parse(cls, data: Any, where: str = "train spec") -> TrainSpec:
        from lakeray.config import parse_spec

        return parse_spec(cls, data, where, "jobs/training/*.yaml", "fix the spec (docs/training.md lists every field)")

    def digest(self) -> str:
        """A stable hash of the spec as validated (defaults included): MLflow's `lakeray.spec_hash`."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_train_spec(path: str | os.PathLike[str]) -> TrainSpec:
    from lakeray.config import read_spec_file

    return TrainSpec.parse(read_spec_file(path, "train spec", "jobs/training/fraud_xgboost.yaml"), str(path))


@dataclass(frozen=True)
class TrainPlan:
    """A spec pinned and checked against one table version: everything a worker needs (it pickles)."""

    spec: TrainSpec
    where: str  # the spec file, for messages
    table: str
    path: str
    version: int
    rows: int
    label: str
    features: list[str]
    categorical: dict[str, list[str]]  # feature → its categories (codes are indices), for string/bool columns
    skipped: dict[str, str]  # columns left out by all_except, with the reason
    split_column: str
    split_kind: str
    split_fraction: float | None
    split_cutoff_us: int | None  # time split: held out when time >= this (microseconds since the epoch)
    use_gpu: bool = False
    manifest: dict[str, Any] | None = None  # the training set's manifest, when the table is one
    label_classes: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_workers(self) -> int:
        return self.spec.scaling.num_workers

    @property
    def cpus_per_worker(self) -> int:
        return self.spec.scaling.cpus_per_worker

    @property
    def input(self) -> str:
        return f"{self.table}@{self.version}"


def _is_numeric(t: pa.DataType) -> bool:
    import pyarrow.types as pat

    return pat.is_integer(t) or pat.is_floating(t) or pat.is_decimal(t)


def _is_categorical_type(t: pa.DataType) -> bool:
    import pyarrow.types as pat

    return pat.is_string(t) or pat.is_large_string(t) or pat.is_boolean(t) or pat.is_dictionary(t)


def _pin(settings: Settings, spec: TrainSpec, where: str) -> tuple[str, str, int, pa.Schema]:
    from lakeray.lakehouse.delta import latest_version, read_arrow, table_files

    name, _, version = spec.training_set.partition("@")
    path = settings.table_path(name)
    try:
        latest = latest_version(path)
    except Exception:  # noqa: BLE001 - deltalake raises its own TableNotFoundError
        from lakeray.errors import TableNotFoundError

        raise TableNotFoundError(f"{where}: training_set: table {name!r} does not exist under {settings.storage_root}",
                                 "build it first (`lakeray features training-set SPEC`) or fix the name") from None
    pinned = int(version) if version else latest
    if pinned > latest:
        raise ConfigError(f"{where}: training_set: {name} has no version {pinned} (latest is {latest})",
                          "pin an existing version, or drop @version for the latest")
    fix = "pin a version whose files still exist (`lakeray tables history NAME`), or rebuild the training set"
    try:
        schema = read_arrow(path, pinned, files=[]).schema
        files = table_files(path, pinned)
    except Exception as exc:  # noqa: BLE001 - an expired log fails to load the version
        raise DataQualityError(f"{where}: training_set: {name}@{pinned} cannot be read ({str(exc).splitlines()[0]}); "
                               "its log was removed (log retention)", fix) from None
    missing = _missing_files(files)
    if missing:
        raise DataQualityError(f"{where}: training_set: {name}@{pinned} lost {len(missing)} of its {len(files)} "
                               f"data file(s) (VACUUM removed them, e.g. {missing[0].rsplit('/', 1)[-1]})", fix)
    return name, path, pinned, schema


def _missing_files(files: list[str]) -> list[str]:
    """Data files of a version that are gone: VACUUM keeps the log but deletes files older versions need."""
    from pyarrow import fs

    from lakeray import storage

    if not files:
        return []
    filesystem, _ = storage.to_arrow_fs(files[0])  # the profile's object-store credentials
    paths = [storage.to_arrow_fs(f)[1] for f in files]
    return [f for f, info in zip(files, filesystem.get_file_info(paths), strict=True)
            if info.type == fs.FileType.NotFound]


def _select_features(spec: TrainSpec, schema: pa.Schema, where: str) -> tuple[list[str], dict[str, str]]:
    names = set(schema.names)
    reserved = {spec.label, spec.split.column}
    skipped: dict[str, str] = {}
    if isinstance(spec.features, FeatureSelect):
        unknown = [c for c in spec.features.all_except if c not in names]
        if unknown:
            raise ConfigError(f"{where}: features.all_except: no column(s) {unknown} in the training set",
                              f"the columns are: {', '.join(schema.names)}")
        excluded = set(spec.features.all_except) | reserved
        features = []
        for f in schema:
            if f.name in excluded:
                continue
            if _is_numeric(f.type) or _is_categorical_type(f.type):
                features.append(f.name)
            else:
                skipped[f.name] = f"type {f.type} is neither numeric nor categorical"
        if not features:
            raise ConfigError(f"{where}: features: all_except leaves no numeric or categorical column",
                              "list the feature columns explicitly")
        return features, skipped
    features = list(spec.features)
    if not features:
        raise ConfigError(f"{where}: features: the list is empty", "name at least one feature column")
    unknown = [c for c in features if c not in names]
    if unknown:
        raise ConfigError(f"{where}: features: no column(s) {unknown} in the training set",
                          f"the columns are: {', '.join(schema.names)}")
    dupes = sorted({c for c in features if features.count(c) > 1})
    if dupes:
        raise ConfigError(f"{where}: features: {dupes} listed twice", "list each feature once")
    leaked = [c for c in features if c in reserved]
    if leaked:
        raise ConfigError(f"{where}: features: {leaked} is the label or the split column",
                          "a model must not see its label; drop it from features")
    for c in features:
        t = schema.field(c).type
        if not (_is_numeric(t) or _is_categorical_type(t)):
            raise ConfigError(f"{where}: features: column {c!r} has type {t}, which is neither numeric nor "
                              "categorical", "derive a numeric feature from it in the feature job, or drop it")
    return features, skipped


def _categories(path: str, version: int, columns: list[str], schema: pa.Schema) -> dict[str, list[str]]:
    """Sorted distinct values of each categorical column (nulls excluded): codes are their indices, the
    same on every worker and at serving time."""
    import pyarrow.compute as pc
    import pyarrow.types as pat

    from lakeray.lakehouse.delta import iter_batches

    if not columns:
        return {}
    seen: dict[str, set[str]] = {c: set() for c in columns}
    for batch in iter_batches(path, version, columns=columns):
        for c in columns:
            col = batch.column(c)
            if pat.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            if pat.is_boolean(col.type):
                col = pc.cast(col, "string")
            seen[c].update(v for v in pc.unique(col.drop_null()).to_pylist())
    for c in columns:
        if pat.is_boolean(schema.field(c).type):
            seen[c] |= {"false", "true"}
    return {c: sorted(values) for c, values in seen.items()}


def _cutoff_us(path: str, version: int, spec: TrainSpec, schema: pa.Schema, where: str) -> int | None:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.types as pat

    from lakeray.lakehouse.delta import read_arrow

    split = spec.split
    t = schema.field(split.column).type
    if split.kind == "hash":
        if not pat.is_integer(t):
            raise ConfigError(f"{where}: split.column: {split.column!r} has type {t}; a hash split needs an "
                              "integer id column", "name an integer id column, or use kind: time")
        return None
    if not (pat.is_timestamp(t) or pat.is_date(t)):
        raise ConfigError(f"{where}: split.column: {split.column!r} has type {t}; a time split needs a "
                          "timestamp or date column", "name the event-time column, or use kind: hash")
    if split.cutoff is not None:
        try:
            return int(np.datetime64(split.cutoff.replace("Z", ""), "us").astype(np.int64))
        except ValueError:
            raise ConfigError(f"{where}: split.cutoff: {split.cutoff!r} is not an ISO timestamp",
                              "write it like 2024-03-01 or 2024-03-01T12:00:00") from None
    col = read_arrow(path, version, columns=[split.column]).column(split.column)
    micros = pc.cast(pc.cast(col, "timestamp[us]") if pat.is_date(t) else col, "int64")
    values = micros.drop_null().to_numpy()
    if len(values) == 0:
        raise DataQualityError(f"{where}: split.column: {split.column!r} is all null", "fill the event time")
    return int(np.quantile(values, 1 - split.fraction, method="higher"))


def plan_training(settings: Settings, spec: TrainSpec, where: str = "train spec") -> TrainPlan:
    """Pin the training set and check the spec against its schema. Nothing starts; nothing is written."""
    import pyarrow.types as pat

    from lakeray.lakehouse.delta import table_rows

    name, path, version, schema = _pin(settings, spec, where)
    names = schema.names
    for fld, column in (("label", spec.label), ("split.column", spec.split.column)):
        if column not in names:
            raise ConfigError(f"{where}: {fld}: no column {column!r} in {name}@{version}",
                              f"the columns are: {', '.join(names)}")
    label_type = schema.field(spec.label).type
    if not (pat.is_integer(label_type) or pat.is_boolean(label_type)):
        raise ConfigError(f"{where}: label: {spec.label!r} has type {label_type}; the trainers fit binary "
                          "classifiers over a 0/1 (or boolean) label", "cast the label to int in the job")
    features, skipped = _select_features(spec, schema, where)
    unknown = [c for c in spec.categorical if c not in features]
    if unknown:
        raise ConfigError(f"{where}: categorical: {unknown} not among the features", "list only feature columns")
    numeric_cats = [c for c in spec.categorical if not _is_categorical_type(schema.field(c).type)]
    if numeric_cats:
        types = ", ".join(f"{c}: {schema.field(c).type}" for c in numeric_cats)
        raise ConfigError(f"{where}: categorical: {types} is numeric; categorical columns are strings or booleans",
                          "drop it from categorical (numeric features are used as numbers), or cast it to "
                          "string in the feature job")
    cat_columns = [c for c in features if _is_categorical_type(schema.field(c).type)]
    cutoff = _cutoff_us(path, version, spec, schema, where)
    manifest = _manifest_for(settings, name, version)
    plan = TrainPlan(
        spec=spec, where=where, table=name, path=path, version=version, rows=int(table_rows(path, version) or 0),
        label=spec.label, features=features, categorical=_categories(path, version, cat_columns, schema),
        skipped=skipped, split_column=spec.split.column, split_kind=spec.split.kind,
        split_fraction=spec.split.fraction, split_cutoff_us=cutoff, manifest=manifest)
    return _check_split(plan)


def _check_split(plan: TrainPlan) -> TrainPlan:
    """Count each side of the split by class (label and split column only): a side without both
    classes cannot train or be evaluated, so it fails here, before any worker starts."""
    import dataclasses

    import numpy as np

    from lakeray.lakehouse.delta import iter_batches
    from lakeray.training.data import labels, validation_mask

    counts = np.zeros((2, 2), dtype=np.int64)  # [train/valid][class 0/1]
    nulls = 0
    import pyarrow as pa

    for batch in iter_batches(plan.path, plan.version, columns=list(dict.fromkeys([plan.split_column, plan.label]))):
        table = pa.Table.from_batches([batch])
        nulls += table.column(plan.label).null_count
        y = labels(table, plan)
        held = validation_mask(table, plan)
        for side, mask in ((0, ~held), (1, held)):
            counts[side, 1] += int(np.sum(y[mask] == 1))
            counts[side, 0] += int(np.sum(y[mask] == 0))
    if nulls:
        raise DataQualityError(f"{plan.where}: label: {plan.label!r} is null in {nulls} row(s) of {plan.input}",
                               "drop or fill rows without a label in the training set")
    for side, name in ((0, "training"), (1, "validation")):
        if counts[side].sum() == 0:
            raise DataQualityError(f"{plan.where}: split: the {name} split of {plan.input} is empty",
                                   "change split.fraction / split.cutoff")
        if min(counts[side]) == 0:
            cls = int(np.argmax(counts[side]))
            raise DataQualityError(f"{plan.where}: split: the {name} split of {plan.input} has a single class "
                                   f"({plan.label} = {cls} in all {counts[side].sum():,} rows)",
                                   "move split.cutoff / split.fraction, or build a training set with both classes")
    if plan.rows and int(counts.sum()) != plan.rows:
        raise DataQualityError(f"{plan.where}: label: {plan.label!r} holds values other than 0 and 1 in "
                               f"{plan.input}", "the trainers fit binary classifiers: map the label to 0/1")
    return dataclasses.replace(plan, extra={**plan.extra, "train_rows": int(counts[0].sum()),
                                            "valid_rows": int(counts[1].sum())})


def _manifest_for(settings: Settings, name: str, version: int) -> dict[str, Any] | None:
    # The layout features.training_sets writes (<root>/_manifests/<name>/v<N>.json); training may not
    # import features (sibling layers), so it reads the file itself. A plain table has none.
    from lakeray import storage

    path = storage.join(settings.storage_root, "_manifests", name, f"v{version}.json")
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def resolve_gpu(use_gpu: str | bool, cluster_gpus: float, num_workers: int, where: str = "train spec") -> bool:
    """auto → GPUs when the cluster has one per worker; true without them → ClusterError before any worker starts."""
    enough = cluster_gpus >= num_workers
    if use_gpu is True and not enough:
        have = "no GPU" if cluster_gpus == 0 else f"{cluster_gpus:g} GPU(s)"
        raise ClusterError(f"{where}: scaling.use_gpu: true needs {num_workers} GPU(s) (one per worker), the "
                           f"Ray cluster has {have}", "set use_gpu: auto or false, or add GPU nodes")
    return bool(use_gpu is True or (use_gpu == "auto" and cluster_gpus >= 1 and enough))
