"""`make demo-cluster`: the `cluster-local` profile end to end on this one machine.

Two hosts made as network namespaces (head 10.78.0.1, worker 10.78.0.2, a veth pair; addresses exist only
inside them), S3Proxy as the bucket on the head's address, `lakeray cluster up --head` on the head and
`lakeray cluster join` on the worker, then `lakeray demo --profile cluster-local` on the head host: the
feature job and the training set on the cluster's Spark master, a 2-worker training run placed one worker
per host, Serve deploy and predictions. Prints the demo's summary and where each stage ran (from Spark's
and Ray's own lists), then tears everything down — on success, failure and Ctrl-C — and checks by pid
that nothing it started is left.

Needs root and iproute2 (`ip netns`). The namespaces' addresses are fixed (the profile names them); the
namespace names carry this process's pid, so a second demo on the same machine does not collide.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["main"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
LAKERAY = os.path.join(BIN, "lakeray")
HEAD_IP, WORKER_IP = "10.78.0.1", "10.78.0.2"  # also in lakeray.yaml's cluster-local profile
S3_PORT, BUCKET = 9000, "lakeray-demo"
PROFILE = "cluster-local"
TAG = f"lrdc{os.getpid() % 100000}"
HEAD_NS, WORKER_NS = f"{TAG}h", f"{TAG}w"  # lakeray.cluster.netns.make_pair's names for TAG


def _say(text: str) -> None:
    print(f"[demo-cluster] {text}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    from lakeray.cluster.processes import alive

    return alive(pid)


class Demo:
    def __init__(self, work: str, rows: int, keep_work: bool) -> None:
        self.work, self.rows, self.keep_work = work, rows, keep_work
        self.hosts_made = None  # lakeray.cluster.netns.HostPair once the namespaces exist
        self.s3_pid: int | None = None
        key, secret = "lakeray-" + secrets.token_hex(4), secrets.token_hex(16)
        token = os.path.join(work, "ray_token")
        with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w", encoding="utf-8") as fh:
            fh.write(secrets.token_hex(32))
        # The caller's lakeray/Ray/AWS/MLflow settings and the Makefile's SPARK_LOCAL_IP=127.0.0.1 must not
        # reach the hosts: each host's processes bind to that host's own address.
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("LAKERAY_", "RAY_", "AWS_", "MLFLOW_")) and k != "SPARK_LOCAL_IP"}
        self.env = {**base, "LAKERAY_CONFIG": os.path.join(REPO, "lakeray.yaml"), "LAKERAY_PROFILE": PROFILE,
                    "DEMO_CLUSTER_S3_KEY": key, "DEMO_CLUSTER_S3_SECRET": secret,
                    "RAY_AUTH_TOKEN_PATH": token, "PYSPARK_PYTHON": sys.executable,
                    "PATH": f"{BIN}:{base.get('PATH', '')}"}
        # `cluster up/join` keep their state (and the shared token) in a local folder both hosts see.
        self.cluster_env = {**self.env, "LAKERAY_STORAGE__ROOT": os.path.join(work, "cluster-root")}
        self.demo_env = {**self.env, "RAY_AUTH_MODE": "token", "SPARK_LOCAL_IP": HEAD_IP,
                         "LAKERAY_MLFLOW__TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
        self.timings: dict[str, float] = {}
        self.spark_hosts: set[str] = set()
        self._polling = threading.Event()

    # -- run ------------------------------------------------------------------------------------------
    def _in(self, ns: str, *args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        done = subprocess.run(["ip", "netns", "exec", ns, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:4])} … in {ns} exited {done.returncode}:\n"
                               f"{done.stderr[-3000:]}{done.stdout[-1500:]}")
        return done

    def hosts(self) -> None:
        from lakeray.cluster.netns import make_pair

        self.hosts_made = make_pair(TAG, HEAD_IP, WORKER_IP)

    def bucket(self) -> None:
        code = (f"import json; from lakeray.cluster.object_store import start_s3proxy; "
                f"s = start_s3proxy({os.path.join(self.work, 's3proxy')!r}, port={S3_PORT}, buckets=({BUCKET!r},), "
                f"access_key={self.env['DEMO_CLUSTER_S3_KEY']!r}, secret_key={self.env['DEMO_CLUSTER_S3_SECRET']!r}, "
                f"host={HEAD_IP!r}); print(json.dumps({{'pid': s.pid, 'endpoint': s.endpoint}}))")
        # The JVM runs in its own session, so it outlives this helper; its pid is recorded for teardown.
        got = json.loads(self._in(HEAD_NS, sys.executable, "-c", code, env=self.env, timeout=120)
                         .stdout.strip().splitlines()[-1])
        self.s3_pid = got["pid"]
        _say(f"S3Proxy at {got['endpoint']} (pid {self.s3_pid}), bucket {BUCKET}")

    def cluster(self) -> None:
        started = time.monotonic()
        self._in(HEAD_NS, LAKERAY, "cluster", "up", "--head", "--address", HEAD_IP, "--head-cpus", "2",
                 "--share-token", env=self.cluster_env, timeout=400)
        self.timings["cluster up --head"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        self._in(WORKER_NS, LAKERAY, "cluster", "join", HEAD_IP, "--cpus", "2", "--spark-cores", "1",
                 "--spark-memory-mb", "1024", env=self.cluster_env, timeout=400)
        self.timings["cluster join"] = round(time.monotonic() - started, 1)
        _say(f"cluster up --head {self.timings['cluster up --head']} s, join {self.timings['cluster join']} s")

    def demo(self) -> dict:
        # This process stays in the root namespace; a thread samples the master from the head's side.
        poller = threading.Thread(target=self._in_head_ns_poll, daemon=True)
        poller.start()
        try:
            # The demo's progress lines (its stderr) go straight to the terminal; stdout is its JSON.
            done = subprocess.run(["ip", "netns", "exec", HEAD_NS, LAKERAY, "demo", "--json", "--rows", str(self.rows),
                                   "--train-workers", "2", "--train-cpus", "2"], env=self.demo_env,
                                  stdout=subprocess.PIPE, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"lakeray demo on the head host exited {done.returncode} (its error is above)")
        finally:
            self._polling.set()
            poller.join(10)
        with open(os.path.join(self.work, "demo.json"), "w", encoding="utf-8") as fh:
            fh.write(done.stdout)  # kept with the logs should a later step fail
        return json.loads(done.stdout.strip().splitlines()[-1])

    def _in_head_ns_poll(self) -> None:
        # The master listens on the head's namespace address only: poll through a helper in that namespace.
        code = ("import httpx, json, sys, time\n"
                "seen = set()\n"
                "while sys.stdin.readline():\n"
                "    try:\n"
                f"        ws = httpx.get('http://{HEAD_IP}:8080/json/', timeout=5).json()['workers']\n"
                "        seen |= {w['host'] for w in ws if w.get('coresused', 0) > 0}\n"
                "    except Exception:\n"
                "        pass\n"
                "    print(json.dumps(sorted(seen)), flush=True)\n")
        helper = subprocess.Popen(["ip", "netns", "exec", HEAD_NS, sys.executable, "-c", code], env=self.env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            while not self._polling.wait(1.0):
                helper.stdin.write("x\n")
                helper.stdin.flush()
                self.spark_hosts |= set(json.loads(helper.stdout.readline() or "[]"))
        finally:
            helper.stdin.close()
            helper.wait(15)

    def ray_placement(self) -> dict:
        """Ray's own records: the node of every training worker and Serve replica this run started."""
        code = f"""
import json, httpx
token = open({self.env['RAY_AUTH_TOKEN_PATH']!r}).read().strip()
h = {{"Authorization": f"Bearer {{token}}"}}
api = json.load(open({os.path.join(self.work, "cluster-root", "cluster", "state.json")!r}))["dashboard_url"] + "/api/v0"
nodes = {{n["node_id"]: n["node_ip"] for n in httpx.get(f"{{api}}/nodes?detail=1&limit=100", headers=h,
         timeout=30).json()["data"]["result"]["result"]}}
actors = httpx.get(f"{{api}}/actors?detail=1&limit=10000", headers=h, timeout=60).json()["data"]["result"]["result"]
out = {{"train": [], "serve": []}}
for a in actors:
    name = a.get("class_name") or ""
    if name == "RayTrainWorker":
        out["train"].append(nodes.get(a["node_id"], a["node_id"]))
    elif name.startswith("ServeReplica"):
        out["serve"].append(nodes.get(a["node_id"], a["node_id"]))
print(json.dumps(out))
"""
        return json.loads(self._in(HEAD_NS, sys.executable, "-c", code, env=self.env, timeout=120)
                          .stdout.strip().splitlines()[-1])

    # -- teardown -------------------------------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Stop everything; returns what was still running after it (must be empty)."""
        pair = self.hosts_made
        if pair is None:
            return []
        for ns in (WORKER_NS, HEAD_NS):
            try:
                subprocess.run(["ip", "netns", "exec", ns, LAKERAY, "cluster", "down"], env=self.cluster_env,
                               capture_output=True, timeout=180)
            except (subprocess.TimeoutExpired, OSError):
                pass
        if self.s3_pid:
            try:
                os.killpg(self.s3_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # 15 s for what `down` and the SIGTERM stopped to exit; whatever is left in a host is this demo's
        # (S3Proxy too) and is SIGKILLed.
        left = [str(pid) for pid in pair.stop_leftovers(grace_s=15)]
        if self.s3_pid and _alive(self.s3_pid):
            left.append(f"S3Proxy {self.s3_pid}")
        pair.remove()
        return left


def _summary(result: dict, where: dict[str, str], timings: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    from lakeray.cli.demo_cmd import _print_summary
    from lakeray.demo import DemoResult

    console = Console()
    _print_summary(console, DemoResult(**result))
    table = Table("stage", "seconds", "ran on", title="where each stage ran (cluster-local: 2 hosts)")
    for stage, seconds in result["stage_seconds"].items():
        table.add_row(stage, f"{seconds:.1f}", where.get(stage, ""))
    console.print(table)
    console.print(", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="transactions to generate [200000]")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder (logs, bucket) afterwards")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("demo-cluster makes network namespaces: run it as root with iproute2's `ip`", file=sys.stderr)
        return 2
    # SIGTERM tears down like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = tempfile.mkdtemp(prefix="lakeray-demo-cluster-")
    demo = Demo(work, args.rows, args.keep_work)
    started = time.monotonic()
    ok, code = False, 1
    try:
        _say(f"hosts: head {HEAD_NS} {HEAD_IP}, worker {WORKER_NS} {WORKER_IP}; work folder {work}")
        demo.hosts()
        demo.bucket()
        demo.cluster()
        t0 = time.monotonic()
        result = demo.demo()
        demo.timings["demo"] = round(time.monotonic() - t0, 1)
        placed = demo.ray_placement()
        spark = f"Spark master spark://{HEAD_IP}:7077, executors on {', '.join(sorted(demo.spark_hosts)) or '?'}"
        where = {"spark": f"driver on {HEAD_IP}; " + spark, "data": spark, "features": spark,
                 "training_set": spark, "ray": f"Ray head {HEAD_IP}:6379 (nodes {HEAD_IP}, {WORKER_IP})",
                 "train": "Ray Train workers on " + ", ".join(sorted(placed["train"])),
                 "serve": "Serve replica on " + ", ".join(sorted(placed["serve"])),
                 "predict": f"HTTP to the proxy on {HEAD_IP}:8000 (bucket s3://{BUCKET} at {HEAD_IP}:{S3_PORT})"}
        ok, code = True, 0
    except KeyboardInterrupt:
        _say("interrupted: tearing down")
        code = 130
    except Exception as exc:  # noqa: BLE001 - reported, then everything is torn down
        _say(f"FAILED: {exc}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        left = demo.teardown()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if left:
            _say(f"still running after teardown: {', '.join(left)}")
            code = code or 1
        else:
            _say("torn down: namespaces removed, S3Proxy and every process of both hosts stopped (checked by pid)")
        if ok and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            _say(f"logs kept in {work}")
    if ok:
        demo.timings["total"] = round(time.monotonic() - started, 1)
        if args.json:
            print(json.dumps({**result, "where": where, "cluster_timings": demo.timings,
                              "train_nodes": placed["train"], "serve_nodes": placed["serve"],
                              "spark_worker_hosts": sorted(demo.spark_hosts), "left_running": left}))
        else:
            _summary(result, where, demo.timings)
    return code


if __name__ == "__main__":
    sys.exit(main())
