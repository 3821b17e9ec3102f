"""Storage URIs: a local folder or an S3-compatible object store, handled in one place.

Every storage path in lakeray is a string: a local path (``/data/lakehouse``, ``file:///data/…``) or an
object-store URI (``s3://bucket/prefix``, ``s3a://bucket/prefix``). This module is the only place such
paths are joined and split (``pathlib.Path("s3a://b/x")`` is ``s3a:/b/x``), and the only place that
turns the profile's ``storage`` section into what each engine wants:

- Spark (hadoop-aws) reads ``s3a://`` and ``spark.hadoop.fs.s3a.*`` conf (:func:`spark_conf`);
- delta-rs takes ``s3://`` and ``storage_options`` (:func:`delta_options`);
- pyarrow takes an ``S3FileSystem`` and a ``bucket/key`` path (:func:`to_arrow_fs`).

Secrets never sit in the config: ``storage.access_key_env`` / ``secret_key_env`` name the environment
variables that hold them, read when a filesystem is made. Empty names leave credentials to each
library's own chain (``AWS_ACCESS_KEY_ID``…, instance identity).

The object-store settings of the loaded profile are this process's default (:func:`configure`, called by
:func:`lakeray.config.load_settings`), so readers that get only a path (Delta readers, ingest) use the
same credentials as the Spark session. A process that loaded no profile (a Ray worker, a Serve replica)
falls back to the ``LAKERAY_STORAGE__*`` variables the driver put in the cluster's runtime environment
(:func:`worker_env`), with secrets referenced by variable name, never by value.
"""

from __future__ import annotations

import os
import posixpath
import threading
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

from lakeray.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow.fs as pa_fs

__all__ = ["ObjectStoreSettings", "configure", "configured", "scheme", "is_local", "join", "parent", "name",
           "to_spark", "to_arrow", "local_path", "to_arrow_fs", "delta_options", "spark_conf", "exists", "is_dir",
           "list_dir", "read_text", "write_text_atomic", "append_text", "put_dir", "get_dir", "makedirs", "remove",
           "check_access", "OBJECT_STORE_SCHEMES", "StoreSettings", "worker_env", "worker_arrow_fs", "use_for_boto3"]

OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "s3n"})


class ObjectStoreSettings(Protocol):
    """The profile's ``storage`` section (:class:`lakeray.config.StorageConfig`), as this module reads it."""

    endpoint_url: str | None
    region: str
    access_key_env: str | None
    secret_key_env: str | None
    path_style: bool
    allow_http: bool
    timeout_s: float


@dataclass(frozen=True)
class StoreSettings:
    """The object-store settings without any secret (variable names only): what travels to other
    processes, pickled or as ``LAKERAY_STORAGE__*`` variables. Defaults are StorageConfig's."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_env: str | None = None
    secret_key_env: str | None = None
    path_style: bool = False
    allow_http: bool = False
    timeout_s: float = 30.0

    @classmethod
    def of(cls, settings: ObjectStoreSettings) -> StoreSettings:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


def _env_name(field_name: str) -> str:
    return f"LAKERAY_STORAGE__{field_name.upper()}"


def _from_environment() -> StoreSettings | None:
    """Settings from ``LAKERAY_STORAGE__*`` (a worker's runtime env) when they name an object store."""
    env = os.environ
    if is_local(env.get("LAKERAY_STORAGE__ROOT", "")) and not env.get(_env_name("endpoint_url")):
        return None
    values: dict[str, Any] = {}
    for f in fields(StoreSettings):
        raw = env.get(_env_name(f.name))
        if raw is None or raw == "":
            continue
        values[f.name] = raw.lower() in ("1", "true", "yes", "on") if f.type == "bool" else \
            float(raw) if f.type == "float" else raw
    return StoreSettings(**values)


_default: ObjectStoreSettings | None = None
_lock = threading.Lock()
_filesystems: dict[tuple, Any] = {}


def configure(settings: ObjectStoreSettings | None) -> None:
    """Make ``settings`` this process's object-store settings (what path-only readers use)."""
    global _default
    with _lock:
        _default = settings
        _filesystems.clear()


def configured() -> ObjectStoreSettings | None:
    """This process's settings: the loaded profile's, else those of ``LAKERAY_STORAGE__*``."""
    return _settings(None)


# --- URIs --------------------------------------------------------------------------------------------


def scheme(uri: str) -> str:
    """``s3``, ``s3a``, ``file``…; ``""`` for a plain local path."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and head.isascii() and head.replace("+", "").isalnum() else ""


def is_local(uri: str) -> bool:
    return scheme(uri) in ("", "file")


def _split(uri: str) -> tuple[str, str]:
    """(``scheme://authority``, path below it) for a URI; ("", path) for a local path."""
    if not scheme(uri):
        return "", uri
    head, _, rest = uri.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{head}://{authority}", slash + path


def join(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended by ``/``: a URI keeps its ``scheme://bucket``, a local path
    stays a local path (``join('s3a://b', 'x')`` is ``s3a://b/x``, never ``s3a:/b/x``)."""
    prefix, path = _split(base)
    pieces = [p.strip("/") for p in parts if p and p.strip("/")]
    if not pieces:
        return base
    if prefix:
        return prefix + "/" + "/".join([path.strip("/"), *pieces]).lstrip("/")
    return os.path.join(path, *pieces)


def parent(uri: str) -> str:
    """The folder holding ``uri`` (a bucket's root is its own parent)."""
    prefix, path = _split(uri)
    if not prefix:
        return os.path.dirname(path.rstrip("/") or "/") or "."
    return prefix + posixpath.dirname(path.rstrip("/")).rstrip("/")


def name(uri: str) -> str:
    """The last part of ``uri``."""
    return _split(uri)[1].rstrip("/").rsplit("/", 1)[-1]


def to_spark(uri: str) -> str:
    """The URI Spark's Hadoop filesystems read: ``s3://``/``s3n://`` become ``s3a://`` (hadoop-aws)."""
    s = scheme(uri)
    return "s3a://" + uri.split("://", 1)[1] if s in ("s3", "s3n") else uri


def to_arrow(uri: str) -> str:
    """The URI delta-rs and pyarrow read: ``s3a://``/``s3n://`` become ``s3://``."""
    s = scheme(uri)
    return "s3://" + uri.split("://", 1)[1] if s in ("s3a", "s3n") else uri


def local_path(uri: str) -> str:
    """A local path or ``file://`` URI as a plain path; ConfigError for an object store."""
    if not is_local(uri):
        raise ConfigError(f"{uri} is on an object store, not a local folder", "use a local path here")
    return uri.removeprefix("file://")


# --- engines' settings -----------------------------------------------------------------------------


def _settings(settings: ObjectStoreSettings | None) -> ObjectStoreSettings | None:
    if settings is not None:
        return settings
    return _default if _default is not None else _from_environment()


def _credentials(settings: ObjectStoreSettings) -> tuple[str | None, str | None]:
    values = []
    for field in ("access_key_env", "secret_key_env"):
        var = getattr(settings, field)
        if var and not os.environ.get(var):
            raise ConfigError(f"storage.{field} names the environment variable {var}, which is not set",
                              f"export {var}=… (the object store's {'access key id' if 'access' in field else 'secret'})"
                              f" or clear storage.{field} to use the default AWS credential chain")
        values.append(os.environ[var] if var else None)
    return values[0], values[1]


def _endpoint_http(settings: ObjectStoreSettings) -> bool:
    return bool(settings.endpoint_url and settings.endpoint_url.startswith("http://"))


def _check_http(settings: ObjectStoreSettings) -> None:
    if _endpoint_http(settings) and not settings.allow_http:
        raise ConfigError(f"storage.endpoint_url {settings.endpoint_url} is plain http and storage.allow_http is off",
                          "set storage.allow_http: true (only for a store on a trusted network) or use https")


def delta_options(uri: str, settings: ObjectStoreSettings | None = None) -> dict[str, str] | None:
    """delta-rs ``storage_options`` for ``uri``; None for a local path (or no settings: env defaults)."""
    settings = _settings(settings)
    if is_local(uri) or settings is None:
        return None
    _check_http(settings)
    key, secret = _credentials(settings)
    options = {"AWS_REGION": settings.region,
               # Delta commits are put-if-absent renames; without a lock provider delta-rs refuses them
               # unless told that only one writer commits at a time (lakeray's writers: one per table).
               "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
               "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false" if settings.path_style else "true",
               "timeout": f"{int(settings.timeout_s)}s", "connect_timeout": f"{int(min(settings.timeout_s, 10))}s"}
    if settings.endpoint_url:
        options["AWS_ENDPOINT_URL"] = settings.endpoint_url
    if settings.allow_http:
        options["AWS_ALLOW_HTTP"] = "true"
    if key:
        options["AWS_ACCESS_KEY_ID"] = key
    if secret:
        options["AWS_SECRET_ACCESS_KEY"] = secret
    return options


def spark_conf(settings: ObjectStoreSettings) -> dict[str, str]:
    """``spark.hadoop.fs.s3a.*`` conf for hadoop-aws (``s3://`` is mapped to S3A too). The secrets'
    variable names go in, not the secrets: S3A reads them through its environment provider only when
    they are the AWS names, so named variables are copied into the conf at session start."""
    _check_http(settings)
    key, secret = _credentials(settings)
    timeout_ms = str(int(settings.timeout_s * 1000))
    conf = {
        "fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "fs.s3a.endpoint.region": settings.region,
        "fs.s3a.path.style.access": str(settings.path_style).lower(),
        # A wrong endpoint or credentials must fail within the bounded wait, not after S3A's default
        # minutes of retries.
        "fs.s3a.attempts.maximum": "2",
        "fs.s3a.retry.limit": "2",
        "fs.s3a.retry.interval": "200ms",
        "fs.s3a.connection.establish.timeout": str(min(int(timeout_ms), 10_000)),
        "fs.s3a.connection.timeout": timeout_ms,
    }
    if settings.endpoint_url:
        conf["fs.s3a.endpoint"] = settings.endpoint_url
        conf["fs.s3a.connection.ssl.enabled"] = str(not _endpoint_http(settings)).lower()
    if key and secret:
        conf["fs.s3a.access.key"] = key
        conf["fs.s3a.secret.key"] = secret
        conf["fs.s3a.aws.credentials.provider"] = "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
    return {f"spark.hadoop.{k}": v for k, v in conf.items()}


def to_arrow_fs(uri: str, settings: ObjectStoreSettings | None = None) -> tuple[pa_fs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for ``uri``: the local filesystem for a folder, an
    ``S3FileSystem`` made from the storage settings for ``s3://``/``s3a://`` (cached per settings)."""
    import pyarrow.fs as pa_fs

    if is_local(uri):
        return pa_fs.LocalFileSystem(), os.path.abspath(local_path(uri))
    if scheme(uri) not in OBJECT_STORE_SCHEMES:
        raise ConfigError(f"{uri}: scheme {scheme(uri)}:// is not supported", "use a local folder, s3:// or s3a://")
    settings = _settings(settings)
    path = uri.split("://", 1)[1].rstrip("/")
    if settings is None:
        return pa_fs.S3FileSystem(), path
    _check_http(settings)
    key, secret = _credentials(settings)
    cache_key = (settings.endpoint_url, settings.region, key, secret, settings.path_style, settings.timeout_s)
    with _lock:
        filesystem = _filesystems.get(cache_key)
        if filesystem is None:
            if settings.endpoint_url:
                # The AWS SDK's default request checksums (2025) are not understood by every S3-compatible
                # server (S3Proxy answers XAmzContentSHA256Mismatch); send them only where required. Read
                # once, when pyarrow initialises the SDK.
                os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
                os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "WHEN_REQUIRED")
            endpoint = settings.endpoint_url
            filesystem = pa_fs.S3FileSystem(
                access_key=key, secret_key=secret, region=settings.region,
                endpoint_override=endpoint.split("://", 1)[-1] if endpoint else None,
                scheme="http" if _endpoint_http(settings) else "https",
                force_virtual_addressing=not settings.path_style,
                connect_timeout=min(settings.timeout_s, 10), request_timeout=settings.timeout_s,
                retry_strategy=pa_fs.AwsStandardS3RetryStrategy(max_attempts=2))
            _filesystems[cache_key] = filesystem
    return filesystem, path


# File operations and the other-process half live in submodules (each file near the size rule),
# re-exported here: callers use lakeray.storage.<name>.
from lakeray.storage.files import (append_text, check_access, exists, get_dir, is_dir, list_dir,  # noqa: E402
                                   makedirs, put_dir, read_text, remove, write_text_atomic)
from lakeray.storage.workers import use_for_boto3, worker_arrow_fs, worker_env  # noqa: E402
