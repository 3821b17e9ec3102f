"""Several hosts: `lakeray cluster up --head` on one host, `lakeray cluster join` on another, each host a
network namespace of this machine (a veth pair, 10.77.x.1/24 and 10.77.x.2/24 only inside them).

Shown from Spark's and Ray's own node lists: both hosts joined; a Spark job's tasks and a 2-worker Ray
Train run spread over both; the worker host cut off mid-run (its link down) → Ray Train restarts from its
checkpoint on the head, within a bounded time; `down` on each host stops only what that host started;
a wrong token (a join, a lakeray command) is one error naming where the token came from.

Test simplifications: both hosts share this machine's filesystem, so they share the storage root (and
the head's token through it, `up --head --share-token`) and the Ray Train storage path; their hostname is
the machine's (Ray and Spark are given the namespace's address explicitly).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from lakeray.cluster.netns import commands_of, make_pair, net_of, pids_in, sh
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LAKERAY = os.path.join(os.path.dirname(sys.executable), "lakeray")
SUBNET = 70 + os.getpid() % 20  # 10.77.<n>.0/24 ... kept inside the namespaces; per run, in case one lingers
HEAD_IP, WORKER_IP = f"10.77.{SUBNET}.1", f"10.77.{SUBNET}.2"
TAG = f"lr{os.getpid() % 100000}"
HEAD_NS, WORKER_NS, WORKER_LINK = f"{TAG}h", f"{TAG}w", f"{TAG}w0"  # netns.make_pair's names for TAG
# GCS declares a silent node dead after 3 missed 1 s checks (Ray's default: 5 missed 3 s checks plus
# a 10 s timeout); read by the head's GCS, so it is set for the head's `up` only.
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                     "RAY_health_check_failure_threshold": "3"}


def _described(pids: list[int]) -> list[str]:
    return [f"{pid} {command[:200]}" for pid, command in commands_of(pids).items()]


def _in(ns: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _lakeray(ns: str, root, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return _in(ns, LAKERAY, "--config", str(REPO / "lakeray.yaml"), "cluster", *args,
               env={"LAKERAY_STORAGE__ROOT": str(root), **(env or {})}, timeout=timeout)


def _python(ns: str, code: str, env: dict[str, str], timeout: float = 300) -> dict:
    done = _in(ns, sys.executable, "-c", textwrap.dedent(code), env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two hosts as network namespaces joined by a veth pair; removed (and whatever runs in them
    stopped) even when the test fails."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.fail("the multi-host test makes network namespaces: it needs root and iproute2's `ip`")
    root = tmp_path_factory.mktemp("multihost") / "lakehouse"
    pair = make_pair(TAG, HEAD_IP, WORKER_IP)
    try:
        yield root
    finally:
        for ns in (WORKER_NS, HEAD_NS):
            try:
                _lakeray(ns, root, "down", timeout=120)
            except (subprocess.TimeoutExpired, OSError):
                pass
        pair.stop_leftovers()  # anything still running in a host is this test's: it must not outlive it
        pair.remove()


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory):
    """`up --head` in the head namespace, `join` in the worker's; the head's token (a file of its own,
    not ~/.ray/auth_token) reaches the worker only through the shared storage root."""
    root = hosts
    token = tmp_path_factory.mktemp("token") / "head_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    started = time.monotonic()
    up = _lakeray(HEAD_NS, root, "up", "--head", "--address", HEAD_IP, "--head-cpus", "2", "--share-token",
                  env={"RAY_AUTH_TOKEN_PATH": str(token), **FAST_HEALTH_CHECK})
    assert up.returncode == 0, up.stderr[-3000:] + up.stdout[-2000:]
    assert f"lakeray cluster join {HEAD_IP}:6379" in up.stdout
    assert token.read_text() not in up.stdout + up.stderr  # never printed
    up_s = time.monotonic() - started
    joined = _lakeray(WORKER_NS, root, "join", HEAD_IP, "--cpus", "1", "--spark-cores", "1",
                      "--spark-memory-mb", "1024")
    assert joined.returncode == 0, joined.stderr[-3000:] + joined.stdout[-2000:]
    assert token.read_text() not in joined.stdout + joined.stderr
    print(f"up --head {up_s:.1f} s, join {time.monotonic() - started - up_s:.1f} s")
    return root, token


def test_both_hosts_in_rays_and_sparks_node_lists(cluster):
    root, _ = cluster
    # Asked from the worker host: it reaches the head (and its token through the storage root).
    shown = _lakeray(WORKER_NS, root, "status", "--json")
    assert shown.returncode == 0, shown.stderr[-3000:]
    info = json.loads(shown.stdout)
    assert sorted((n["address"], n["head"]) for n in info["nodes"]) == [(HEAD_IP, True), (WORKER_IP, False)]
    assert info["cpus"] == 3
    # Spark's own list, from the master's JSON at the head's :8080.
    master = _python(HEAD_NS, f"""
        import httpx, json
        print(json.dumps(httpx.get("http://{HEAD_IP}:8080/json/", timeout=10).json()))
        """, env={})
    assert sorted((w["host"], w["state"]) for w in master["workers"]) == [(HEAD_IP, "ALIVE"), (WORKER_IP, "ALIVE")]


def test_a_spark_jobs_tasks_run_on_both_hosts(cluster):
    # A driver on the head host; one 1-core executor per host (the standalone master spreads them).
    got = _python(HEAD_NS, f"""
        import json, os, urllib.request
        from pyspark.sql import SparkSession

        spark = (SparkSession.builder.master("spark://{HEAD_IP}:7077").appName("multi-host")
                 .config("spark.driver.host", "{HEAD_IP}").config("spark.driver.bindAddress", "{HEAD_IP}")
                 .config("spark.executor.memory", "512m").config("spark.executor.cores", "1")
                 .config("spark.cores.max", "2").config("spark.scheduler.minRegisteredResourcesRatio", "1.0")
                 .config("spark.scheduler.maxRegisteredResourcesWaitingTime", "120s").getOrCreate())
        sc = spark.sparkContext

        def where(rows):
            yield os.readlink("/proc/self/ns/net"), sum(1 for _ in rows)

        parts = sc.parallelize(range(400), 4).mapPartitions(where).collect()
        api = f"{{sc.uiWebUrl}}/api/v1/applications/{{sc.applicationId}}"
        stage = json.load(urllib.request.urlopen(f"{{api}}/stages"))[0]["stageId"]
        tasks = json.load(urllib.request.urlopen(f"{{api}}/stages/{{stage}}/0/taskList"))
        print(json.dumps({{"parts": parts, "task_hosts": [t["host"] for t in tasks]}}))
        spark.stop()
        """, env={"SPARK_LOCAL_IP": HEAD_IP, "PYSPARK_PYTHON": sys.executable}, timeout=240)
    # Spark's own record: the 4 tasks ran on executors of both hosts ...
    assert len(got["task_hosts"]) == 4 and set(got["task_hosts"]) == {HEAD_IP, WORKER_IP}
    # ... and the Python workers that ran them were in both hosts' network namespaces.
    assert {net for net, _ in got["parts"]} == {net_of(HEAD_NS), net_of(WORKER_NS)}
    assert sum(rows for _, rows in got["parts"]) == 400


def test_a_token_that_is_not_the_heads_is_one_error_naming_its_source(cluster, tmp_path):
    """From the worker host (before its link is cut): a join, and a lakeray command, with a wrong token."""
    root, _ = cluster
    wrong = tmp_path / "wrong_token"
    wrong.write_text(os.urandom(32).hex())
    # Another storage root: this host has no record of joining there, so only the token can stop it.
    refused = _lakeray(WORKER_NS, tmp_path / "other-root", "join", HEAD_IP, "--no-spark", "--token-file", str(wrong),
                       timeout=120)
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-2000:]
    headline = refused.stderr.splitlines()[0]  # one line, then the fix
    assert headline.endswith(f"the head at {HEAD_IP}:6379 refused this host's Ray token (from --token-file {wrong}): "
                             "it is not the head's"), refused.stderr
    assert wrong.read_text() not in refused.stdout + refused.stderr
    # Nothing started: no process with the Ray temp dir this join would have had, no record.
    from lakeray.cluster.local_cluster import temp_dir_for

    would_be = temp_dir_for(str(tmp_path / "other-root"), WORKER_IP)
    assert not [d for d in _described(pids_in(net_of(WORKER_NS))) if would_be in d]
    assert not (tmp_path / "other-root" / "cluster" / "hosts").exists()
    shown = _lakeray(WORKER_NS, root, "status", env={"RAY_AUTH_TOKEN_PATH": str(wrong)}, timeout=120)
    assert shown.returncode == 1
    assert (f"the Ray cluster at {HEAD_IP}:6379 refused this host's token (RAY_AUTH_TOKEN_PATH={wrong})"
            in shown.stderr), shown.stderr[-2000:]


# The cut comes 3 epochs in and the restart resumes from a checkpoint at 2 or later: 20 epochs leave the
# run well past both (40 only cost ~10 s more of 0.3 s epochs).
EPOCHS = 20
TRAIN = """
    import json, os, sys, tempfile, time
    from lakeray.cluster.ray_runtime import start_ray
    from lakeray.config import load_settings

    settings = load_settings({config!r}, "local", environ={{"LAKERAY_STORAGE__ROOT": {root!r}}})
    handle = start_ray(settings)  # finds the head through the storage root's cluster state
    import ray, ray.train
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    def loop(config):
        context = ray.train.get_context()
        start = 0
        if ray.train.get_checkpoint():
            with ray.train.get_checkpoint().as_directory() as folder:
                start = json.load(open(os.path.join(folder, "state.json")))["epoch"] + 1
        ip = ray.util.get_node_ip_address()
        for epoch in range(start, {epochs}):
            time.sleep(0.3)
            with open(f"{{config['marks']}}.{{context.get_world_rank()}}", "a") as fh:
                fh.write(json.dumps({{"epoch": epoch, "ip": ip, "start": start, "t": time.time()}}) + "\\n")
            with tempfile.TemporaryDirectory() as folder:
                json.dump({{"epoch": epoch}}, open(os.path.join(folder, "state.json"), "w"))
                ray.train.report({{"epoch": epoch, "ip": ip}},
                                 checkpoint=Checkpoint.from_directory(folder) if context.get_world_rank() == 0 else None)

    trainer = DataParallelTrainer(loop, train_loop_config={{"marks": {marks!r}}},
        scaling_config=ScalingConfig(num_workers=2, placement_strategy="SPREAD"),
        run_config=RunConfig(name="multi-host", storage_path={storage!r},
                             failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    nodes = {{n["NodeManagerAddress"]: n["Alive"] for n in ray.nodes()}}
    print(json.dumps({{"epoch": result.metrics["epoch"], "error": repr(result.error), "nodes": nodes}}))
    handle.shutdown()
"""


def _marks(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_training_spreads_over_both_hosts_and_fails_over_when_the_worker_host_is_cut_off(cluster, tmp_path):
    root, _ = cluster
    marks = str(tmp_path / "marks")
    code = textwrap.dedent(TRAIN).format(config=str(REPO / "lakeray.yaml"), root=str(root), marks=marks,
                                         storage=str(tmp_path / "train"), epochs=EPOCHS)
    driver = subprocess.Popen(["ip", "netns", "exec", HEAD_NS, sys.executable, "-c", code],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(_marks(marks + ".1")) < 3:  # rank 1 is 3 epochs in
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            time.sleep(0.2)
        before = _marks(marks + ".0") + _marks(marks + ".1")
        # Before the cut: one worker per host (SPREAD), a fresh start.
        assert {m["ip"] for m in before} == {HEAD_IP, WORKER_IP} and {m["start"] for m in before} == {0}
        cut_at = time.time()
        sh("ip", "-n", WORKER_NS, "link", "set", WORKER_LINK, "down")  # the worker host is cut off
        out, err = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["epoch"] == EPOCHS - 1 and result["error"] == "None"
    assert result["nodes"] == {HEAD_IP: True, WORKER_IP: False}  # Ray's own list: the worker host is dead
    after = [m for m in _marks(marks + ".0") + _marks(marks + ".1") if m["t"] > cut_at and m["start"] > 0]
    # Ray Train restarted both workers on the head, from the last checkpoint (not from epoch 0) ...
    assert after and {m["ip"] for m in after} == {HEAD_IP}
    assert min(m["start"] for m in after) >= 2
    # ... within a bounded time of the cut (failure detection + a new worker group).
    resumed_s = min(m["t"] for m in after) - cut_at
    print(f"resumed on the head {resumed_s:.1f} s after the cut")
    assert resumed_s < 150


def test_down_on_each_host_stops_only_what_it_started(cluster):
    root, _ = cluster
    head_net, worker_net = net_of(HEAD_NS), net_of(WORKER_NS)
    head_state = json.loads((root / "cluster" / "state.json").read_text())
    assert pids_in(worker_net), "the cut-off worker host's processes should still run until its `down`"
    left = _lakeray(WORKER_NS, root, "down", timeout=120)
    assert left.returncode == 0 and "stopped" in left.stdout, left.stderr[-2000:]
    assert _described(pids_in(worker_net)) == []
    assert not list((root / "cluster" / "hosts").iterdir())
    # The head's processes (same /proc, same /tmp, same storage root) were not touched.
    head_pids = set(pids_in(head_net))
    assert set(head_state["spark_pids"]) <= head_pids
    assert any(b"gcs_server" in open(f"/proc/{pid}/cmdline", "rb").read() for pid in head_pids)
    assert (root / "cluster" / "state.json").exists()
    stopped = _lakeray(HEAD_NS, root, "down", timeout=120)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr[-2000:]
    assert _described(pids_in(head_net)) == []
    assert not (root / "cluster" / "state.json").exists() and not (root / "cluster" / "auth_token").exists()


def test_joining_a_head_that_does_not_answer_fails_fast_and_starts_nothing(hosts):
    root = hosts
    started = time.monotonic()
    refused = _lakeray(WORKER_NS, root, "join", f"{HEAD_IP}:6390", "--timeout", "3", timeout=60)
    assert refused.returncode == 1
    assert f"the head at {HEAD_IP}:6390 does not answer" in refused.stderr
    assert time.monotonic() - started < 30
    assert _described(pids_in(net_of(WORKER_NS))) == []
    assert not (root / "cluster" / "hosts").exists() or not list((root / "cluster" / "hosts").iterdir())


def test_a_head_on_a_taken_port_or_a_foreign_address_is_refused_before_anything_starts(hosts):
    root = hosts
    holder = subprocess.Popen(["ip", "netns", "exec", HEAD_NS, sys.executable, "-c", (
        "import socket, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"  # past TIME_WAITs
        f"s.bind(({HEAD_IP!r}, 7077)); s.listen(); print('ready', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        taken = _lakeray(HEAD_NS, root, "up", "--head", "--address", HEAD_IP, timeout=120)
        assert taken.returncode == 1 and f"port 7077 on {HEAD_IP} is already taken (--spark-port)" in taken.stderr
    finally:
        holder.kill()
        holder.wait(timeout=30)
    foreign = _lakeray(HEAD_NS, root, "up", "--head", "--address", WORKER_IP, timeout=120)
    assert foreign.returncode == 1 and f"{WORKER_IP} is not an address of this host" in foreign.stderr
    assert _described(pids_in(net_of(HEAD_NS))) == []
    assert not (root / "cluster" / "state.json").exists()
