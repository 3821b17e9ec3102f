"""Shared fixtures: one Spark session and one local Ray per test session (each costs seconds to start).

Every test session writes into its own temporary lakehouse, so tests never touch ./lakehouse.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAKERAY = os.path.join(os.path.dirname(sys.executable), "lakeray")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
# Serve's HAProxy ingress keeps a stopping replica reachable for at least 30 s (Ray's default) so that an
# external load balancer (an ALB) can deregister it: every delete, promote and rolling update in the tests
# waited it out. The tests' local clusters have only Serve's own HAProxy, which rereads its backends within
# a second and retries a refused connection on another replica, so 5 s keeps the window real (the
# zero-loss rolling-update test runs through it) and takes ~25 s off each replica stop. Read by Serve's
# controller and replicas when they start: set before any Ray of the session (they inherit it).
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")


def write_learnable(path: str, rows: int, features: int, seed: int, files: int = 1,
                    storage_options: dict[str, str] | None = None) -> None:
    """A Delta table (deltalake, no Spark) of ``row_id``, ``f0``.. normal features and a 0/1 ``label``
    drawn from 1.5·f0 − f1 + 0.8·f2·f3: learnable (held-out AUC ≈ 0.85), not trivially so. In a bucket
    with ``storage_options`` (lakeray.storage.delta_options)."""
    import numpy as np
    import pandas as pd
    from deltalake import write_deltalake

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    logit = 1.5 * x[:, 0] - x[:, 1] + 0.8 * x[:, 2] * x[:, 3]
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(features)])
    frame["row_id"] = np.arange(rows, dtype=np.int64)
    frame["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    for part in np.array_split(frame, files):
        write_deltalake(path, part, mode="append", storage_options=storage_options)


def bucket_cli_env(project_dir, secrets: dict[str, str]) -> dict[str, str]:
    """The environment of a `lakeray` CLI subprocess on a bucket project: this one without lakeray's,
    AWS's and MLflow's settings (the project's lakeray.yaml decides), plus the credential variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAKERAY_", "AWS_", "MLFLOW_"))}
    return {**env, **secrets, "LAKERAY_CONFIG": str(Path(project_dir) / "lakeray.yaml")}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: the parent pid is the 2nd field after the name)."""
    import contextlib

    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every process below it (a local Ray's daemons run in
    sessions of their own): a crashed session, not a polite exit."""
    import contextlib
    import signal

    tree = descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def cluster_cli(root, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`lakeray cluster ARGS` on this checkout's lakeray.yaml with storage root ``root`` (where the
    cluster's state lives)."""
    env = {**os.environ, "LAKERAY_STORAGE__ROOT": str(root)}
    return subprocess.run([LAKERAY, "--config", str(REPO / "lakeray.yaml"), "cluster", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def lakehouse_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lakehouse")


@pytest.fixture(scope="session")
def settings(lakehouse_root):
    from lakeray.config import load_settings

    return load_settings(
        REPO / "lakeray.yaml",
        "local",
        environ={
            "LAKERAY_STORAGE__ROOT": str(lakehouse_root),
            "LAKERAY_SERVE__PORT": str(free_port()),
            "LAKERAY_SPARK__DRIVER_MEMORY": "2g",
            "LAKERAY_SPARK__SHUFFLE_PARTITIONS": "4",
            "LAKERAY_RAY__OP_TIMEOUT_S": "600",
        },
    )


@pytest.fixture(scope="session")
def spark(settings):
    from lakeray.lakehouse.spark import create_spark_session

    session = create_spark_session(settings)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ray_handle(settings):
    from lakeray.cluster.ray_runtime import start_ray

    handle = start_ray(settings)
    yield handle
    handle.shutdown()


@pytest.fixture(scope="session")
def s3proxy(tmp_path_factory):
    """One S3Proxy (a real S3-compatible server, a JVM) on loopback for the whole test session, credentials
    chosen here; each module makes its own bucket with :func:`s3_bucket`."""
    from lakeray.cluster.object_store import start_s3proxy

    server = start_s3proxy(str(tmp_path_factory.mktemp("s3proxy")))
    yield server
    server.stop()


def s3_bucket(server, name: str) -> str:
    """Create bucket ``name`` on ``server`` (S3Proxy's filesystem backend: a bucket is a folder of its root)."""
    (Path(server.root_dir) / name).mkdir(exist_ok=True)
    return name


def bucket_storage(server, bucket: str, root: str, key_var: str, secret_var: str):
    """A StorageConfig for ``root`` in ``bucket`` (created) of the session's S3Proxy, its credentials named by
    ``key_var``/``secret_var`` (the caller sets them), path-style over plain HTTP as S3Proxy serves."""
    from lakeray.config import StorageConfig

    s3_bucket(server, bucket)
    return StorageConfig(root=root, endpoint_url=server.endpoint, access_key_env=key_var, secret_key_env=secret_var,
                         path_style=True, allow_http=True, timeout_s=10)
