"""Offline validation of cluster definitions: Ray cluster launcher YAMLs and KubeRay manifests.

A launcher YAML (``cluster/aws.yaml``, ``ray up`` input) is checked the way ``ray up`` checks it before
it contacts a cloud: against Ray's own ``ray-schema.json`` (shipped in the ray package), then through
the launcher's config preparation (``prepare_config``: provider defaults merged, setup commands merged,
Docker and node-type bounds filled in) and ``validate_config`` on the result. A few things the launcher
accepts but would act on wrongly (a negative ``min_workers``, ``min_workers`` above ``max_workers``) are
refused too. Nothing here talks to a cloud: what only a cloud can tell (an instance type, an image, a
quota, an IAM role) is not checked.

A KubeRay manifest (``apiVersion: ray.io/v1``) is checked against the CRD's OpenAPI schema vendored in
``cluster/kuberay/crds/`` (see its README for the source and version), with the API server's strict field
validation (an unknown field is an error). A RayService's ``serveConfigV2`` is checked with Ray Serve's
own ``ServeDeploySchema``; a RayJob's ``runtimeEnvYAML`` must be a YAML mapping.

Every problem names the file and the path inside it (``cluster/aws.yaml:
available_node_types.gpu_worker.min_workers: -1 is less than the minimum of 0``).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lakeray.errors import ConfigError

__all__ = ["FileReport", "check_file", "validate_file", "crds_dir", "KUBERAY_KINDS"]

# kind → vendored schema file (cluster/kuberay/crds/); only the served, stored version v1.
KUBERAY_KINDS = {
    "RayCluster": "raycluster.v1.schema.json",
    "RayJob": "rayjob.v1.schema.json",
    "RayService": "rayservice.v1.schema.json",
}
_KUBERAY_API = "ray.io/v1"
# Providers whose launcher fills a node type's `resources` from the instance type by asking the cloud
# (fillout_available_node_types_resources): offline, a missing `resources` there is not an error.
_AUTOFILL_RESOURCES = {"aws", "gcp"}
_FIX = "fix the file (docs/cluster.md says what each field is for)"


@dataclass
class FileReport:
    """What :func:`check_file` found in one file: one entry per YAML document validated."""

    path: str
    documents: list[str] = field(default_factory=list)  # e.g. "ray cluster launcher (aws)", "KubeRay RayJob"
    problems: list[str] = field(default_factory=list)   # each "FILE: PATH: message"

    @property
    def ok(self) -> bool:
        return not self.problems


def crds_dir() -> Path:
    """The vendored KubeRay CRD schemas: ``$LAKERAY_KUBERAY_CRDS``, else ``cluster/kuberay/crds`` of the
    checkout this module lives in, else of the current directory; ConfigError when none has them."""
    candidates = [Path(os.environ["LAKERAY_KUBERAY_CRDS"])] if os.environ.get("LAKERAY_KUBERAY_CRDS") else [
        Path(__file__).resolve().parents[3] / "cluster" / "kuberay" / "crds", Path("cluster", "kuberay", "crds")]
    for candidate in candidates:
        if (candidate / KUBERAY_KINDS["RayCluster"]).is_file():
            return candidate
    raise ConfigError(f"the KubeRay CRD schemas are not in {' or '.join(map(str, candidates))}",
                      "run from a lakeray checkout, or set LAKERAY_KUBERAY_CRDS to its cluster/kuberay/crds")


def validate_file(path: str | os.PathLike[str]) -> FileReport:
    """:func:`check_file`, raising ConfigError (exit code 2) with the first problem when there is one."""
    report = check_file(path)
    if report.problems:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise ConfigError(report.problems[0] + more, _FIX)
    return report


def check_file(path: str | os.PathLike[str]) -> FileReport:
    """Validate every YAML document in ``path``; problems are collected, not raised."""
    import yaml

    name = str(path)
    report = FileReport(name)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        report.problems.append(f"{name}: cannot be read ({exc.strerror or exc})")
        return report
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        report.problems.append(f"{name}: {where}not valid YAML ({getattr(exc, 'problem', None) or exc})")
        return report
    if not documents:
        report.problems.append(f"{name}: empty file")
    for index, doc in enumerate(documents):
        where = name if len(documents) == 1 else f"{name} (document {index + 1})"
        if isinstance(doc, dict) and ("apiVersion" in doc or "kind" in doc):
            report.documents.append(f"KubeRay {doc.get('kind')}")
            report.problems += _check_kuberay(doc, where)
        elif isinstance(doc, dict) and ("provider" in doc or "cluster_name" in doc):
            provider = doc.get("provider")
            kind = provider.get("type") if isinstance(provider, dict) else None
            report.documents.append(f"ray cluster launcher ({kind})")
            report.problems += _check_launcher(doc, where)
        else:
            report.problems.append(
                f"{where}: neither a Ray cluster launcher config (cluster_name, provider) nor a Kubernetes "
                "manifest (apiVersion, kind)")
    return report


# ---------------------------------------------------------------- shared

def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _schema_problems(validator: Any, doc: Any, where: str, prefix: Sequence[Any] = ()) -> list[str]:
    """One line per jsonschema error, in document order; for an ``anyOf``/``oneOf`` the closest branch.
    An unknown or a missing key is reported at its own path (``a.b.minReplica: unknown field``)."""
    from jsonschema.exceptions import best_match

    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        if error.context:
            error = best_match(error.context) or error
        at = [*prefix, *error.absolute_path]
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = list(error.schema.get("properties", {}))
            for key in error.instance:
                if key not in known and not any(re.search(p, key) for p in error.schema.get("patternProperties", {})):
                    problems.append(f"{where}: {_path([*at, key])}: unknown field{_did_you_mean(key, known)}")
        elif error.validator == "required" and isinstance(error.validator_value, list):
            missing = [key for key in error.validator_value if isinstance(error.instance, dict) and key not in error.instance]
            problems += [f"{where}: {_path([*at, key])}: required field missing" for key in missing]
        else:
            problems.append(f"{where}: {_path(at)}: {error.message}")
    return problems


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (expected one of: {', '.join(sorted(known))})" if 0 < len(known) <= 12 else ""


# ---------------------------------------------------------------- launcher

@functools.lru_cache(maxsize=1)
def _ray_schema_validator() -> Any:
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).with_name("ray-schema.json")
    schema = json.loads(schema_path.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def _check_launcher(config: dict[str, Any], where: str) -> list[str]:
    provider = config.get("provider")
    provider_type = provider.get("type") if isinstance(provider, dict) else None
    candidate = copy.deepcopy(config)
    if provider_type in _AUTOFILL_RESOURCES and isinstance(candidate.get("available_node_types"), dict):
        for node_type in candidate["available_node_types"].values():
            if isinstance(node_type, dict):
                node_type.setdefault("resources", {})
    problems = _schema_problems(_ray_schema_validator(), candidate, where)
    problems += _bounds(config, where)
    if problems:
        return problems  # the launcher's preparation assumes a schema-valid config
    known = _known_providers()
    if provider_type not in known:
        return [f"{where}: provider.type: unknown provider {provider_type!r} (the launcher knows: "
                f"{', '.join(sorted(known))})"]
    if provider_type == "external" and "module" not in provider:
        return [f"{where}: provider.module: required for provider type 'external' (module.path.ProviderClass)"]
    return _prepare(config, where)


def _known_providers() -> set[str]:
    from ray.autoscaler._private.providers import _NODE_PROVIDERS

    return set(_NODE_PROVIDERS)


def _bounds(config: dict[str, Any], where: str) -> list[str]:
    """What the schema leaves open and the launcher would act on wrongly (or only notice mid-`ray up`)."""
    problems = []
    node_types = config.get("available_node_types")
    if not isinstance(node_types, dict):
        return problems
    head = config.get("head_node_type")
    if head is not None and head not in node_types:
        problems.append(f"{where}: head_node_type: {head!r} is not one of available_node_types "
                        f"({', '.join(map(str, node_types))})")
    if head is None and node_types:
        problems.append(f"{where}: head_node_type: required when available_node_types is set")
    total_min = 0
    for name, node_type in node_types.items():
        if not isinstance(node_type, dict):
            continue
        low, high = node_type.get("min_workers"), node_type.get("max_workers")
        for key, value in (("min_workers", low), ("max_workers", high)):
            if isinstance(value, int) and value < 0:
                problems.append(f"{where}: available_node_types.{name}.{key}: {value} is less than the minimum of 0")
        if isinstance(low, int) and isinstance(high, int) and 0 <= high < low:
            problems.append(f"{where}: available_node_types.{name}.min_workers: {low} is more than its "
                            f"max_workers ({high})")
        if isinstance(low, int) and name != head:
            total_min += max(low, 0)
    global_max = config.get("max_workers")
    if isinstance(global_max, int) and total_min > global_max:
        problems.append(f"{where}: max_workers: {global_max} is less than the sum of the node types' "
                        f"min_workers ({total_min})")
    return problems


def _prepare(config: dict[str, Any], where: str) -> list[str]:
    """The launcher's own preparation and validation, offline; its messages have no path, so they are
    reported against the file with the step's name."""
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    sink = io.StringIO()
    try:
        # cli_logger prints a "PANIC" banner before it aborts (a local config without head_ip, ...), and the
        # preparation logs INFO lines ("setting max workers for head node type to 0") through ray's logger.
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), _quiet("ray.autoscaler"):
            prepared = prepare_config(copy.deepcopy(config))
            validate_config(prepared)
    except jsonschema.ValidationError as exc:
        return [f"{where}: {_path(exc.absolute_path)}: {exc.message} (after the launcher merged its defaults)"]
    except click.ClickException as exc:
        return [f"{where}: the launcher refuses it: {exc.message}"]
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError, NotImplementedError) as exc:
        return [f"{where}: the launcher refuses it: {type(exc).__name__}: {exc}"]
    return []


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------- KubeRay

@functools.lru_cache(maxsize=len(KUBERAY_KINDS))
def _kuberay_validator(kind: str) -> Any:
    import jsonschema

    schema = json.loads((crds_dir() / KUBERAY_KINDS[kind]).read_text())
    return jsonschema.Draft7Validator(_as_strict_jsonschema(schema))


def _as_strict_jsonschema(node: Any) -> Any:
    """An OpenAPI v3 structural schema as the API server applies it: unknown fields refused (strict field
    validation) unless ``x-kubernetes-preserve-unknown-fields``; defaulted fields never missing;
    ``nullable`` admits null."""
    if isinstance(node, list):
        return [_as_strict_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _as_strict_jsonschema(value) for key, value in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if isinstance(out.get("required"), list) and isinstance(out.get("properties"), dict):
        # The API server fills `default`s before it validates: a defaulted field is never missing.
        out["required"] = [key for key in out["required"] if "default" not in out["properties"].get(key, {})]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _check_kuberay(doc: dict[str, Any], where: str) -> list[str]:
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if kind not in KUBERAY_KINDS:
        return [f"{where}: kind: {kind!r} is not a KubeRay resource this validator knows "
                f"({', '.join(KUBERAY_KINDS)}); other Kubernetes kinds are not validated here"]
    if api != _KUBERAY_API:
        return [f"{where}: apiVersion: {api!r} is not {_KUBERAY_API!r} (v1alpha1 is deprecated; the vendored "
                "CRDs are v1)"]
    problems = _schema_problems(_kuberay_validator(kind), doc, where)
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict) or not (metadata.get("name") or metadata.get("generateName")):
        problems.append(f"{where}: metadata.name: required")
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    if kind == "RayService" and isinstance(spec.get("serveConfigV2"), str):
        problems += _serve_config_problems(spec["serveConfigV2"], where)
    if kind == "RayJob" and isinstance(spec.get("runtimeEnvYAML"), str):
        problems += _embedded_mapping(spec["runtimeEnvYAML"], where, "spec.runtimeEnvYAML")[1]
    return problems


def _embedded_mapping(text: str, where: str, at: str) -> tuple[dict[str, Any] | None, list[str]]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return None, [f"{where}: {at}: not valid YAML ({getattr(exc, 'problem', None) or exc})"]
    if not isinstance(value, dict):
        return None, [f"{where}: {at}: must be a YAML mapping, got {type(value).__name__}"]
    return value, []


def _serve_config_problems(text: str, where: str) -> list[str]:
    """``serveConfigV2`` through Ray Serve's own ``ServeDeploySchema`` (what the Serve controller applies)."""
    from pydantic import ValidationError

    value, problems = _embedded_mapping(text, where, "spec.serveConfigV2")
    if value is None:
        return problems
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(value)
    except ValidationError as exc:
        return [f"{where}: {_path(['spec.serveConfigV2', *error['loc']])}: {error['msg']}" for error in exc.errors()]
    return []
