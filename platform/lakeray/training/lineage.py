"""Reading the registry back: registered models, one version in full, and its lineage down to the rows.

:func:`lineage` walks model version → MLflow run → training set@version → its manifest → every input
table@version → the Delta commit that wrote it (the feature job's code version and run id, from the
commit's userMetadata) → that commit's own inputs, upstream. It reads the portable tags
:mod:`lakeray.training.tracking` writes (table names, versions, storage-relative paths) and the Delta
logs with delta-rs (no JVM), so it works from any machine that sees the storage root and the registry.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lakeray.errors import ConfigError, ModelRegistryError
from lakeray.registry import mlflow_client, resolve_alias

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["lineage", "list_models", "describe_model", "model_uri", "commit_lineage", "manifest_relpath",
           "PROMOTION_TAG"]

PROMOTION_TAG = "lakeray.promotion."  # + a UTC timestamp: one model version tag per comparison
_UPSTREAM_DEPTH = 6


def manifest_relpath(table: str, version: int) -> str:
    """A training set's manifest, relative to the storage root: the layout features.training_sets
    writes (training may not import features: sibling layers)."""
    return f"_manifests/{table}/v{version}.json"


def _read_manifest(settings: Settings, relpath: str) -> dict[str, Any] | None:
    from lakeray import storage

    path = storage.join(settings.storage_root, relpath)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))




def _commit_kind(meta: dict[str, Any]) -> str:
    """What wrote a commit, from lakeray's userMetadata (the same rule as features.catalog.commit_kind,
    which training may not import)."""
    if "lakeray_import_id" in meta:
        return "import"
    if "training_set" in meta:
        return "training set"
    if "lakeray_run_id" in meta:
        return "feature run"
    return "other"


def commit_lineage(settings: Settings, table: str, version: int) -> dict[str, Any]:
    """The commit that wrote ``table@version``, read from its Delta log with delta-rs (no JVM):
    operation, time, and lakeray's userMetadata (kind, feature job code version, run id, inputs).
    A table or commit that is gone comes back with ``error`` set instead of raising."""
    from deltalake import DeltaTable

    node: dict[str, Any] = {"table": table, "version": int(version)}
    try:
        dt = DeltaTable(settings.table_path(table))
        latest = dt.version()
        if not 0 <= version <= latest:
            return {**node, "error": f"no version {version} (latest is {latest})"}
        # history(n) reads the newest n commits only: enough to reach `version`.
        found = [c for c in dt.history(latest - version + 1) if int(c.get("version", -1)) == version]
    except Exception as exc:  # noqa: BLE001 - delta-rs raises several types for a missing table or log
        return {**node, "error": f"cannot read its Delta log: {str(exc).splitlines()[0][:200]}"}
    if not found:
        return {**node, "error": f"the commit of version {version} is no longer in the log (log retention)"}
    commit = found[0]
    raw = commit.get("userMetadata")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {"userMetadata": raw}
    meta = meta if isinstance(meta, dict) else {"userMetadata": raw}
    stamp = commit.get("timestamp")
    return {**node, "operation": commit.get("operation"), "timestamp_ms": stamp, "written_by": _commit_kind(meta),
            "code_version": meta.get("code_version"),
            "run_id": meta.get("lakeray_run_id") or meta.get("build_id") or meta.get("lakeray_import_id"),
            "inputs": {str(t): int(v) for t, v in (meta.get("inputs") or {}).items()},
            **({"source": meta["source"]} if "source" in meta else {})}


def _upstream(settings: Settings, table: str, version: int, depth: int, seen: set[tuple[str, int]]
              ) -> dict[str, Any]:
    node = commit_lineage(settings, table, version)
    key = (table, int(version))
    node["upstream"] = []
    if key in seen or depth <= 0:
        return node
    seen.add(key)
    node["upstream"] = [_upstream(settings, t, v, depth - 1, seen) for t, v in sorted(node.get("inputs", {}).items())]
    return node



def model_uri(text: str) -> str:
    """``NAME@alias``, ``NAME/version`` or ``models:/…`` → a ``models:/`` URI; a bare NAME means @champion."""
    rest = text.removeprefix("models:/").strip()
    if not rest or rest.startswith(("@", "/")):
        raise ConfigError(f"{text!r} is not a model reference", "write NAME@alias, NAME/version or NAME")
    if "@" not in rest and "/" not in rest:
        rest = f"{rest}@champion"
    return f"models:/{rest}"


def _json_tag(value: str | None, default: Any) -> Any:
    try:
        return json.loads(value) if value else default
    except ValueError:
        return default


def _run_summary(run: Any) -> dict[str, Any]:
    tags = run.data.tags
    metric = tags.get("lakeray.metric")
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
            "start_time_ms": run.info.start_time, "experiment_id": run.info.experiment_id,
            "kind": tags.get("lakeray.kind"), "trainer": tags.get("lakeray.trainer"),
            "spec_name": tags.get("lakeray.spec_name"), "spec_hash": tags.get("lakeray.spec_hash"),
            "metric": metric, "metric_direction": tags.get("lakeray.metric_direction"),
            "metric_value": run.data.metrics.get(f"valid_{metric}") if metric else None,
            "input": tags.get("lakeray.input"), "run_dir": tags.get("lakeray.run_dir")}


def _promotions(tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"tag": k, **_json_tag(v, {"raw": v})} for k, v in sorted(tags.items()) if k.startswith(PROMOTION_TAG)]


def list_models(settings: Settings) -> list[dict[str, Any]]:
    """Every registered model with its versions (newest first), aliases and each run's metric."""
    client = mlflow_client(settings)
    out = []
    token = None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        for rm in page:
            by_version: dict[int, list[str]] = {}
            for alias, version in (rm.aliases or {}).items():  # search_model_versions leaves aliases empty
                by_version.setdefault(int(version), []).append(alias)
            versions = []
            for mv in sorted(client.search_model_versions(f"name = '{rm.name}'"), key=lambda m: -int(m.version)):
                summary = _run_summary(client.get_run(mv.run_id)) if mv.run_id else {}
                versions.append({"version": int(mv.version), "aliases": sorted(by_version.get(int(mv.version), [])),
                                 "created_ms": mv.creation_timestamp, "run_id": mv.run_id,
                                 "input": summary.get("input"), "kind": summary.get("kind"),
                                 "metric": summary.get("metric"), "metric_value": summary.get("metric_value")})
            out.append({"name": rm.name, "aliases": {a: int(v) for a, v in sorted((rm.aliases or {}).items())},
                        "versions": versions})
        token = page.token
        if not token:
            return sorted(out, key=lambda m: m["name"])


def describe_model(settings: Settings, uri: str) -> dict[str, Any]:
    """One model version: aliases, its run's params, metrics and tags, and its promotion records."""
    client = mlflow_client(settings)
    resolved = resolve_alias(settings, model_uri(uri))
    mv = client.get_model_version(resolved.name, str(resolved.version))
    run = client.get_run(mv.run_id)
    return {"name": mv.name, "version": int(mv.version), "aliases": sorted(mv.aliases or []),
            "created_ms": mv.creation_timestamp, "source": mv.source, "run": _run_summary(run),
            "params": dict(sorted(run.data.params.items())), "metrics": dict(sorted(run.data.metrics.items())),
            "tags": {k: v for k, v in sorted(run.data.tags.items()) if not k.startswith("mlflow.")},
            "version_tags": {k: v for k, v in sorted((mv.tags or {}).items()) if not k.startswith(PROMOTION_TAG)},
            "promotions": _promotions(mv.tags or {})}


def lineage(settings: Settings, uri: str) -> dict[str, Any]:
    """model version → MLflow run → training set@version → its manifest → every input table@version →
    the commit that wrote it (feature job code version, run id) → that commit's own inputs, upstream."""
    client = mlflow_client(settings)
    resolved = resolve_alias(settings, model_uri(uri))
    mv = client.get_model_version(resolved.name, str(resolved.version))
    run = client.get_run(mv.run_id)
    tags = run.data.tags
    model = {"name": mv.name, "version": int(mv.version), "aliases": sorted(mv.aliases or []),
             "uri": f"models:/{mv.name}/{mv.version}"}
    pinned = tags.get("lakeray.input", "")
    table, _, version = pinned.partition("@")
    if not table or not version.isdigit():
        raise ModelRegistryError(f"{model['uri']} has no lineage: its run {mv.run_id} lacks the lakeray.input tag",
                                 "it was not registered by `lakeray train`; retrain it to record lineage")
    relpath = tags.get("lakeray.manifest") or manifest_relpath(table, int(version))
    manifest = _read_manifest(settings, relpath)
    inputs = {str(t): int(v) for t, v in ((manifest or {}).get("inputs")
                                          or _json_tag(tags.get("lakeray.inputs"), {})).items()}
    recorded = _json_tag(tags.get("lakeray.code_versions"), {})
    seen: set[tuple[str, int]] = {(table, int(version))}
    nodes = []
    for t, v in sorted(inputs.items()):
        node = _upstream(settings, t, v, _UPSTREAM_DEPTH, seen)
        if recorded.get(t) and node.get("code_version") not in (None, recorded[t]):
            node["warning"] = f"the run recorded code version {recorded[t]}, the commit says {node['code_version']}"
        nodes.append(node)
    training_set = {**commit_lineage(settings, table, int(version)), "inputs": inputs,
                    "manifest": relpath if manifest is not None else None,
                    "content_hash": (manifest or {}).get("content_hash") or tags.get("lakeray.training_set_hash"),
                    "rows": (manifest or {}).get("rows"), "upstream": nodes}
    return {"model": model, "run": _run_summary(run), "training_set": training_set}
