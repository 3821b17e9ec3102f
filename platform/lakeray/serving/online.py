"""Online features: the newest feature values per entity, in a replica's memory, from Delta tables.

Two halves, like Feast's feature service (what a model reads) and online store (where it is read):

- :func:`plan_online_features` runs at deploy time, on the driver. It resolves which model feature
  comes from which table from the model's own training set (the run's ``lakeray.manifest`` tag → the
  point-in-time join's feature refs: table, columns, entity keys, the label column each key joined
  on, event time, ``max_age_s``), and names each column the way the join named it (``<table>__<col>``
  when a label column took the name). What no table provides is a request-time field. The plan is
  checked against the tables' schemas and travels as JSON in the app's ``args``.
- :class:`OnlineStore` runs in the replica. It reads a pinned version of each table with delta-rs
  (no Spark), keeps the newest row per entity (by the event time) as a float32 matrix encoded like the
  training matrix, plus a dict from entity key to row. A batch lookup is one dict probe per key and one
  fancy-index gather per table; an unknown entity (or one whose newest row is older than ``max_age_s``)
  gets the defaults row and is flagged. A background thread checks every ``refresh_s`` for a newer
  version, loads it aside and swaps it in with one reference assignment: a batch reads one snapshot.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from lakeray.errors import ConfigError, LakerayError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from lakeray.config import Settings
    from lakeray.serving.model import ServedModel
    from lakeray.serving.spec import OnlineFeatures

__all__ = ["OnlinePlan", "OnlineTablePlan", "OnlineStore", "Lookup", "plan_online_features"]

_FIX = "fix `features:` in the serve spec (docs/serving.md, Online features)"


class OnlineTablePlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table: str
    uri: str
    entity_keys: list[str]
    request_keys: list[str] = Field(description="The request field of each entity key, in the same order.")
    key_types: list[str] = Field(description="'int' or 'str' per key: the request field's type.")
    features: dict[str, str] = Field(description="Table column → the model feature it feeds.")
    event_time: str | None = None
    max_age_s: float | None = None
    version: int | None = Field(None, description="Pinned version, or none: the latest, followed.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="Model feature → value when unknown.")


class OnlinePlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tables: list[OnlineTablePlan]
    refresh_s: float = 30.0

    def request_fields(self) -> dict[str, str]:
        """Request field → type ('int'/'str') of every entity key field."""
        return {f: t for table in self.tables for f, t in zip(table.request_keys, table.key_types, strict=True)}

    def looked_up(self) -> set[str]:
        return {feature for table in self.tables for feature in table.features.values()}


# ---------------------------------------------------------------------------------------------- deploy side
def _model_features(settings: Settings, pinned_uri: str) -> tuple[list[str], dict[str, str]]:
    """The model's features (features.json, else its signature) and its run's tags."""
    import mlflow

    from lakeray.registry import mlflow_client

    client = mlflow_client(settings)
    name, _, version = pinned_uri.removeprefix("models:/").rpartition("/")
    registered = client.get_model_version(name, version)
    try:
        found = mlflow.artifacts.load_dict(f"runs:/{registered.run_id}/lakeray/features.json")
        features = list(found["features"])
    except Exception:  # registered outside lakeray: the signature's column names
        from mlflow.models import get_model_info

        signature = get_model_info(pinned_uri).signature
        features = list(signature.inputs.input_names()) if signature and signature.inputs.has_input_names() else []
    tags = client.get_run(registered.run_id).data.tags if registered.run_id else {}
    return features, dict(tags)


def _schema(uri: str, version: int | None) -> pa.Schema:
    from lakeray.lakehouse.delta import head_arrow

    return head_arrow(uri, version, 0).schema


def _from_training_set(settings: Settings, tags: dict[str, str], pinned_uri: str,
                       features: list[str]) -> list[dict[str, Any]]:
    """The feature refs of the model's training set, with the column names the join gave them."""
    from lakeray import storage

    pinned = tags.get("lakeray.input", "")
    table, _, version = pinned.partition("@")
    relpath = tags.get("lakeray.manifest") or (f"_manifests/{table}/v{version}.json" if version.isdigit() else "")
    path = storage.join(settings.storage_root, relpath) if relpath else ""
    if not path or not storage.exists(path):
        raise ConfigError(f"features: {pinned_uri} was not trained on a lakeray training set (its run has no "
                          "training-set manifest), so the tables its features come from are unknown",
                          "list them under features.tables (table, entity_keys, columns)")
    spec = json.loads(storage.read_text(path))["spec"]
    try:
        taken = set(_schema(settings.table_path(spec["labels"]), spec.get("labels_version")).names)
    except LakerayError as exc:
        raise ConfigError(f"features: cannot read the training set's labels table {spec['labels']}: {exc.headline}",
                          "the column names of a training set depend on it; list features.tables instead") from None
    refs = []
    for ref in spec["features"]:
        columns = []
        for column in ref["columns"]:  # the point-in-time join's naming (lakehouse.pit.plan_output)
            name = column if column not in taken else f"{ref['table']}__{column}"
            taken.add(name)
            if name in features:
                columns.append((column, name))
        keys = list(ref["entity_keys"])
        refs.append({"table": ref["table"], "entity_keys": keys,
                     "request_keys": [(ref.get("join_keys") or {}).get(k, k) for k in keys],
                     "columns": columns, "event_time": ref.get("event_time"), "max_age_s": ref.get("max_age_s"),
                     "version": None})
    return refs


def _key_type(field: pa.Field) -> str | None:
    import pyarrow as pa

    if pa.types.is_integer(field.type):
        return "int"
    if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
        return "str"
    return None


def plan_online_features(settings: Settings, spec: OnlineFeatures, pinned_uri: str,
                         where: str = "serve spec") -> dict[str, Any]:
    """The lookup plan (JSON) for ``pinned_uri`` (``models:/name/N``); ConfigError naming the field when a
    table, column, key, default or request field does not fit."""
    features, tags = _model_features(settings, pinned_uri)
    if spec.tables is None:
        refs = _from_training_set(settings, tags, pinned_uri, features)
        fields = ["features"] * len(refs)
    else:
        refs = [{"table": t.table, "entity_keys": list(t.entity_keys),
                 "request_keys": [(t.request_keys or {}).get(k, k) for k in t.entity_keys],
                 "columns": None if t.columns is None else [(c, c) for c in t.columns],
                 "event_time": t.event_time, "max_age_s": t.max_age_s, "version": t.version} for t in spec.tables]
        fields = [f"features.tables[{i}]" for i in range(len(refs))]
    served = set(features) - set(spec.from_request)
    plans, provided = [], set()
    for ref, field in zip(refs, fields, strict=True):
        uri = settings.table_path(ref["table"])
        try:
            schema = _schema(uri, ref["version"])
        except LakerayError as exc:
            raise ConfigError(f"{where}: {field}: feature table {ref['table']!r}: {exc.headline}", exc.fix) from None
        own = {*ref["entity_keys"], ref["event_time"]}  # keys and time are the table's, not features it serves
        columns = ref["columns"] if ref["columns"] is not None else \
            [(c, c) for c in schema.names if c in features and c not in own]
        needed = [*ref["entity_keys"], *(c for c, _ in columns), *([ref["event_time"]] if ref["event_time"] else [])]
        absent = [c for c in needed if c not in schema.names]
        if absent:
            raise ConfigError(f"{where}: {field}: feature table {ref['table']!r} has no column(s) {absent}",
                              f"its columns: {', '.join(schema.names)}; {_FIX}")
        unknown = [name for _, name in columns if name not in features]
        if unknown:
            raise ConfigError(f"{where}: {field}.columns: {unknown} are not features of {pinned_uri}",
                              f"its features: {', '.join(features)}")
        key_types = [_key_type(schema.field(k)) for k in ref["entity_keys"]]
        if None in key_types:
            bad = [k for k, t in zip(ref["entity_keys"], key_types, strict=True) if t is None]
            raise ConfigError(f"{where}: {field}: entity key(s) {bad} of {ref['table']!r} are neither integers "
                              "nor strings", "key the feature table by integer or string columns")
        if ref["max_age_s"] and not (ref["event_time"] and _is_time(schema.field(ref["event_time"]).type)):
            raise ConfigError(f"{where}: {field}: max_age_s needs an event_time column of timestamp or date type",
                              f"set event_time, or drop max_age_s; {_FIX}")
        columns = [(c, n) for c, n in columns if n in served and n not in provided]
        if not columns:  # every feature of it comes in the request: nothing to look up
            continue
        provided |= {n for _, n in columns}
        plans.append(OnlineTablePlan(
            table=ref["table"], uri=uri, entity_keys=ref["entity_keys"], request_keys=ref["request_keys"],
            key_types=key_types, features=dict(columns), event_time=ref["event_time"],
            max_age_s=ref["max_age_s"], version=ref["version"]))
    _check_names(spec, plans, provided, features, where)
    for plan in plans:
        plan.defaults = {n: spec.defaults[n] for n in plan.features.values() if n in spec.defaults}
    return OnlinePlan(tables=plans, refresh_s=spec.refresh_s).model_dump(mode="json")


def _check_names(spec: OnlineFeatures, plans: list[OnlineTablePlan], provided: set[str], features: list[str],
                 where: str) -> None:
    wrong = sorted(set(spec.from_request) - set(features))
    if wrong:
        raise ConfigError(f"{where}: features.from_request: {wrong} are not features of the model",
                          f"its features: {', '.join(features)}")
    for name in spec.defaults:
        if name not in provided:
            raise ConfigError(f"{where}: features.defaults.{name}: not a feature looked up from a table",
                              f"looked up: {', '.join(sorted(provided)) or 'none'}")
    for plan in plans:
        for key in plan.request_keys:
            if key in provided:
                raise ConfigError(f"{where}: features: request key {key!r} is also a looked-up feature",
                                  "map the entity key to another request field (request_keys)")


def _is_time(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_timestamp(arrow_type) or pa.types.is_date(arrow_type)


# ---------------------------------------------------------------------------------------------- replica side
@dataclass(frozen=True)
class _Snapshot:
    """One table version in memory: row i of ``matrix`` is the entity ``keys[i]``; the last row holds the
    defaults, so an unknown key gathers it without a branch."""

    version: int
    index: dict[Any, int]
    matrix: np.ndarray  # (entities + 1, features) float32, encoded as the model was trained
    times_us: np.ndarray | None  # event time of each row (max_age_s), the defaults row = int64 min
    raw: dict[str, np.ndarray] | None  # model feature → the served values as read (prediction log)
    loaded_s: float  # seconds the load took


@dataclass
class Lookup:
    features: dict[str, np.ndarray]  # model feature → float32 column for the batch
    unknown: list[list[str]]  # per row: tables whose entity was unknown (defaults served)
    versions: dict[str, int]  # table → version served
    raw: list[dict[str, Any]] | None  # per row: the looked-up values (when asked)


class OnlineStore:
    """The replica's in-memory online store for one plan; ``refresh_s`` > 0 starts the refresh thread."""

    def __init__(self, plan: OnlinePlan, model: ServedModel, keep_raw: bool = False) -> None:
        self.plan, self.model, self.keep_raw = plan, model, keep_raw
        self.refreshes = 0
        self.last_error: str | None = None
        self._snapshots = [self._load(table, table.version) for table in plan.tables]
        self._stop = threading.Event()
        self._thread = None
        if plan.refresh_s > 0 and any(t.version is None for t in plan.tables):
            self._thread = threading.Thread(target=self._refresh_loop, name="lakeray-online-features", daemon=True)
            self._thread.start()

    def versions(self) -> dict[str, int]:
        return {t.table: s.version for t, s in zip(self.plan.tables, self._snapshots, strict=True)}

    def lookup(self, rows: list[dict[str, Any]]) -> Lookup:
        """The looked-up features of ``rows`` (each carries the request key fields)."""
        import numpy as np

        snapshots = list(self._snapshots)  # one consistent set for the whole batch
        features: dict[str, np.ndarray] = {}
        unknown: list[list[str]] = [[] for _ in rows]
        raw: list[dict[str, Any]] | None = [{} for _ in rows] if self.keep_raw else None
        now_us = time.time_ns() // 1000
        for table, snap in zip(self.plan.tables, snapshots, strict=True):
            if len(table.request_keys) == 1:
                keys = [row[table.request_keys[0]] for row in rows]
            else:
                keys = [tuple(row[k] for k in table.request_keys) for row in rows]
            missing = len(snap.index)
            positions = np.fromiter((snap.index.get(k, missing) for k in keys), dtype=np.int64, count=len(keys))
            if table.max_age_s is not None and snap.times_us is not None:
                stale = snap.times_us[positions] < now_us - int(table.max_age_s * 1e6)
                positions[stale] = missing
            gathered = snap.matrix[positions]
            for j, name in enumerate(table.features.values()):
                features[name] = gathered[:, j]
            for i in np.flatnonzero(positions == missing):
                unknown[i].append(table.table)
            if raw is not None:
                self._raw_values(table, snap, positions, raw)
        return Lookup(features, unknown, {t.table: s.version for t, s in zip(self.plan.tables, snapshots,
                                                                              strict=True)}, raw)

    def _raw_values(self, table: OnlineTablePlan, snap: _Snapshot, positions: Any, out: list[dict]) -> None:
        import numpy as np

        missing = len(snap.index)
        found = positions != missing
        rows = np.flatnonzero(found)
        if snap.raw is not None and rows.size:
            # numpy gathers: an Arrow take + to_pylist cost ~0.3 ms for a one-row batch.
            at = positions[rows]
            columns = {name: values[at].tolist() for name, values in snap.raw.items()}
            for k, i in enumerate(rows.tolist()):
                out[i].update({name: column[k] for name, column in columns.items()})
        for i in np.flatnonzero(~found):
            out[i].update({n: table.defaults.get(n) for n in table.features.values()})

    def stats(self) -> dict[str, Any]:
        return {"refresh_s": self.plan.refresh_s, "refreshes": self.refreshes, "last_error": self.last_error,
                "tables": [{"table": t.table, "version": s.version, "entities": len(s.index),
                            "pinned": t.version is not None, "load_s": round(s.loaded_s, 3),
                            "features": list(t.features.values())}
                           for t, s in zip(self.plan.tables, self._snapshots, strict=True)]}

    def close(self) -> None:
        self._stop.set()

    def _refresh_loop(self) -> None:
        from lakeray.lakehouse.delta import latest_version

        while not self._stop.wait(self.plan.refresh_s):
            errors = []
            for i, table in enumerate(self.plan.tables):
                if table.version is not None:
                    continue
                try:
                    latest = latest_version(table.uri)
                    if latest > self._snapshots[i].version:
                        self._snapshots[i] = self._load(table, latest)  # one assignment: batches see old or new
                        self.refreshes += 1
                except Exception as exc:  # noqa: BLE001 - keep serving the loaded version; report why
                    errors.append(f"{table.table}: {(str(exc).splitlines() or [type(exc).__name__])[0][:300]}")
            self.last_error = "; ".join(errors) or None

    def _load(self, table: OnlineTablePlan, version: int | None) -> _Snapshot:
        import numpy as np
        import pyarrow.compute as pc

        from lakeray.lakehouse.delta import latest_version, read_arrow

        started = time.perf_counter()
        version = latest_version(table.uri) if version is None else version
        wanted = [*table.entity_keys, *table.features, *([table.event_time] if table.event_time else [])]
        columns = list(dict.fromkeys(wanted))
        data = read_arrow(table.uri, version, columns)
        if table.event_time:
            # The newest row per entity, as the point-in-time join would pick it for a label at "now".
            data = data.filter(pc.is_valid(data.column(table.event_time))).sort_by(table.event_time)
        key_columns = [data.column(k).to_pylist() for k in table.entity_keys]
        keys = key_columns[0] if len(key_columns) == 1 else list(zip(*key_columns, strict=True))
        newest = dict(zip(keys, range(len(keys)), strict=True))  # a repeated key keeps its last (newest) row
        data = data.take(np.fromiter(newest.values(), dtype=np.int64, count=len(newest)))
        index = dict(zip(newest.keys(), range(len(newest)), strict=True))
        matrix = np.empty((len(index) + 1, len(table.features)), dtype=np.float32)
        for j, (column, name) in enumerate(table.features.items()):
            matrix[:-1, j] = self._encode(data.column(column), name)
            matrix[-1, j] = self._encode_value(table.defaults.get(name), name)
        times = None
        if table.max_age_s is not None and table.event_time:
            times = np.empty(len(index) + 1, dtype=np.int64)
            times[:-1] = _micros(data.column(table.event_time))
            times[-1] = np.iinfo(np.int64).max  # the defaults row is never stale
        raw = {name: _raw_column(data.column(column)) for column, name in table.features.items()} \
            if self.keep_raw else None
        return _Snapshot(version, index, matrix, times, raw, time.perf_counter() - started)

    def _encode(self, column: Any, name: str) -> Any:
        """A table column as the model's float32 input: categoricals as their vocabulary index (unseen and
        null: NaN), booleans as the strings training made of them, numbers as numbers (null: NaN)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        vocab = self.model.categorical.get(name)
        if vocab is None:
            return pc.cast(column, pa.float64()).fill_null(float("nan")).to_numpy().astype(np.float32)
        codes = pc.index_in(pc.cast(column, pa.string()), value_set=pa.array(vocab, pa.string()))
        return pc.cast(codes, pa.float64()).fill_null(float("nan")).to_numpy().astype(np.float32)

    def _encode_value(self, value: Any, name: str) -> float:
        return float(self.model.encode(name, [value])[0])


def _raw_column(column: Any) -> Any:
    """A column as numpy, so that ``values[positions].tolist()`` gives what Arrow's ``to_pylist`` gives:
    numbers and booleans without nulls natively, anything else (strings, nulls, times) as Python objects."""
    import numpy as np
    import pyarrow as pa

    kind = column.type
    if column.null_count == 0 and (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        return column.to_numpy()
    return np.array(column.to_pylist() + [None], dtype=object)[:-1]  # the None keeps nested values as objects


def _micros(column: Any) -> Any:
    """A timestamp or date column as int64 microseconds since the epoch (UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tz = getattr(column.type, "tz", None)
    return pc.cast(pc.cast(column, pa.timestamp("us", tz), safe=False), pa.int64()).to_numpy(zero_copy_only=False)
