"""Shared fixtures: one Spark session and one local Ray per test session (each costs seconds to start).

Every test session writes into its own temporary lakehouse, so tests never touch ./lakehouse.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


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
