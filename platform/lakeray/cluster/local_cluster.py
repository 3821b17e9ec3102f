"""``lakeray cluster up|down|status``: a local Ray + Spark standalone cluster that outlives one command.

``up`` starts a Ray head (``ray start --head``: GCS, dashboard and the Jobs API bound to 127.0.0.1, Ray
2.60's token auth as Ray sets it up), ``--workers N`` extra Ray worker nodes on this machine, and a
Spark standalone master plus one worker from the pyspark install. What it started is recorded in
``<storage root>/cluster/state.json``; ``down`` stops exactly that (Ray's processes are found by the
cluster's own temp dir in their command lines, Spark's by the pids recorded), never another Ray on the
machine. While the state file names a live head, every lakeray command connects to it instead of
starting a private Ray (``ray_runtime.start_ray``) and Spark sessions use its master
(``lakehouse.spark``).

``up(..., node_ip=IP)`` is the head of several hosts (``lakeray cluster up --head``): Ray and the Spark
master listen on that address at fixed ports, and other hosts join it (``lakeray.cluster.hosts``). A
host only ever stops processes of its own network namespace (on one machine, the test's hosts are
network namespaces sharing one ``/proc``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lakeray.cluster.processes import (
    LOOPBACK,
    agent_port_args,
    answers,
    bin_path,
    current_token,
    free_port,
    is_local_address,
    kill_ray_processes,
    port_free,
    ray_env,
    run_logged,
    spark_env,
    spark_home,
    spark_worker_command,
    spark_worker_memory_mb,
    start_jvm,
    stop_groups,
)
from lakeray.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["ClusterState", "up", "down", "status", "running", "state_file", "token_file", "temp_dir_for", "local_root",
           "read_state", "write_state", "refuse_if_running"]

_HOST = LOOPBACK


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
    node_ip: str = _HOST  # the head's address; another host joins it there (loopback: this machine only)
    token_file: str | None = None  # the head's token, shared under the storage root (`up --share-token`)
    # Ray on an existing Spark cluster (`up --on-spark`, lakeray.cluster.on_spark): the detached driver
    # that holds the Spark application hosting the Ray nodes; `down` stops it.
    driver_pid: int | None = None
    spark_app_id: str | None = None
    spark_app_ui_url: str | None = None

    def connect_kwargs(self) -> dict[str, Any]:
        """``ray.init`` arguments for a driver of this cluster. Call it before ``import ray``: an explicit
        address never turns Ray 2.60's token auth on by itself, and Ray reads RAY_AUTH_MODE once."""
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        # A host that joined through the shared storage root may have no ~/.ray/auth_token of its own;
        # Ray's own RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH still win when the operator set them.
        if (self.token_file and os.path.isfile(self.token_file)
                and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))):
            os.environ["RAY_AUTH_TOKEN_PATH"] = self.token_file
        return {"address": self.ray_address}


def local_root(settings: Settings) -> str:
    """The storage root as an absolute local folder: cluster state lives there (ConfigError otherwise)."""
    root = settings.storage_root
    if "://" in root:
        raise ConfigError(f"storage.root {root} is an object store; `lakeray cluster up` keeps its state in a "
                          "local folder", "use a local storage.root for a local cluster")
    return os.path.abspath(root)


def state_file(settings: Settings) -> str:
    return os.path.join(local_root(settings), "cluster", "state.json")


def token_file(settings: Settings) -> str:
    """Where ``up --share-token`` puts the head's Ray token for hosts that share the storage root."""
    return os.path.join(local_root(settings), "cluster", "auth_token")


def temp_dir_for(root: str, joined_ip: str | None = None) -> str:
    """Ray's temp dir for this storage root's cluster (a joined host: one of its own, so that its `down`
    finds its processes by it). Ray's socket paths must stay under 107 bytes: a short folder in /tmp
    named by a hash, not one inside the storage root."""
    key = root if joined_ip is None else f"{root}@{joined_ip}"
    return f"/tmp/lakeray-ray{'' if joined_ip is None else 'j'}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def read_state(settings: Settings) -> ClusterState | None:
    path = state_file(settings)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return ClusterState(**json.load(fh))


def running(settings: Settings) -> ClusterState | None:
    """The recorded cluster when its Ray head answers; None when there is none (or it died)."""
    if "://" in settings.storage_root:
        return None
    state = read_state(settings)
    return state if state is not None and answers(state.ray_address) else None


def refuse_if_running(settings: Settings) -> None:
    """ClusterError when a cluster of this storage root is already running."""
    existing = running(settings)
    if existing is not None:
        joined = "" if is_local_address(existing.node_ip) else (
            f"; join it from this host with `lakeray cluster join {existing.ray_address}`")
        raise ClusterError(f"a lakeray cluster is already running for {settings.storage_root} "
                           f"(Ray at {existing.ray_address}){joined}", "`lakeray cluster status` shows it; "
                           "`lakeray cluster down` on its head stops it")


def write_state(settings: Settings, state: ClusterState) -> None:
    tmp = state_file(settings) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(asdict(state), fh, indent=2)
    os.replace(tmp, state_file(settings))


def _start_spark(state: ClusterState, cores: int, memory_mb: int, timeout_s: float,
                 port: int | None = None, ui_port: int | None = None) -> None:
    """A standalone master and one worker, each a JVM in its own session (so `down` can stop it)."""
    host = state.node_ip
    port, ui_port = port or free_port(), ui_port or free_port()
    env = spark_env(host)
    master_url = f"spark://{host}:{port}"
    master = [os.path.join(spark_home(), "bin", "spark-class"), "org.apache.spark.deploy.master.Master",
              "--host", host, "--port", str(port), "--webui-port", str(ui_port)]
    state.spark_master_url, state.spark_ui_url = master_url, f"http://{host}:{ui_port}"
    for name, cmd in [("spark-master", master),
                      ("spark-worker", spark_worker_command(master_url, host, cores, memory_mb,
                                                             os.path.join(state.log_dir, "spark-work")))]:
        state.spark_pids.append(start_jvm(cmd, env, os.path.join(state.log_dir, f"{name}.log")))
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
       spark: bool = True, timeout_s: float = 120.0, node_ip: str = _HOST, port: int | None = None,
       spark_port: int | None = None, spark_ui_port: int | None = None, share_token: bool = False) -> ClusterState:
    """Start the cluster and record it; ClusterError when one is already running here.

    ``node_ip``: the head of several hosts listens there (``port``, ``spark_port``, ``spark_ui_port``
    fixed, so other hosts know where to join); ``share_token`` copies the head's Ray token to
    :func:`token_file` for hosts that share the storage root.
    """
    refuse_if_running(settings)
    if not is_local_address(node_ip):
        raise ClusterError(f"{node_ip} is not an address of this host", "pass one of this host's addresses to --address")
    for name, wanted in (("--port", port), ("--spark-port", spark_port), ("--spark-ui-port", spark_ui_port)):
        if wanted is not None and not port_free(node_ip, wanted):
            raise ClusterError(f"port {wanted} on {node_ip} is already taken ({name})",
                               f"stop what listens there, or pick another with {name}")
    from lakeray.cluster.ray_runtime import local_num_cpus

    root = local_root(settings)
    folder = os.path.join(root, "cluster")
    os.makedirs(folder, exist_ok=True)
    temp_dir = temp_dir_for(root)
    kill_ray_processes(temp_dir)  # leftovers of a crashed earlier cluster of this root
    head_cpus = head_cpus or local_num_cpus()
    port, dashboard_port = port or free_port(), free_port()
    state = ClusterState(ray_address=f"{node_ip}:{port}", dashboard_url=f"http://{_HOST}:{dashboard_port}",
                         temp_dir=temp_dir, head_cpus=head_cpus, worker_nodes=workers, worker_cpus=worker_cpus,
                         started_at=time.time(), log_dir=os.path.join(folder, "logs"), node_ip=node_ip)
    os.makedirs(state.log_dir, exist_ok=True)
    log = os.path.join(state.log_dir, "ray-start.log")
    try:
        env = ray_env(temp_dir)
        # The dashboard and the Jobs API are bound to loopback (the head host's own). --node-ip-address:
        # the address other hosts reach this node at (a loopback head is for this machine only).
        ip_args = ["--node-ip-address", node_ip] if node_ip != _HOST else []
        run_logged([bin_path("ray"), "start", "--head", "--port", str(port), *ip_args, "--include-dashboard", "true",
                    "--dashboard-host", _HOST, "--dashboard-port", str(dashboard_port), *agent_port_args(),
                    "--num-cpus", str(head_cpus), "--temp-dir", temp_dir, "--disable-usage-stats"], env, log, timeout_s)
        for _ in range(workers):
            run_logged([bin_path("ray"), "start", "--address", state.ray_address, *ip_args, *agent_port_args(),
                        "--num-cpus", str(worker_cpus), "--disable-usage-stats"], env, log, timeout_s)
        if spark:
            cores = os.cpu_count() or 2
            _start_spark(state, cores, spark_worker_memory_mb(), timeout_s, spark_port, spark_ui_port)
        if share_token:
            state.token_file = _share_token(settings)
    except BaseException:
        _stop(state)  # nothing half-started is left running
        raise
    write_state(settings, state)
    return state


def _share_token(settings: Settings) -> str:
    token = current_token()
    if token is None:
        raise ClusterError("--share-token: the head runs without a Ray token (RAY_AUTH_MODE is not token)",
                           "drop --share-token, or start the head with token auth")
    path = token_file(settings)
    # Owner-only from the first byte: the token lets anyone who reads it run code on the cluster.
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token)
    os.replace(path + ".tmp", path)
    return path


def _stop(state: ClusterState) -> list[int]:
    if state.driver_pid is not None:
        from lakeray.cluster.on_spark import stop_driver

        return stop_driver(state)
    return stop_groups(state.spark_pids) + kill_ray_processes(state.temp_dir)


def down(settings: Settings) -> list[int]:
    """Stop what ``up`` recorded (also when its head already died); the pids stopped. [] when none, or
    when the head is another host sharing this storage root (that host's `down` stops it)."""
    state = read_state(settings)
    if state is None or not is_local_address(state.node_ip):
        return []
    stopped = _stop(state)
    os.remove(state_file(settings))
    if state.token_file and os.path.isfile(state.token_file):
        os.remove(state.token_file)
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
        from lakeray.cluster.processes import check_token

        check_token(state.ray_address)
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
            "on_spark": None if state.driver_pid is None else {
                "driver_pid": state.driver_pid, "spark_app_id": state.spark_app_id,
                "spark_app_ui_url": state.spark_app_ui_url},
            "uptime_s": round(time.time() - state.started_at, 1)}
