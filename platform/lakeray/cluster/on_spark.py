"""``lakeray cluster up --on-spark MASTER_URL``: Ray on an existing Spark standalone cluster, for
Spark-first teams (``ray.util.spark.setup_ray_cluster``).

Ray on Spark lives inside a Spark application: the Ray head runs next to that application's driver, and
each Ray worker node is a long-running Spark task on an executor. The cluster lasts as long as the
driver's process, so ``up`` starts a *detached driver*: ``python -m lakeray.cluster.on_spark ARGS``, in
a session of its own, recorded in ``<storage root>/cluster/state.json`` (``driver_pid``) like the other
processes of a ``cluster up``. The driver builds a SparkSession on the master, calls
``setup_ray_cluster``, writes a ready file, then waits for SIGTERM. ``down`` sends it SIGTERM: it calls
``shutdown_ray_cluster`` (cancels the Spark job group that holds the Ray worker nodes, stops the head)
and ``spark.stop()`` (the application leaves the master); whatever is still alive after the grace is
killed by the driver's process group and by the cluster's Ray temp dir (head and worker nodes carry it).

Every Ray node gets lakeray's environment (token auth, the tag `down` finds processes by, the agent
start-up window) through Ray on Spark's start hook (``RAY_ON_SPARK_START_HOOK``): that is the channel
Ray on Spark passes to the Spark tasks that start the worker nodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from lakeray.cluster.local_cluster import ClusterState, local_root, refuse_if_running, temp_dir_for, write_state
from lakeray.cluster.processes import (
    alive,
    answers,
    free_port,
    kill_ray_processes,
    ray_env,
    route_source,
    spark_env,
    stop_groups,
)
from lakeray.errors import ClusterError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["up_on_spark", "stop_driver", "parse_master_url", "temp_root_for", "StartHook"]

# The environment every Ray node of the cluster gets (head and the Spark-hosted workers) when set here.
# PATH: Ray on Spark runs `ray start` as `shutil.which("ray")`, so the venv's bin must come first (on
# every Spark worker host too: the Spark workers need this Python environment at the same path).
_NODE_ENV = ("PATH", "LAKERAY_CLUSTER_NODE", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
             "RAY_agent_register_timeout_ms", "RAY_USAGE_STATS_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")


class StartHook:
    """Ray on Spark's start hook (duck-typed: ``RayOnSparkStartHook`` imports ray). Loaded by name from
    ``RAY_ON_SPARK_START_HOOK`` inside the detached driver."""

    def get_default_temp_root_dir(self) -> str:
        return os.environ.get("LAKERAY_CLUSTER_NODE", "/tmp")

    def on_ray_dashboard_created(self, port: int) -> None:
        pass

    def on_cluster_created(self, ray_cluster_handler: Any) -> None:
        pass

    def on_spark_job_created(self, job_group_id: str) -> None:
        pass

    def custom_environment_variables(self) -> dict[str, str]:
        return {k: os.environ[k] for k in _NODE_ENV if os.environ.get(k)}


def temp_root_for(root: str) -> str:
    """The Ray temp root of this storage root's Ray on Spark. Ray on Spark adds a "ray-<port>-<id>"
    level under it, and AF_UNIX socket paths must stay under 107 bytes (the dashboard's
    ".../session_<date>_<pid>/sockets/dash_MetricsHead"): shorter than a `cluster up` temp dir."""
    return "/tmp/lrs-" + os.path.basename(temp_dir_for(root)).rsplit("-", 1)[-1]


def parse_master_url(master_url: str) -> tuple[str, int]:
    """``spark://HOST:PORT`` → (host, port); ClusterError for anything else."""
    rest = master_url.removeprefix("spark://")
    host, _, port = rest.rpartition(":")
    if not master_url.startswith("spark://") or not host or not port.isdigit() or "," in rest:
        raise ClusterError(f"{master_url} is not a Spark standalone master URL",
                           "pass one master as spark://HOST:PORT (Ray on Spark runs on a standalone master here)")
    return host, int(port)


def up_on_spark(settings: Settings, master_url: str, workers: int = 1, worker_cpus: int = 1,
                worker_memory_mb: int = 1024, object_store_mb: int = 256, executor_memory_mb: int = 512,
                connect_timeout_s: float = 10.0, timeout_s: float = 240.0) -> ClusterState:
    """Ray on the Spark standalone cluster at ``master_url``: ``workers`` Ray worker nodes of
    ``worker_cpus`` CPUs, each a Spark task; the head (0 CPUs) next to a detached driver on this host.
    ClusterError naming the master when it does not answer within ``connect_timeout_s`` (nothing
    started) or the cluster is not ready within ``timeout_s`` (everything started is stopped)."""
    if workers < 1:
        raise ClusterError("Ray on Spark needs at least one worker node (its head has no CPUs)", "pass --workers 1 or more")
    refuse_if_running(settings)
    host, port = parse_master_url(master_url)
    deadline = time.monotonic() + connect_timeout_s
    while not answers(f"{host}:{port}", timeout_s=1.0):
        if time.monotonic() >= deadline:
            raise ClusterError(f"the Spark master {master_url} does not answer (waited {connect_timeout_s:g} s)",
                               "check the URL (spark://HOST:7077) and that the master runs there; "
                               "`lakeray cluster up` starts a local Spark + Ray instead")
        time.sleep(0.5)
    # The address the master's executors reach this driver (and the Ray head) at. Ray turns a loopback
    # address into this host's own when a driver connects, so the head must be on that one from the start.
    driver_host = route_source(host, port)
    if driver_host.startswith("127."):
        from lakeray.cluster.hosts import primary_address

        driver_host = primary_address()
    root = local_root(settings)
    folder = os.path.join(root, "cluster")
    temp_dir = temp_root_for(root)
    kill_ray_processes(temp_dir)  # leftovers of a crashed earlier cluster of this root
    state = ClusterState(ray_address="", dashboard_url="", temp_dir=temp_dir, head_cpus=0, worker_nodes=workers,
                         worker_cpus=worker_cpus, spark_master_url=master_url, started_at=time.time(),
                         log_dir=os.path.join(folder, "logs"), node_ip=driver_host)
    os.makedirs(state.log_dir, exist_ok=True)
    ready = os.path.join(folder, "on_spark_ready.json")
    if os.path.exists(ready):
        os.remove(ready)
    args = {"master_url": master_url, "driver_host": driver_host, "workers": workers, "worker_cpus": worker_cpus,
            "worker_memory_mb": worker_memory_mb, "object_store_mb": object_store_mb,
            "executor_memory_mb": executor_memory_mb, "temp_dir": temp_dir, "dashboard_port": free_port(),
            "app_name": f"lakeray-ray-on-spark-{os.path.basename(temp_dir)}", "ready_file": ready,
            "ray_logs": os.path.join(state.log_dir, "ray-on-spark")}
    env = {**ray_env(temp_dir), **spark_env(driver_host), "PYSPARK_PYTHON": sys.executable,
           "RAY_ON_SPARK_START_HOOK": f"{__name__}.StartHook"}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)  # the driver must start its own head, not connect to another Ray
    log = os.path.join(state.log_dir, "on-spark-driver.log")
    with open(log, "a", encoding="utf-8") as out:
        driver = subprocess.Popen([sys.executable, "-m", __name__, json.dumps(args)], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    state.driver_pid = driver.pid
    try:
        info = _wait_ready(driver, ready, log, master_url, timeout_s)
    except BaseException:
        stop_driver(state)  # nothing half-started is left running
        raise
    finally:
        if os.path.exists(ready):
            os.remove(ready)
    state.ray_address = info["address"]
    state.dashboard_url = f"http://{driver_host}:{info['dashboard_port']}"
    state.spark_app_id, state.spark_app_ui_url = info["app_id"], info["app_ui_url"]
    write_state(settings, state)
    return state


def _wait_ready(driver: subprocess.Popen, ready: str, log: str, master_url: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.isfile(ready):
            with open(ready, encoding="utf-8") as fh:
                return json.load(fh)
        if driver.poll() is not None:
            raise ClusterError(f"Ray on the Spark cluster {master_url} failed to start: {_last_error(log)}",
                               f"see {log}")
        time.sleep(0.5)
    raise ClusterError(f"Ray on the Spark cluster {master_url} was not ready within {timeout_s:.0f} s",
                       f"check that the master has a free worker with the cores asked for (--workers, "
                       f"--worker-cpus); see {log}")


def _last_error(log: str) -> str:
    with open(log, encoding="utf-8", errors="replace") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines or ["(no output)"])[-1][:300]


def stop_driver(state: ClusterState, grace_s: float = 60.0) -> list[int]:
    """SIGTERM the detached driver (it shuts Ray on Spark down and stops its Spark application), wait up
    to ``grace_s``, then kill what is left of its process group and of the cluster's Ray nodes."""
    stopped: list[int] = []
    pid = state.driver_pid
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGTERM)
        stopped.append(pid)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.3)
    if pid is not None:
        stop_groups([pid], grace_s=5.0)  # its py4j JVM, if the driver died before stopping it
    return stopped + kill_ray_processes(state.temp_dir)


def _serve(args: dict[str, Any]) -> None:
    """The detached driver: Ray on Spark until SIGTERM/SIGINT (or until the Spark application ends)."""
    from pyspark.sql import SparkSession

    stop = threading.Event()
    spark = (SparkSession.builder.master(args["master_url"]).appName(args["app_name"])
             .config("spark.driver.host", args["driver_host"]).config("spark.driver.bindAddress", args["driver_host"])
             .config("spark.executor.memory", f"{args['executor_memory_mb']}m")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    import ray.util.spark as ray_on_spark
    from ray.util.spark import cluster_init

    # Ray on Spark binds the head's dashboard (and the Jobs API) to every interface and blocks the
    # dashboard_host option; lakeray keeps it on the head's own address (Ray on Spark waits for it there).
    cluster_init.get_all_interfaces_ip = lambda: args["driver_host"]
    mib = 1024 * 1024
    address, _ = ray_on_spark.setup_ray_cluster(
        max_worker_nodes=args["workers"], num_cpus_worker_node=args["worker_cpus"], num_gpus_worker_node=0,
        num_cpus_head_node=0, memory_worker_node=args["worker_memory_mb"] * mib,
        object_store_memory_worker_node=args["object_store_mb"] * mib, ray_temp_root_dir=args["temp_dir"],
        # Each Ray node deletes its temp dir when it stops: its logs are copied here first.
        collect_log_to_path=args["ray_logs"],
        head_node_options={"include_dashboard": True, "dashboard_port": args["dashboard_port"],
                           "disable_usage_stats": None},
        worker_node_options={"disable_usage_stats": None})
    # Set after setup: Ray on Spark installs its own SIGTERM handler there (shutdown, then die at once).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sc = spark.sparkContext
    info = {"address": address, "dashboard_port": args["dashboard_port"], "app_id": sc.applicationId,
            "app_ui_url": sc.uiWebUrl, "pid": os.getpid()}
    with open(args["ready_file"] + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(info, fh)
    os.replace(args["ready_file"] + ".tmp", args["ready_file"])
    print(f"ray on spark ready: {info}", flush=True)
    while not stop.wait(2.0):
        if sc._jsc.sc().isStopped():  # the master killed the application: nothing to keep alive
            print("the Spark application ended", flush=True)
            break
    try:
        ray_on_spark.shutdown_ray_cluster()
    finally:
        spark.stop()
    print("ray on spark stopped", flush=True)


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
