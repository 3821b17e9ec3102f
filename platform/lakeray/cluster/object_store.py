"""A real S3-compatible server on this machine: S3Proxy (Maven Central) over a local folder.

Tests and the cluster demo put the lakehouse on ``s3://…`` against it, so Spark (hadoop-aws), delta-rs
and pyarrow all speak the S3 protocol to a real server, not a mock. :func:`resolve_s3proxy` caches
S3Proxy's single ``jar-with-dependencies`` once per user (``<user cache>/jars/org.gaul_s3proxy_<v>/``,
checked against Maven Central's SHA-1, renamed into place in one step); :func:`start_s3proxy` runs it
with the filesystem backend, bound to 127.0.0.1, with credentials chosen here, and returns once it
answers; :meth:`S3Proxy.stop` ends exactly that process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path  # local-only: the jar cache and the server's own folders

from lakeray.errors import ClusterError, SetupError

__all__ = ["S3PROXY_VERSION", "S3Proxy", "resolve_s3proxy", "start_s3proxy"]

S3PROXY_VERSION = "2.6.0"
_MAVEN = "https://repo1.maven.org/maven2"
_HOST = "127.0.0.1"


def _jar_name() -> str:
    return f"s3proxy-{S3PROXY_VERSION}-jar-with-dependencies.jar"


def resolve_s3proxy(cache_dir: Path | None = None, timeout_s: float = 300) -> Path:
    """The cached S3Proxy jar, downloading it from Maven Central first when missing."""
    from lakeray.lakehouse.spark import user_cache_dir

    folder = cache_dir or user_cache_dir() / "jars" / f"org.gaul_s3proxy_{S3PROXY_VERSION}"
    jar = folder / _jar_name()
    if jar.is_file():
        return jar
    folder.mkdir(parents=True, exist_ok=True)
    url = f"{_MAVEN}/org/gaul/s3proxy/{S3PROXY_VERSION}/{_jar_name()}"
    fd, tmp = tempfile.mkstemp(prefix=f".{jar.name}.", dir=folder)
    try:
        digest = hashlib.sha1()  # noqa: S324 - Maven Central publishes SHA-1 checksums
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        with urllib.request.urlopen(url + ".sha1", timeout=60) as response:  # noqa: S310
            expected = response.read().decode().split()[0].strip()
        if digest.hexdigest() != expected:
            raise SetupError(f"{url}: SHA-1 {digest.hexdigest()} does not match Maven Central's {expected}",
                             "run again (a proxy may have cut the download)")
        os.replace(tmp, jar)  # whole or not at all, also with another process downloading at the same time
    except OSError as exc:
        raise SetupError(f"could not download S3Proxy from {url}: {exc}", "check access to Maven Central") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return jar


@dataclass
class S3Proxy:
    """A running S3Proxy: its endpoint, the credentials it accepts, and how to stop it."""

    endpoint: str
    access_key: str
    secret_key: str
    root_dir: str
    pid: int
    log_file: str
    _process: subprocess.Popen | None = None

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``: only this server's process group."""
        if self._process is None or self._process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self._process.wait(timeout_s)

    def __enter__(self) -> S3Proxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_free(port: int, host: str = _HOST) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


def start_s3proxy(root_dir: str, port: int | None = None, buckets: tuple[str, ...] = (),
                  access_key: str | None = None, secret_key: str | None = None, start_timeout_s: float = 60,
                  jar: Path | None = None, host: str = _HOST) -> S3Proxy:
    """Start S3Proxy serving ``root_dir`` (one sub-folder per bucket; ``buckets`` are created) on
    ``host``:``port`` (127.0.0.1 and a free port by default; another host only for a cluster network such
    as ``make demo-cluster``'s namespaces, whose hosts cannot reach each other's loopback); returns once it answers HTTP. ClusterError naming the port
    when it is taken, or with the log's tail when the server does not come up within ``start_timeout_s``
    (then nothing is left running)."""
    from lakeray.lakehouse.spark import check_java

    java = check_java()
    jar = jar or resolve_s3proxy()
    if port is None:
        port = _free_port()
    elif not _port_free(port, host):
        raise ClusterError(f"port {host}:{port} is already taken: S3Proxy cannot listen there",
                           "pick another port, or stop what listens there")
    root = Path(root_dir).resolve()
    for bucket in buckets:
        (root / bucket).mkdir(parents=True, exist_ok=True)
    access_key = access_key or "lakeray-" + secrets.token_hex(4)
    secret_key = secret_key or secrets.token_hex(16)
    state = Path(tempfile.mkdtemp(prefix="lakeray-s3proxy-"))
    endpoint = f"http://{host}:{port}"
    properties = state / "s3proxy.properties"
    properties.write_text("\n".join([
        f"s3proxy.endpoint={endpoint}",
        "s3proxy.authorization=aws-v2-or-v4",
        f"s3proxy.identity={access_key}",
        f"s3proxy.credential={secret_key}",
        "jclouds.provider=filesystem",
        f"jclouds.filesystem.basedir={root}",
        "",
    ]))
    properties.chmod(0o600)  # it holds the secret
    log_file = state / "s3proxy.log"
    with open(log_file, "ab") as log:
        # Its own session: stop() signals exactly this group; a SIGINT ignored by a background shell
        # does not matter (SIGTERM ends the JVM).
        process = subprocess.Popen([java, "-Xmx256m", "-jar", str(jar), "--properties", str(properties)],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    server = S3Proxy(endpoint, access_key, secret_key, str(root), process.pid, str(log_file), process)
    deadline = time.monotonic() + start_timeout_s
    while True:
        if process.poll() is not None:
            break
        try:
            with socket.create_connection((host, port), timeout=1):
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    server.stop()
    tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
    shutil.rmtree(state, ignore_errors=True)
    raise ClusterError(f"S3Proxy did not start on {endpoint} within {start_timeout_s:.0f} s: " + " | ".join(tail),
                       "see the message above; check Java and that the port is free")
