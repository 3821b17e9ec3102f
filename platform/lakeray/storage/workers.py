"""The object store from other processes: Ray workers, Serve replicas, and boto3 (MLflow's artifacts).

A process that loaded no profile resolves the root and settings from ``LAKERAY_STORAGE__*``
(:func:`lakeray.storage.configured`); :func:`worker_env` is what the driver puts in the cluster's
runtime env for that. Secrets never travel: the variables name them, and ``${NAME}`` references are
expanded by Ray on each node from that node's own environment.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from lakeray.storage import (ObjectStoreSettings, StoreSettings, _check_http, _credentials, _env_name, _settings,
                             is_local, to_arrow_fs)

if TYPE_CHECKING:
    import pyarrow.fs as pa_fs

__all__ = ["worker_env", "use_for_boto3", "worker_arrow_fs"]


def _boto3_env(settings: ObjectStoreSettings, references: bool) -> dict[str, str]:
    """What boto3 (MLflow's S3 artifact store) reads. ``references``: secrets as ``${NAME}`` of the
    variables the profile names (Ray expands them on each node); else their values (this process)."""
    env = {"AWS_DEFAULT_REGION": settings.region,
           "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE": "path" if settings.path_style else "virtual"}
    if settings.endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.endpoint_url
        # botocore's default request checksums (2025) are refused by some S3-compatible servers, as
        # with pyarrow (to_arrow_fs).
        env["AWS_REQUEST_CHECKSUM_CALCULATION"] = env["AWS_RESPONSE_CHECKSUM_VALIDATION"] = "WHEN_REQUIRED"
    key, secret = (None, None) if references else _credentials(settings)
    for target, field, value in (("AWS_ACCESS_KEY_ID", "access_key_env", key),
                                 ("AWS_SECRET_ACCESS_KEY", "secret_key_env", secret)):
        name = getattr(settings, field)
        if name and name != target:
            env[target] = f"${{{name}}}" if references else str(value)
    return env


def worker_env(root: str, settings: ObjectStoreSettings | None = None) -> dict[str, str]:
    """The runtime-env variables that let a Ray worker or Serve replica on any host resolve the same
    object-store root and credentials without a profile file: the settings as ``LAKERAY_STORAGE__*``
    (secrets by variable NAME) and boto3's variables for MLflow artifacts (secrets as ``${NAME}``
    references, expanded by Ray on the node). ``{}`` for a local root."""
    settings = _settings(settings)
    if is_local(root) or settings is None:
        return {}
    env = {"LAKERAY_STORAGE__ROOT": root}
    for f in fields(StoreSettings):
        value = getattr(settings, f.name)
        if value is not None:
            env[_env_name(f.name)] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(_boto3_env(settings, references=True))
    return env


def use_for_boto3(settings: ObjectStoreSettings | None = None) -> None:
    """Point boto3 in this process (MLflow's S3 artifact store) at the object store, secrets read from
    the variables the profile names. No-op without object-store settings."""
    settings = _settings(settings)
    if settings is None:
        return
    _check_http(settings)
    os.environ.update(_boto3_env(settings, references=False))


def worker_arrow_fs(uri: str, settings: ObjectStoreSettings | None = None) -> tuple[pa_fs.FileSystem, str]:
    """Like :func:`to_arrow_fs`, but a filesystem that pickles without secrets (for Ray Train's
    ``RunConfig.storage_filesystem``, which travels to the controller and workers and may be saved):
    it carries the settings, and each process makes its S3 filesystem from the variables they name."""
    import pyarrow.fs as pa_fs

    filesystem, path = to_arrow_fs(uri, settings)  # checks the settings here, in the driver
    if is_local(uri):
        return filesystem, path
    store = _settings(settings)
    handler = _handler_class()(StoreSettings.of(store) if store is not None else None)
    return pa_fs.PyFileSystem(handler), path


_HANDLER: type | None = None


def _handler_class() -> type:
    """pyarrow's FileSystemHandler subclass, made on first use (no pyarrow import at import time)."""
    global _HANDLER
    if _HANDLER is None:
        import pyarrow.fs as pa_fs

        class _StoreHandler(pa_fs.FileSystemHandler):
            def __init__(self, store: StoreSettings | None) -> None:
                self.store = store

            def __reduce__(self):
                return _rebuild_handler, (self.store,)

            @property
            def fs(self) -> Any:
                return to_arrow_fs("s3://", self.store)[0]

            def __eq__(self, other: object) -> bool:
                return isinstance(other, type(self)) and other.store == self.store

            def __ne__(self, other: object) -> bool:
                return not self == other

            def get_type_name(self) -> str:
                return "lakeray-s3"

            def normalize_path(self, path: str) -> str:
                return self.fs.normalize_path(path)

            def get_file_info(self, paths: list[str]) -> list:
                return self.fs.get_file_info(paths)

            def get_file_info_selector(self, selector: Any) -> list:
                return self.fs.get_file_info(selector)

            def create_dir(self, path: str, recursive: bool) -> None:
                self.fs.create_dir(path, recursive=recursive)

            def delete_dir(self, path: str) -> None:
                self.fs.delete_dir(path)

            def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
                self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

            def delete_root_dir_contents(self) -> None:
                raise OSError("lakeray refuses to empty a whole object store")

            def delete_file(self, path: str) -> None:
                self.fs.delete_file(path)

            def move(self, src: str, dest: str) -> None:
                self.fs.move(src, dest)

            def copy_file(self, src: str, dest: str) -> None:
                self.fs.copy_file(src, dest)

            def open_input_stream(self, path: str) -> Any:
                return self.fs.open_input_stream(path)

            def open_input_file(self, path: str) -> Any:
                return self.fs.open_input_file(path)

            def open_output_stream(self, path: str, metadata: Any) -> Any:
                return self.fs.open_output_stream(path, metadata=metadata)

            def open_append_stream(self, path: str, metadata: Any) -> Any:
                return self.fs.open_append_stream(path, metadata=metadata)

        _HANDLER = _StoreHandler
    return _HANDLER


def _rebuild_handler(store: StoreSettings | None) -> Any:
    return _handler_class()(store)
