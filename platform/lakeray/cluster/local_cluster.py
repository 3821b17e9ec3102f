"""``lakeray cluster up|down|status``: a local Ray + Spark standalone cluster that outlives one command.

``up`` starts a Ray head (``ray start --head``: GCS, dashboard and the Jobs API bound to 127.0.0.1, Ray
2.60's token auth as Ray sets it up), ``--workers N`` extra Ray worker nodes on this machine, and a
Spark standalone master plus one worker from the pyspark install. What it started is recorded in
``<storage root>/cluster/state.json``; ``down`` stops exactly that (Ray's processes are found by the
cluster's own temp dir in their command lines, Spark's by the pids recorded), never another Ray on the
machine. While the state file names a live head, every lakeray command connects to it instead of
starting a private Ray (``ray_runtime.start_ray``) and Spark sessions use its master
(``lakehouse.spark``).

Several hosts (``--head`` / ``join``), object storage and Ray on Spark are issue 14's later parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lakeray.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["ClusterState", "up", "down", "status", "running", "state_file"]

_HOST = "127.0.0.1"


@dataclass
class ClusterState:
    """What ``up`` started; JSON in ``<storage root>/cluster/state.json``."""

    ray_address: str  # the GCS address: ray.init(address=...) and `ray start --address`
    dashboard_url: str  # also the Ray Jobs API
    temp_dir: str  # Ray's temp dir for every node of this cluster: how `down` finds its processes
    head_cpus: int
    worker_nodes: int
    worker_cpus: int
    spark_master_url: str | None = None
    spark_ui_url: str | None = None
    spark_pids: list[int] = field(default_factory=list)
    started_at: float = 0.0
    log_dir: str = ""

    def connect_kwargs(self) -> dict[str, Any]:
        """``ray.init`` arguments for a driver of this cluster. Call it before ``import ray``: an explicit
        address never turns Ray 2.60's token auth on by itself, and Ray reads RAY_AUTH_MODE once."""
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        return {"address": self.ray_address}


def _root(settings: Settings) -> str:
    root = settings.storage_root
    if "://" in root:
        raise ConfigError(f"storage.root {root} is an object store; `lakeray cluster up` keeps its state in a "
                          "local folder", "use a local storage.root for a local cluster")
    return os.path.abspath(root)


def state_file(settings: Settings) -> str:
    return os.path.join(_root(settings), "cluster", "state.json")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


def _answers(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _read_state(settings: Settings) -> ClusterState | None:
    path = state_file(settings)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return ClusterState(**json.load(fh))


def running(settings: Settings) -> ClusterState | None:
    """The recorded cluster when its Ray head answers; None when there is none (or it died)."""
    if "://" in settings.storage_root:
        return None
    state = _read_state(settings)
    return state if state is not None and _answers(state.ray_address) else None


def _bin(name: str) -> str:
    found = os.path.join(os.path.dirname(sys.executable), name)
    return found if os.path.exists(found) else (shutil.which(name) or name)


def _run(cmd: list[str], env: dict[str, str], log: str, timeout_s: float) -> None:
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"`{' '.join(cmd[:3])} ...` did not finish within {timeout_s:.0f} s",
                               f"see {log}") from None
    if done.returncode != 0:
        with open(log, encoding="utf-8") as fh:
            tail = fh.read()[-1500:]
        raise ClusterError(f"`{' '.join(cmd[:3])} ...` failed (exit {done.returncode}): {tail.strip().splitlines()[-1]}",
                           f"see {log}")


def _ray_env() -> dict[str, str]:
    env = dict(os.environ)
    # A cluster started from a driver that set HAProxy ports for its own private Ray must not inherit
    # them (DESIGN.md, traps): the cluster's Serve picks its own.
    for key in [k for k in env if k.startswith("RAY_SERVE_HAPROXY_")]:
        env.pop(key)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Ray 2.60 turns token auth on for a head by default (the token in ~/.ray/auth_token) but not for a
    # node that joins: say it explicitly, for every node, unless the operator chose otherwise.
    env.setdefault("RAY_AUTH_MODE", "token")
    return env


def _spark_home() -> str:
    import pyspark

    return os.path.dirname(pyspark.__file__)


def _start_spark(state: ClusterState, cores: int, memory_mb: int, timeout_s: float) -> None:
    """A standalone master and one worker, each a JVM in its own session (so `down` can stop it)."""
    spark_class = os.path.join(_spark_home(), "bin", "spark-class")
    port, ui_port, worker_ui = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "SPARK_HOME": _spark_home(), "SPARK_LOCAL_IP": _HOST, "SPARK_NO_DAEMONIZE": "1"}
    master_url = f"spark://{_HOST}:{port}"
    commands = [
        ("spark-master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", _HOST, "--port",
                          str(port), "--webui-port", str(ui_port)]),
        ("spark-worker", [spark_class, "org.apache.spark.deploy.worker.Worker", master_url, "--host", _HOST,
                          "--cores", str(cores), "--memory", f"{memory_mb}m", "--webui-port", str(worker_ui)]),
    ]
    state.spark_master_url, state.spark_ui_url = master_url, f"http://{_HOST}:{ui_port}"
    for name, cmd in commands:
        out = open(os.path.join(state.log_dir, f"{name}.log"), "a", encoding="utf-8")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        state.spark_pids.append(proc.pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = _spark_workers(state)
        if workers and any(w.get("state") == "ALIVE" for w in workers):
            return
        time.sleep(0.5)
    raise ClusterError(f"the Spark worker did not register with {master_url} within {timeout_s:.0f} s",
                       f"see {state.log_dir}/spark-*.log")


def _spark_workers(state: ClusterState) -> list[dict[str, Any]]:
    import httpx

    if not state.spark_ui_url:
        return []
    try:
        return httpx.get(f"{state.spark_ui_url}/json/", timeout=2).json().get("workers", [])
    except (httpx.HTTPError, ValueError):
        return []


def up(settings: Settings, workers: int = 0, head_cpus: int | None = None, worker_cpus: int = 1,
       spark: bool = True, timeout_s: float = 120.0) -> ClusterState:
    """Start the cluster and record it; ClusterError when one is already running here."""
    existing = running(settings)
    if existing is not None:
        raise ClusterError(f"a lakeray cluster is already running for {settings.storage_root} "
                           f"(Ray at {existing.ray_address})", "`lakeray cluster status` shows it; "
                           "`lakeray cluster down` stops it")
    from lakeray.cluster.ray_runtime import local_num_cpus

    root = _root(settings)
    folder = os.path.join(root, "cluster")
    os.makedirs(folder, exist_ok=True)
    # Ray's socket paths must stay under 107 bytes: a short temp dir per storage root, not one inside it.
    digest = hashlib.sha1(root.encode()).hexdigest()[:8]
    temp_dir = f"/tmp/lakeray-ray-{digest}"
    _kill_ray_processes(temp_dir)  # leftovers of a crashed earlier cluster of this root
    head_cpus = head_cpus or local_num_cpus()
    port, dashboard_port = _free_port(), _free_port()
    state = ClusterState(ray_address=f"{_HOST}:{port}", dashboard_url=f"http://{_HOST}:{dashboard_port}",
                         temp_dir=temp_dir, head_cpus=head_cpus, worker_nodes=workers, worker_cpus=worker_cpus,
                         started_at=time.time(), log_dir=os.path.join(folder, "logs"))
    os.makedirs(state.log_dir, exist_ok=True)
    log = os.path.join(state.log_dir, "ray-start.log")
    try:
        env = _ray_env()
        # Ray registers the node under the machine's address whatever --node-ip-address says (and its
        # GCS listens on every interface); the dashboard and the Jobs API are bound to loopback.
        _run([_bin("ray"), "start", "--head", "--port", str(port),
              "--include-dashboard", "true", "--dashboard-host", _HOST, "--dashboard-port", str(dashboard_port),
              "--num-cpus", str(head_cpus), "--temp-dir", temp_dir, "--disable-usage-stats"], env, log, timeout_s)
        for _ in range(workers):
            _run([_bin("ray"), "start", "--address", state.ray_address,
                  "--num-cpus", str(worker_cpus), "--disable-usage-stats"], env, log, timeout_s)
        if spark:
            cores = os.cpu_count() or 2
            _start_spark(state, cores, _spark_worker_memory_mb(), timeout_s)
    except BaseException:
        _stop(state)  # nothing half-started is left running
        raise
    tmp = state_file(settings) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(asdict(state), fh, indent=2)
    os.replace(tmp, state_file(settings))
    return state


def _spark_worker_memory_mb() -> int:
    with open("/proc/meminfo", encoding="utf-8") as fh:
        total_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal"))
    return max(1024, total_kb // 1024 // 4)  # a quarter of the machine: Ray and the driver need the rest


def _ray_pids(temp_dir: str) -> list[int]:
    """Processes of the cluster: every Ray process carries the temp dir (or its session folder) in its
    command line."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pids: list[int], grace_s: float = 10.0) -> list[int]:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return pids


def _kill_ray_processes(temp_dir: str) -> list[int]:
    return _terminate(_ray_pids(temp_dir))


def _stop(state: ClusterState) -> list[int]:
    stopped = []
    for pid in state.spark_pids:
        try:
            os.killpg(pid, signal.SIGTERM)  # the JVM and anything it started (executors)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in state.spark_pids):
        time.sleep(0.2)
    for pid in state.spark_pids:
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return stopped + _kill_ray_processes(state.temp_dir)


def down(settings: Settings) -> list[int]:
    """Stop what ``up`` recorded (also when its head already died); the pids stopped. [] when none."""
    state = _read_state(settings)
    if state is None:
        return []
    stopped = _stop(state)
    os.remove(state_file(settings))
    return stopped


def status(settings: Settings) -> dict[str, Any] | None:
    """Nodes, CPUs/GPUs, Spark workers and URLs of the running cluster; None when there is none."""
    state = running(settings)
    if state is None:
        return None
    connect = state.connect_kwargs()  # before importing ray: it reads RAY_AUTH_MODE once
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(**connect, configure_logging=False, log_to_driver=False)
    try:
        nodes = [{"node_id": n["NodeID"][:12], "address": n["NodeManagerAddress"], "alive": n["Alive"],
                  "cpus": n["Resources"].get("CPU", 0), "gpus": n["Resources"].get("GPU", 0),
                  "head": "node:__internal_head__" in n["Resources"]} for n in ray.nodes()]
        resources = ray.cluster_resources()
    finally:
        if connected_here:
            ray.shutdown()
    spark_workers = [{"id": w.get("id"), "host": w.get("host"), "cores": w.get("cores"), "state": w.get("state"),
                      "memory_mb": w.get("memory")} for w in _spark_workers(state)]
    return {"ray_address": state.ray_address, "dashboard_url": state.dashboard_url,
            "spark_master_url": state.spark_master_url, "spark_ui_url": state.spark_ui_url,
            "mlflow_tracking_uri": settings.mlflow_tracking_uri, "nodes": [n for n in nodes if n["alive"]],
            "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0), "spark_workers": spark_workers,
            "uptime_s": round(time.time() - state.started_at, 1)}
