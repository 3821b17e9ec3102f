"""start_ray / RayHandle.shutdown against a real local Ray: lakeray stops only what it started."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.ray


def test_shutdown_leaves_a_ray_the_caller_started_connected(settings, ray_handle):
    import ray

    from lakeray.cluster.ray_runtime import start_ray

    assert ray.is_initialized()
    borrowed = start_ray(settings)  # Ray is up already (the fixture's): lakeray made no connection
    assert not borrowed.owns_cluster
    borrowed.shutdown()
    assert ray.is_initialized()
    assert ray.get(ray.put(41), timeout=60) == 41  # and still usable by the caller (and later tests)


def test_shutdown_disconnects_a_connection_lakeray_made_to_a_running_cluster(settings, ray_handle):
    """In a child process (so this session's Ray connection stays up): connect to the fixture's
    cluster by address, shut the handle down: the child is disconnected, the cluster keeps running."""
    script = textwrap.dedent(f"""
        import ray
        from lakeray.config import load_settings
        from lakeray.cluster.ray_runtime import start_ray
        settings = load_settings({str(settings.project_dir / "lakeray.yaml")!r}, "local")
        handle = start_ray(settings)
        assert not handle.owns_cluster and ray.is_initialized()
        handle.shutdown()
        print("connected after shutdown:", ray.is_initialized())
    """)
    env = {**os.environ, "LAKERAY_STORAGE__ROOT": settings.storage_root, "LAKERAY_RAY__ADDRESS": ray_handle.address}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "connected after shutdown: False" in done.stdout
    import ray

    assert ray.get(ray.put(7), timeout=60) == 7  # the cluster lakeray only connected to still runs
