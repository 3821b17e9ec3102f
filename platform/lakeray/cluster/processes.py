"""Processes of a lakeray cluster on one host: start Ray and Spark daemons, find and stop them.

Shared by the single-host cluster (``local_cluster``) and the hosts that join it (``hosts``). A host is
what one network namespace sees: on one machine, the test's hosts are namespaces sharing /proc and /tmp.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from lakeray.errors import ClusterError

__all__ = ["LOOPBACK", "free_port", "is_local_address", "route_source", "port_free", "answers", "bin_path", "run_logged",
           "agent_port_args", "ray_env", "spark_home", "spark_worker_command", "spark_env",
           "start_jvm", "current_token", "token_source", "check_token", "spark_worker_memory_mb", "ray_pids", "alive", "terminate",
           "kill_ray_processes", "group_members", "stop_groups"]

LOOPBACK = "127.0.0.1"
_TAG = "LAKERAY_CLUSTER_NODE"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def is_local_address(ip: str) -> bool:
    """True when ``ip`` belongs to this host (this network namespace): only then can a socket bind it."""
    try:
        with socket.socket() as sock:
            sock.bind((ip, 0))
        return True
    except OSError:
        return False


def route_source(host: str, port: int) -> str:
    """This host's address on the route to ``host`` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, port))
        except OSError as exc:
            raise ClusterError(f"no route from this host to {host}: {exc}",
                               "check the address and this host's network") from None
        return sock.getsockname()[0]


def port_free(ip: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
            return True
        except OSError:
            return False


def answers(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False



def bin_path(name: str) -> str:
    found = os.path.join(os.path.dirname(sys.executable), name)
    return found if os.path.exists(found) else (shutil.which(name) or name)


def run_logged(cmd: list[str], env: dict[str, str], log: str, timeout_s: float) -> None:
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


def agent_port_args() -> list[str]:
    """A free port for the node's dashboard agent (it serves the Jobs API's node side). Ray's default is
    a fixed 52365: the first node of any other Ray on the machine holds it, and this node's job agent
    then never starts."""
    return ["--dashboard-agent-listen-port", str(free_port())]


def ray_env(temp_dir: str) -> dict[str, str]:
    """The environment of `ray start` for the node whose temp dir is ``temp_dir``."""
    env = dict(os.environ)
    env[_TAG] = temp_dir  # every process Ray starts inherits it: how `down` finds them all
    # A cluster started from a driver that set HAProxy ports for its own private Ray must not inherit
    # them (DESIGN.md, traps): the cluster's Serve picks its own.
    for key in [k for k in env if k.startswith("RAY_SERVE_HAPROXY_")]:
        env.pop(key)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Ray 2.60 turns token auth on for a head by default (the token in ~/.ray/auth_token) but not for a
    # node that joins: say it explicitly, for every node, unless the operator chose otherwise.
    env.setdefault("RAY_AUTH_MODE", "token")
    # The raylet waits this long for its dashboard agent to start, then aborts the node ("The current
    # node timed out during startup"). Ray's 15 s was too short on a loaded 2-core machine: the agent's
    # imports alone took 17-26 s at a load of 25-40, and every `ray start` failed.
    env.setdefault("RAY_agent_register_timeout_ms", "120000")
    return env


# Finished applications' folders on a standalone worker are kept this long (executor logs to read after
# a failure), then removed by the worker's cleanup (checked every 30 min, Spark's default interval).
WORKER_APP_DATA_TTL_S = 3 * 24 * 3600


def spark_home() -> str:
    import pyspark

    return os.path.dirname(pyspark.__file__)


def spark_worker_command(master_url: str, host: str, cores: int, memory_mb: int, work_dir: str) -> list[str]:
    """A standalone worker whose application folders (each executor's stdout/stderr and the jars and files
    shipped to it) go to ``work_dir``, next to the cluster's other logs. Spark's default is
    $SPARK_HOME/work, i.e. inside the venv's pyspark package, where nothing ever removed them (12 GB
    over a few days of tests here)."""
    os.makedirs(work_dir, exist_ok=True)
    return [os.path.join(spark_home(), "bin", "spark-class"), "org.apache.spark.deploy.worker.Worker", master_url,
            "--host", host, "--cores", str(cores), "--memory", f"{memory_mb}m", "--webui-port", str(free_port()),
            "--work-dir", work_dir]


def spark_env(host: str) -> dict[str, str]:
    # SPARK_LOCAL_IP: a JVM binds and advertises this address, not whatever the hostname resolves to
    # (on a host made as a network namespace, the hostname is the machine's).
    # Worker cleanup: a long-lived cluster (scheduled hourly feature jobs) would otherwise keep every
    # finished application's folder; Spark removes those of stopped applications after appDataTtl.
    opts = " ".join(filter(None, [os.environ.get("SPARK_WORKER_OPTS", ""), "-Dspark.worker.cleanup.enabled=true",
                                  f"-Dspark.worker.cleanup.appDataTtl={WORKER_APP_DATA_TTL_S}"]))
    return {**os.environ, "SPARK_HOME": spark_home(), "SPARK_LOCAL_IP": host, "SPARK_NO_DAEMONIZE": "1",
            "SPARK_WORKER_OPTS": opts}


def start_jvm(cmd: list[str], env: dict[str, str], log: str) -> int:
    """A Spark daemon in its own session, so `down` can stop it with whatever it started; its pid."""
    with open(log, "a", encoding="utf-8") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True).pid



def current_token() -> str | None:
    """The token this host's Ray uses, in Ray's own order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token (``ray start --head`` writes that one when none exists)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), os.path.expanduser("~/.ray/auth_token")):
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                token = fh.read().strip()
            if token:
                return token
    return None



def token_source() -> str:
    """Where this process's Ray token comes from, in Ray's order, for error messages (never the token)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return f"none was sent: RAY_AUTH_MODE is {os.environ.get('RAY_AUTH_MODE') or 'not set'}"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return f"this host's {os.path.expanduser('~/.ray/auth_token')}"


def check_token(address: str) -> None:
    """ClusterError naming the token's source when the Ray cluster at ``address`` (a GCS address)
    refuses this process's token. Call it after RAY_AUTH_MODE is set and before ``ray.init``: a GCS client
    gets the refusal in about a second, where ``ray.init`` retries for ~20 s, logging a line a second,
    and ends with "Failed to connect". Anything else is left to ``ray.init``."""
    if address.startswith("ray://") or not answers(address):
        return
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        GcsClient(address=address)
    except AuthenticationError:
        raise ClusterError(f"the Ray cluster at {address} refused this host's token ({token_source()})",
                           "use the cluster's token (`ray get-auth-token` on its head prints it) through "
                           "RAY_AUTH_TOKEN_PATH (a file) with RAY_AUTH_MODE=token") from None
    except Exception:  # noqa: BLE001 - not a token problem: ray.init reports it
        return


def spark_worker_memory_mb() -> int:
    with open("/proc/meminfo", encoding="utf-8") as fh:
        total_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal"))
    return max(1024, total_kb // 1024 // 4)  # a quarter of the machine: Ray and the driver need the rest


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    children.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return children


def ray_pids(temp_dir: str) -> list[int]:
    """Processes of the cluster on this host: those that carry the temp dir in their command line or
    inherited the tag :func:`ray_env` sets, and everything below them. Ray's agents and workers rename
    themselves (``ray::DashboardAgent``, ``ray::IDLE``), which overwrites both their command line and
    their environment as /proc shows them: they are found as the raylet's children, before it stops.
    Only this network namespace's: hosts made as namespaces of one machine share /proc (and /tmp), and
    `down` on one must not stop another's."""
    own_net = os.readlink("/proc/self/ns/net")
    tag = f"{_TAG}={temp_dir}".encode() + b"\0"
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            if temp_dir not in cmdline:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if tag not in fh.read():
                        continue
            if os.readlink(f"/proc/{entry}/ns/net") == own_net:
                found.add(int(entry))
        except OSError:
            continue
    children, stack = _children(), list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child != os.getpid():
                found.add(child)
                stack.append(child)
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# A SIGKILLed process is still in /proc (state R/D, empty command line) until the kernel has torn down
# its memory: a raylet or a JVM of a few GB takes a moment. `down` returns only after that, so a
# port it held is free and nothing of the cluster is listed any more when it says "stopped".
_KILL_WAIT_S = 10.0


def terminate(pids: list[int], grace_s: float = 10.0) -> list[int]:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + _KILL_WAIT_S
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return pids


def kill_ray_processes(temp_dir: str, rounds: int = 3) -> list[int]:
    """Stop every process of the Ray node(s) with ``temp_dir``. The list is taken again after each round:
    a raylet that is being stopped may still fork a worker after the first listing."""
    stopped: list[int] = []
    for _ in range(rounds):
        pids = [pid for pid in ray_pids(temp_dir) if alive(pid)]
        if not pids:
            break
        stopped += terminate(pids)
    return stopped


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def stop_groups(pgids: list[int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM each process group (a Spark daemon: the JVM and what it started, executors and their
    Python workers; a Dagster daemon or webserver and its code server), SIGKILL whatever of a group is
    left after ``grace_s``, the leader gone or not. The groups that took the SIGTERM."""
    stopped = []
    for pid in pgids:
        try:
            os.killpg(pid, signal.SIGTERM)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(group_members(p) for p in pgids):
        time.sleep(0.2)
    for pid in pgids:
        if group_members(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + _KILL_WAIT_S
    while time.monotonic() < deadline and any(group_members(p) for p in pgids):
        time.sleep(0.1)
    return stopped
