"""Several hosts: ``lakeray cluster join HEAD_ADDRESS`` adds this host to a head started elsewhere with
``lakeray cluster up --head --address IP``: a Ray worker node (``ray start --address``) and a Spark worker
registered with the head's standalone master.

What a host started is recorded in ``<storage root>/cluster/hosts/<node ip>.json``, so several hosts can
share one storage root (and its token, see below) and ``down`` on each stops only its own: a state whose
address is not this host's is never touched, and processes are matched by this host's own Ray temp dir
in their command lines and by its network namespace.

Ray 2.60's token auth: a joining node must present the head's token. It is looked up, never printed, in
this order: ``--token-file``, Ray's own ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``, the token the head
shared under the storage root (``up --head --share-token``), ``~/.ray/auth_token``. The head is asked
once with it before anything starts: a token it refuses is one error naming that source.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from lakeray.cluster.local_cluster import local_root, read_state, temp_dir_for, token_file
from lakeray.cluster.processes import (
    agent_port_args,
    answers,
    bin_path,
    is_local_address,
    kill_ray_processes,
    ray_env,
    route_source,
    run_logged,
    spark_env,
    spark_worker_command,
    spark_worker_memory_mb,
    start_jvm,
    stop_groups,
)
from lakeray.errors import ClusterError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["JoinedHost", "join", "leave", "joined_here", "primary_address", "RAY_PORT", "SPARK_PORT", "SPARK_UI_PORT"]

# The head of several hosts listens at fixed, well-known ports (Ray's and Spark's own defaults), so a
# joining host needs nothing but the head's address.
RAY_PORT, SPARK_PORT, SPARK_UI_PORT = 6379, 7077, 8080


@dataclass
class JoinedHost:
    """What ``join`` started on this host; JSON in ``<storage root>/cluster/hosts/<node_ip>.json``."""

    head_address: str  # the head's GCS, IP:port
    node_ip: str  # this host's address, as the head reaches it
    temp_dir: str  # this node's Ray temp dir: how `down` finds its processes
    cpus: int
    spark_master_url: str | None = None
    spark_pids: list[int] = field(default_factory=list)
    started_at: float = 0.0
    log_dir: str = ""


def _hosts_folder(settings: Settings) -> str:
    return os.path.join(local_root(settings), "cluster", "hosts")


def _state_path(settings: Settings, node_ip: str) -> str:
    return os.path.join(_hosts_folder(settings), f"{node_ip}.json")


def joined_here(settings: Settings) -> list[JoinedHost]:
    """The joins recorded under the storage root whose address is this host's."""
    folder = _hosts_folder(settings)
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and is_local_address(name[: -len(".json")]):
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                found.append(JoinedHost(**json.load(fh)))
    return found


def _split(head_address: str) -> tuple[str, int]:
    host, sep, port = head_address.rpartition(":")
    if not sep:
        return head_address, RAY_PORT
    if not port.isdigit():
        raise ClusterError(f"{head_address} is not HOST[:PORT]", "pass the head's address, e.g. 10.0.0.1:6379")
    return host, int(port)


def _token_path(settings: Settings, token_file_flag: str | None) -> tuple[str | None, str]:
    """The token file for `ray start` (None when Ray's own env vars already name it) and where the token
    comes from, for error messages (never the token itself)."""
    if token_file_flag:
        if not os.path.isfile(token_file_flag):
            raise ClusterError(f"--token-file {token_file_flag} does not exist",
                               "copy the head's token there (`ray get-auth-token` on the head prints it)")
        return os.path.abspath(token_file_flag), f"--token-file {token_file_flag}"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None, "the RAY_AUTH_TOKEN environment variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None, f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    for path, what in ((token_file(settings), "the token the head shared under the storage root"),
                       (os.path.expanduser("~/.ray/auth_token"), "this host's ~/.ray/auth_token")):
        if os.path.isfile(path):
            return path, f"{what} ({path})"
    raise ClusterError("no Ray token to join the head with (Ray 2.60 token auth)",
                       "pass --token-file (the head's ~/.ray/auth_token), set RAY_AUTH_TOKEN_PATH, or start the "
                       "head with --share-token on a storage root this host shares")


# A GCS client is the first thing `ray start --address` makes: the head refuses a wrong token there.
# Asked alone it answers in about a second; `ray start` retries it for ~20 s and then prints a traceback.
_TOKEN_PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1])
except AuthenticationError:
    print("refused")
except Exception as exc:
    print("unknown", type(exc).__name__)
else:
    print("ok")
"""


def _check_token(head: str, env: dict[str, str], source: str, log: str, timeout_s: float) -> None:
    """ClusterError naming the token's source when the head refuses it; anything else is left to
    `ray start`, which reports it (an unrelated failure of the probe must not block a join)."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _TOKEN_PROBE, head], env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"token check against {head}: {done.stdout.strip() or done.stderr.strip()[-500:]}\n")
    if done.stdout.strip() == "refused":
        raise ClusterError(f"the head at {head} refused this host's Ray token (from {source}): it is not the head's",
                           "use the head's token (`ray get-auth-token` on the head prints it): put it in a file "
                           "passed with --token-file or named by RAY_AUTH_TOKEN_PATH, or start the head with "
                           "--share-token on a storage root this host shares")


def _wait_registered(log: str, master_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(log, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if "Successfully registered with master" in text:
            return
        time.sleep(0.5)
    raise ClusterError(f"this host's Spark worker did not register with {master_url} within {timeout_s:.0f} s",
                       f"check that the head's Spark master port is open to this host; see {log}")


def join(settings: Settings, head_address: str, node_ip: str | None = None, cpus: int | None = None,
         spark: bool = True, spark_master: str | None = None, spark_cores: int | None = None,
         spark_memory_mb: int | None = None, token_file_flag: str | None = None,
         connect_timeout_s: float = 10.0, timeout_s: float = 120.0) -> JoinedHost:
    """Join the head at ``head_address`` (IP[:port], port 6379 by default) with a Ray worker node and a
    Spark worker; ClusterError naming the address when the head does not answer within
    ``connect_timeout_s``. Nothing is left running when a step fails."""
    head_host, head_port = _split(head_address)
    head = f"{head_host}:{head_port}"
    deadline = time.monotonic() + connect_timeout_s
    while not answers(head, timeout_s=1.0):
        if time.monotonic() >= deadline:
            raise ClusterError(f"the head at {head} does not answer (waited {connect_timeout_s:g} s)",
                               "start it there with `lakeray cluster up --head --address IP`; check the address "
                               f"and that port {head_port} is open between the hosts")
        time.sleep(0.5)
    node_ip = node_ip or route_source(head_host, head_port)
    if not is_local_address(node_ip):
        raise ClusterError(f"{node_ip} is not an address of this host", "pass one of this host's addresses to --address")
    head_state = read_state(settings)
    if head_state is not None and head_state.node_ip == node_ip and is_local_address(head_state.node_ip):
        raise ClusterError(f"this host ({node_ip}) is the cluster's head", "join from another host")
    path = _state_path(settings, node_ip)
    if os.path.isfile(path):
        raise ClusterError(f"this host ({node_ip}) already joined a lakeray cluster for {settings.storage_root}",
                           "`lakeray cluster down` on this host leaves it")
    token, token_source = _token_path(settings, token_file_flag)
    if spark and spark_master is None:
        # The head's state, when this host shares its storage root; the well-known port otherwise.
        spark_master = (head_state.spark_master_url if head_state is not None and head_state.ray_address == head
                        and head_state.spark_master_url else f"spark://{head_host}:{SPARK_PORT}")
    root = local_root(settings)
    state = JoinedHost(head_address=head, node_ip=node_ip, temp_dir=temp_dir_for(root, node_ip),
                       cpus=cpus or os.cpu_count() or 1, spark_master_url=spark_master if spark else None,
                       started_at=time.time(), log_dir=os.path.join(root, "cluster", "logs", node_ip))
    os.makedirs(state.log_dir, exist_ok=True)
    kill_ray_processes(state.temp_dir)  # leftovers of a crashed earlier join of this host
    env = ray_env(state.temp_dir)
    if token is not None:
        env["RAY_AUTH_TOKEN_PATH"] = token
    ray_log = os.path.join(state.log_dir, "ray-start.log")
    _check_token(head, env, token_source, ray_log, timeout_s=min(timeout_s, 60.0))  # before anything starts
    try:
        run_logged([bin_path("ray"), "start", "--address", head, "--node-ip-address", node_ip, *agent_port_args(),
                    "--num-cpus", str(state.cpus), "--temp-dir", state.temp_dir, "--disable-usage-stats"],
                   env, ray_log, timeout_s)
        if spark_master:
            master_host, _, master_port = spark_master.removeprefix("spark://").rpartition(":")
            if not answers(f"{master_host}:{master_port}", timeout_s=connect_timeout_s):
                raise ClusterError(f"the Spark master {spark_master} does not answer",
                                   "check --spark-master and that its port is open to this host, or join with --no-spark")
            log = os.path.join(state.log_dir, "spark-worker.log")
            cmd = spark_worker_command(spark_master, node_ip, spark_cores or os.cpu_count() or 1,
                                       spark_memory_mb or spark_worker_memory_mb(),
                                       os.path.join(state.log_dir, "spark-work"))
            state.spark_pids.append(start_jvm(cmd, spark_env(node_ip), log))
            _wait_registered(log, spark_master, timeout_s)
    except BaseException:
        _stop(state)  # nothing half-started is left running
        raise
    os.makedirs(_hosts_folder(settings), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(asdict(state), fh, indent=2)
    os.replace(path + ".tmp", path)
    return state


def _stop(state: JoinedHost) -> list[int]:
    return stop_groups(state.spark_pids) + kill_ray_processes(state.temp_dir)


def leave(settings: Settings) -> list[int]:
    """Stop what ``join`` started on this host (its head is left running); the pids stopped."""
    stopped = []
    for state in joined_here(settings):
        stopped += _stop(state)
        os.remove(_state_path(settings, state.node_ip))
    return stopped


def primary_address() -> str:
    """This host's address on its default route (a UDP connect to a documentation address sends
    nothing); ClusterError when it has none (then --address must say it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
            return sock.getsockname()[0]
        except OSError:
            raise ClusterError("this host has no default route to take its address from",
                               "pass the address other hosts reach it at with --address") from None
