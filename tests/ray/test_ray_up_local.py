"""`ray up` / `ray exec` / `ray down` with the Ray cluster launcher's `local` provider, running the shipped
cluster/local.yaml's own setup, start and teardown commands over SSH against two hosts: network
namespaces of this machine, each with an sshd (Debian's openssh-server, `make cluster-tools`).

Each host is a network namespace plus private mount and PID namespaces: its own /root (the SSH user's
home, where the launcher syncs the checkout and the YAML puts ~/lakeray-venv) and its own /tmp, so
`ray stop` and the Spark pid files see only that host, as on separate machines. The cluster has Ray's
token auth on (the YAML mounts the operator's token on every host) and runs a feature job submitted with
`lakeray jobs submit`, the issue's check that the launched head and worker do real work.

Test simplifications: the hosts share this machine's filesystem, so ~/lakeray-venv is this checkout's
.venv (already provisioned from requirements.lock, recorded as the YAML's lock marker) and the jar cache
is shared; the YAML's setup commands run for real and find Java, the venv and the lock in place.
`ray up` runs inside the head's namespace (the operator's machine is the head here).
"""

from __future__ import annotations

import json
import os
import shutil
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from lakeray import storage
from lakeray.cluster.netns import commands_of, make_pair, pids_in, wait_until
from lakeray.features.synthetic import generate_transactions
from lakeray.lakehouse.delta import write_table
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]

VENV = REPO / ".venv"
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
SUBNET = 50 + os.getpid() % 20  # 10.77.50-69.0/24: apart from test_multi_host's 70-89
HEAD_IP, WORKER_IP = f"10.77.{SUBNET}.1", f"10.77.{SUBNET}.2"
TAG = f"ru{os.getpid() % 100000}"
HEAD_NS, WORKER_NS = f"{TAG}h", f"{TAG}w"  # netns.make_pair's names for TAG
CLUSTER = f"lakeray-local-{TAG}"
# The worker's raylet exits once the GCS is gone (after `ray down` stops the head) after this many
# seconds (Ray's default 60); passed to every SSH session of both hosts.
SSH_ENV = {"RAY_gcs_rpc_server_reconnect_timeout_s": "10"}
# This machine's folders under /root that the hosts' own /root still shows: the jar cache, and the Python
# the venv was made from (pyenv's).
SHARED_IN_HOME = (".cache/lakeray", ".pyenv")
# What docs/cluster.md tells the operator to set for `ray up` with this provider: autoscaler v1 (ray up's
# default v2 does not launch the local provider's workers in Ray 2.60, see the docs).
UP_ENV = {"RAY_UP_enable_autoscaler_v2": "0", "RAY_USAGE_STATS_ENABLED": "0"}
DAEMONS = ("raylet", "gcs_server", "org.apache.spark.deploy")


def _daemons_in(net: str) -> list[str]:
    return [cmd[:160] for cmd in commands_of(pids_in(net)).values() if any(d in cmd for d in DAEMONS)]


def _host_home(base, key_pub: str, ip: str):
    """The SSH user's home for one host: authorized key, sshd config and host key, the venv."""
    home = base / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".ssh" / "authorized_keys").write_text(key_pub)
    (home / ".ssh" / "authorized_keys").chmod(0o600)
    (home / ".sshd").mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".sshd" / "host_key")],
                   check=True, capture_output=True, timeout=30)
    env_lines = "".join(f"SetEnv {k}={v}\n" for k, v in SSH_ENV.items())
    (home / ".sshd" / "sshd_config").write_text(
        f"ListenAddress {ip}\nPort 22\nHostKey /root/.sshd/host_key\nPidFile none\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nAuthorizedKeysFile /root/.ssh/authorized_keys\nStrictModes no\n"
        f"{env_lines}")
    # ~/lakeray-venv: this checkout's venv seen under the YAML's path (its scripts' shebangs name .venv),
    # with the lock marker the YAML's install step compares against.
    venv = home / "lakeray-venv"
    (venv / "bin").mkdir(parents=True)
    for name in os.listdir(VENV / "bin"):
        (venv / "bin" / name).symlink_to(VENV / "bin" / name)
    (venv / "lib").symlink_to(VENV / "lib")
    shutil.copy(VENV / "pyvenv.cfg", venv / "pyvenv.cfg")
    shutil.copy(REPO / "requirements.lock", venv / ".lakeray-lock")
    for shared in SHARED_IN_HOME:
        (home / shared).mkdir(parents=True)
    (base / "tmp").mkdir(mode=0o1777)
    return home


def _start_sshd(ns: str, base) -> subprocess.Popen:
    """sshd as PID 1 of the host's PID namespace: killing it ends everything started in that host."""
    home = base / "home"
    shared = "".join(f"mount --bind {os.path.expanduser('~/' + d)} {home}/{d}; " for d in SHARED_IN_HOME)
    # A checkout under /tmp (a CI clone) would vanish behind the host's own /tmp, and with it the venv
    # ~/lakeray-venv links to: show it at the same path inside that /tmp (rbind carries the sub-mount).
    if REPO.is_relative_to("/tmp"):
        inside = base / "tmp" / REPO.relative_to("/tmp")
        inside.mkdir(parents=True, exist_ok=True)
        shared += f"mount --bind {REPO} {inside}; "
    # Name resolution as on a private network with working DNS: no resolver is reachable from the
    # namespace, and every lookup the JVMs make (Spark resolves each executor's address) would wait out
    # resolv.conf's timeouts, ~6 s each; the hosts file names both hosts and the resolver fails at once.
    (base / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    (base / "hosts").write_text(f"127.0.0.1 localhost {socket.gethostname()}\n{HEAD_IP} lakeray-head\n"
                                f"{WORKER_IP} lakeray-worker-1\n")
    shared += f"mount --bind {base}/resolv.conf /etc/resolv.conf; mount --bind {base}/hosts /etc/hosts; "
    script = (f"set -e; {shared}mount --rbind {home} /root; "
              f"mount --rbind {base}/tmp /tmp; mkdir -p /run/sshd; "
              "exec /usr/sbin/sshd -D -e -f /root/.sshd/sshd_config")
    return subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--mount", "--pid", "--fork", "--mount-proc",
                             "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=open(base / "sshd.log", "wb"))


def _ray(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", HEAD_NS, RAY, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **UP_ENV})


@pytest.fixture
def shared_lakehouse():
    """A lakehouse every host sees at the same path (each host's /tmp is its own): /var/tmp here, an
    object store or a shared mount on real hosts."""
    folder = tempfile.mkdtemp(prefix="lakeray-rayup-", dir="/var/tmp")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _submit(lakehouse: str, command: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    """`lakeray jobs submit --wait` from the operator's machine (the head's network here) to the head's
    Jobs API; settings travel as LAKERAY_* (the Spark master comes from each host's ~/.lakeray-env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAKERAY_", "RAY_AUTH_", "RAY_ADDRESS"))}
    env.update({"LAKERAY_STORAGE__ROOT": lakehouse, "LAKERAY_PROFILE": "local",
                # the cluster has 4 cores: the profile's 8 shuffle partitions and 4g driver are for a laptop
                "LAKERAY_SPARK__SHUFFLE_PARTITIONS": "4", "LAKERAY_SPARK__DRIVER_MEMORY": "1g", **env_extra})
    return subprocess.run(["ip", "netns", "exec", HEAD_NS, str(VENV / "bin" / "lakeray"), "jobs", "submit",
                           "--address", f"http://{HEAD_IP}:8265", "--wait", "--", *command],
                          cwd=REPO, capture_output=True, text=True, timeout=420, env=env)


def _get_json(*urls: str) -> list:
    """GET URLs that only the hosts' network reaches (one interpreter start for all)."""
    done = subprocess.run(["ip", "netns", "exec", HEAD_NS, sys.executable, "-c",
                           "import httpx, json, sys; print(json.dumps([httpx.get(u, timeout=30).json() "
                           f"for u in {list(urls)!r}]))"],
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("this test makes network namespaces: it needs root and iproute2's `ip`")
    if not os.path.exists("/usr/sbin/sshd") or shutil.which("rsync") is None:
        subprocess.run(["make", "-C", str(REPO), "cluster-tools"], capture_output=True, timeout=600)
    assert os.path.exists("/usr/sbin/sshd") and shutil.which("rsync"), "`make cluster-tools` installs them"
    tmp = tmp_path_factory.mktemp("rayup")
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                   capture_output=True, timeout=30)
    sshds = []
    # Ray finds its node address from the route to a public address; none leaves the veth pair.
    pair = make_pair(TAG, HEAD_IP, WORKER_IP, default_route=True)
    nets = pair.nets
    try:
        for ns, ip in ((HEAD_NS, HEAD_IP), (WORKER_NS, WORKER_IP)):
            base = tmp / ns
            _host_home(base, key.with_suffix(".pub").read_text(), ip)
            sshds.append(_start_sshd(ns, base))
        config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
        config["cluster_name"] = CLUSTER
        config["provider"].update(head_ip=HEAD_IP, worker_ips=[WORKER_IP])
        config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
        # The operator's token (the YAML mounts ~/.ray/auth_token): this machine's own stays untouched.
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        config["file_mounts"]["~/.ray/auth_token"] = str(token)
        path = tmp / "local.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        yield path, nets, tmp, token
    finally:
        for proc in sshds:  # PID 1 of each host's namespace: its end takes the host's processes with it
            try:
                for child in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split():
                    os.kill(int(child), signal.SIGKILL)
            except OSError:
                pass
            proc.kill()
            proc.wait(timeout=30)
        pair.stop_leftovers()
        pair.remove()
        for leftover in (f"/tmp/cluster-{CLUSTER}.state", f"/tmp/cluster-{CLUSTER}.lock"):
            if os.path.exists(leftover):
                os.remove(leftover)


def test_ray_up_exec_down_with_the_local_provider(hosts, shared_lakehouse, spark):
    path, (head_net, worker_net), tmp, token = hosts
    # The feature job's input, written by the operator (the cluster's part is the feature job).
    lakehouse = shared_lakehouse
    write_table(generate_transactions(spark, 2000, 42), storage.join(lakehouse, "tables", "transactions"))
    started = time.monotonic()
    up = _ray("up", "-y", "--no-config-cache", str(path))
    up_s = time.monotonic() - started
    assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
    print(f"ray up (local provider, head only; the head's autoscaler adds the worker): {up_s:.1f} s")

    # The head's autoscaler brings the worker up over SSH from the head; both Ray nodes and both Spark
    # workers, as the head sees them.
    probe = ("python -c \"import json, ray, httpx; ray.init(address='auto', logging_level='ERROR'); "
             "print(json.dumps({'ray': sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']), "
             f"'spark': sorted(w['host'] for w in httpx.get('http://{HEAD_IP}:8080/json/').json()['workers'] "
             "if w['state'] == 'ALIVE')}))\"")
    both = {"ray": [HEAD_IP, WORKER_IP], "spark": [HEAD_IP, WORKER_IP]}
    seen = None

    def nodes_seen() -> bool:
        nonlocal seen
        shown = _ray("exec", str(path), probe, timeout=120)
        lines = [line for line in shown.stdout.splitlines() if line.startswith("{")]
        seen = json.loads(lines[-1]) if shown.returncode == 0 and lines else shown.stdout[-2000:]
        return seen == both

    wait_until(nodes_seen, 150, interval_s=3)  # each probe is an SSH session and a Python start
    print(f"both nodes in Ray and Spark {time.monotonic() - started:.1f} s after ray up began")
    assert seen == both, seen

    _feature_job_on_the_cluster(lakehouse, token)
    _token_is_required(lakehouse)

    down = _ray("down", "-y", str(path), timeout=120)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    wait_until(lambda: not _daemons_in(head_net) and not _daemons_in(worker_net), 60)
    assert _daemons_in(head_net) == [] and _daemons_in(worker_net) == [], (_daemons_in(head_net),
                                                                          _daemons_in(worker_net))


def _feature_job_on_the_cluster(lakehouse: str, token) -> None:
    """The issue's check: the launched head and worker run a feature job submitted with `lakeray jobs submit`:
    it succeeds, commits its Delta table, and ran as an application of the launched Spark master with an
    executor on each host."""
    begun = time.monotonic()
    done = _submit(lakehouse, ["lakeray", "features", "run", "customer_aggregates"],
                   RAY_AUTH_TOKEN_PATH=str(token))
    print(f"feature job submitted → SUCCEEDED: {time.monotonic() - begun:.1f} s")
    assert done.returncode == 0 and "SUCCEEDED" in done.stderr, done.stdout[-4000:] + done.stderr[-4000:]
    assert "customer_aggregates@0: 2000 rows from transactions@0" in done.stdout, done.stdout[-4000:]
    import deltalake

    table = deltalake.DeltaTable(storage.join(lakehouse, "tables", "customer_aggregates"))
    assert table.version() == 0 and table.to_pyarrow_table().num_rows == 2000

    master, *workers = _get_json(*(f"http://{ip}:{port}/json/"
                                   for ip, port in ((HEAD_IP, 8080), (HEAD_IP, 8081), (WORKER_IP, 8081))))
    apps = master["completedapps"]
    assert [app["name"] for app in apps] == ["lakeray"], apps
    app_id = apps[0]["id"]
    for ip, worker in zip((HEAD_IP, WORKER_IP), workers):  # each host's Spark worker ran one of its executors
        ran = [e for e in worker["finishedexecutors"] + worker["executors"] if e["appid"] == app_id]
        assert ran, (ip, worker)


def _token_is_required(lakehouse: str) -> None:
    """The YAML turns Ray's token auth on: a submission without the cluster's token is refused, one line."""
    refused = _submit(lakehouse, ["python", "-c", "print(1)"], RAY_AUTH_TOKEN_PATH="/nonexistent/auth_token")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "asks for a token" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    wrong = _submit(lakehouse, ["python", "-c", "print(1)"], RAY_AUTH_TOKEN=secrets.token_hex(32))
    assert wrong.returncode == 1 and "refused the token" in wrong.stderr, wrong.stdout + wrong.stderr
