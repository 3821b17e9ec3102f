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


NOISY = '''
import logging, sys, time
from pathlib import Path
import ray
from lakeray.config import load_settings
from lakeray.cluster.ray_runtime import start_ray

settings = load_settings(sys.argv[1], "local")
handle = start_ray(settings)

@ray.remote
def noisy():
    import warnings
    print("WORKER-STDOUT-MARK")
    print("WORKER-STDERR-MARK", file=sys.stderr)
    warnings.warn("WORKER-WARNING-MARK")
    return 1

assert ray.get(noisy.remote(), timeout=120) == 1
logging.getLogger("ray.data").warning("DRIVER-RAY-LOGGER-MARK")
deadline = time.time() + 30  # worker lines reach the driver through Ray's log monitor, a little later
while time.time() < deadline:
    text = Path(handle.log_file).read_text() if handle.log_file else ""
    if "WORKER-STDERR-MARK" in text and "WORKER-STDOUT-MARK" in text:
        break
    if handle.log_file is None and time.time() > deadline - 25:
        break
    time.sleep(0.5)
print("LOG-FILE:", handle.log_file)
print("lakeray progress line")
handle.shutdown()
'''


def _run_noisy(settings, ray_handle, tmp_path, debug: bool):
    script = tmp_path / "noisy.py"
    script.write_text(NOISY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_HAPROXY")}
    env.update(LAKERAY_STORAGE__ROOT=str(tmp_path / "root"), LAKERAY_RAY__ADDRESS=ray_handle.address)
    env.pop("LAKERAY_DEBUG", None)
    if debug:
        env["LAKERAY_DEBUG"] = "1"
    done = subprocess.run([sys.executable, str(script), str(settings.project_dir / "lakeray.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_ray_worker_output_goes_to_a_log_file_not_the_terminal(settings, ray_handle, tmp_path):
    done = _run_noisy(settings, ray_handle, tmp_path, debug=False)
    terminal = done.stdout + done.stderr
    assert "lakeray progress line" in done.stdout
    for mark in ("WORKER-STDOUT-MARK", "WORKER-STDERR-MARK", "WORKER-WARNING-MARK", "DRIVER-RAY-LOGGER-MARK"):
        assert mark not in terminal, f"{mark} reached the terminal"
    log_file = done.stdout.split("LOG-FILE: ", 1)[1].split()[0]
    assert log_file.startswith(str(tmp_path / "root" / "logs" / "ray-"))
    logged = open(log_file).read()
    for mark in ("WORKER-STDOUT-MARK", "WORKER-STDERR-MARK", "WORKER-WARNING-MARK", "DRIVER-RAY-LOGGER-MARK"):
        assert mark in logged, f"{mark} is missing from {log_file}"


def test_debug_shows_ray_worker_output_on_the_terminal(settings, ray_handle, tmp_path):
    done = _run_noisy(settings, ray_handle, tmp_path, debug=True)
    assert "WORKER-STDOUT-MARK" in done.stdout + done.stderr
