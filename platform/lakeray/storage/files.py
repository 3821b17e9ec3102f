"""File operations on storage URIs, local folders and object stores alike (re-exported by lakeray.storage)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

from lakeray.errors import ConfigError
from lakeray.storage import ObjectStoreSettings, _settings, is_local, local_path, to_arrow_fs

__all__ = ["exists", "is_dir", "list_dir", "read_text", "write_text_atomic", "append_text", "put_dir", "get_dir",
           "makedirs", "remove", "check_access"]


# --- file operations (local folders and object stores alike) --------------------------------------


def _info(uri: str):
    filesystem, path = to_arrow_fs(uri)
    return filesystem.get_file_info(path)


def exists(uri: str) -> bool:
    import pyarrow.fs as pa_fs

    return _info(uri).type != pa_fs.FileType.NotFound


def is_dir(uri: str) -> bool:
    """A folder (local) or a prefix with objects below it (object store)."""
    import pyarrow.fs as pa_fs

    if is_local(uri):
        return os.path.isdir(local_path(uri))
    filesystem, path = to_arrow_fs(uri)
    if filesystem.get_file_info(path).type == pa_fs.FileType.Directory:
        return True
    return bool(filesystem.get_file_info(pa_fs.FileSelector(path, allow_not_found=True, recursive=False)))


def list_dir(uri: str) -> list[str]:
    """Names directly below ``uri`` (files and folders), sorted; [] when it does not exist."""
    import pyarrow.fs as pa_fs

    filesystem, path = to_arrow_fs(uri)
    infos = filesystem.get_file_info(pa_fs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted({info.base_name for info in infos if info.base_name})


def read_text(uri: str) -> str:
    filesystem, path = to_arrow_fs(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def write_text_atomic(uri: str, text: str) -> None:
    """Write ``text`` so a reader sees the old content or the new, never half: a local file is written
    beside and renamed; an object-store PUT is atomic by itself."""
    if is_local(uri):
        target = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
        return
    filesystem, path = to_arrow_fs(uri)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


def append_text(uri: str, text: str) -> None:
    """Append ``text`` to a file. An object has no append: it is read and written again whole (one
    writer at a time — a run's rank 0 — and small files: progress lines)."""
    if is_local(uri):
        target = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(text)
        return
    try:
        before = read_text(uri)
    except FileNotFoundError:
        before = ""
    write_text_atomic(uri, before + text)


def put_dir(local_dir: str, uri: str, last: str | None = None) -> None:
    """Copy the local folder ``local_dir`` to ``uri`` (replacing what was there) so a reader never sees
    half of it: locally a sibling folder renamed into place; on an object store every file uploaded
    before the one named ``last``, whose presence marks the folder complete."""
    import pyarrow.fs as pa_fs

    if is_local(uri):
        target = local_path(uri)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_dir, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return
    remove(uri)
    filesystem, path = to_arrow_fs(uri)
    local = pa_fs.LocalFileSystem()
    for name in sorted(os.listdir(local_dir), key=lambda n: n == last):  # ``last`` goes last
        pa_fs.copy_files(os.path.join(local_dir, name), f"{path}/{name}", source_filesystem=local,
                         destination_filesystem=filesystem)


def get_dir(uri: str) -> str:
    """A local folder holding the files of folder ``uri``: the folder itself when local, else a fresh
    temporary copy (the caller's to delete)."""
    import pyarrow.fs as pa_fs

    if is_local(uri):
        return local_path(uri)
    filesystem, path = to_arrow_fs(uri)
    target = tempfile.mkdtemp(prefix="lakeray-download-")
    pa_fs.copy_files(path, target, source_filesystem=filesystem, destination_filesystem=pa_fs.LocalFileSystem())
    return target


def makedirs(uri: str) -> None:
    """A local folder (and its parents); a no-op on object stores (prefixes need no creating)."""
    if is_local(uri):
        os.makedirs(local_path(uri), exist_ok=True)


def remove(uri: str) -> None:
    """Delete a file or a folder with everything below it; a no-op when it is not there."""
    import pyarrow.fs as pa_fs

    filesystem, path = to_arrow_fs(uri)
    info = filesystem.get_file_info(path)
    if info.type == pa_fs.FileType.File:
        filesystem.delete_file(path)
    elif info.type == pa_fs.FileType.Directory or not is_local(uri):
        try:
            filesystem.delete_dir(path)
        except FileNotFoundError:
            pass


def check_access(uri: str, settings: ObjectStoreSettings | None = None) -> None:
    """ConfigError naming the setting when the object store behind ``uri`` cannot be used: endpoint not
    answering, credentials rejected, bucket missing. Bounded by ``storage.timeout_s``. Local: no-op."""
    import pyarrow.fs as pa_fs

    if is_local(uri):
        return
    settings = _settings(settings)
    filesystem, path = to_arrow_fs(uri, settings)
    bucket = path.split("/", 1)[0]
    endpoint = (settings.endpoint_url if settings else None) or "the AWS default endpoint"
    try:
        info = filesystem.get_file_info(bucket)
    except OSError as exc:
        text = str(exc)
        if "ACCESS_DENIED" in text or "403" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
            names = ", ".join(f"storage.{f} ({getattr(settings, f)})" for f in ("access_key_env", "secret_key_env")
                              if settings is not None and getattr(settings, f)) or "the default AWS credentials"
            raise ConfigError(f"the object store at {endpoint} rejected the credentials for bucket {bucket!r} "
                              f"(from {names})", "set the right key and secret in those variables") from None
        raise ConfigError(f"the object store at storage.endpoint_url {endpoint} did not answer for {uri} within "
                          f"storage.timeout_s ({text.splitlines()[0]})",
                          "check storage.endpoint_url and that the store is running") from None
    if info.type == pa_fs.FileType.NotFound:
        raise ConfigError(f"bucket {bucket!r} of {uri} does not exist at {endpoint}",
                          "create the bucket, or fix storage.root")
