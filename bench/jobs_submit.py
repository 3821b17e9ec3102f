"""Benchmark: `lakeray jobs submit` latency (submit → RUNNING) vs Ray's own JobSubmissionClient.

Method (one process, both sides against the same `lakeray cluster up` cluster in the same run):
  1. A small project (lakeray.yaml + a script that sleeps 2 s) in a temp folder, its own storage root;
     `lakeray.cluster.local_cluster.up` starts a Ray head (no Spark, no worker nodes): ``cluster_up_s``.
  2. One warm-up job per side (the head's job agent registers, the working dir package is uploaded once:
     both sides upload the same folder, so later submissions of both find it in the cluster).
  3. ``--repeats`` rounds, alternating sides. Candidate: ``lakeray.cluster.jobs.submit`` (address from
     the state file, bounded probe, git metadata, the upload plan, the submit request with lakeray's
     runtime env and metadata), then polling the job's state every 50 ms with one shared client until
     RUNNING (or ended). Baseline: ``JobSubmissionClient.submit_job`` with the same entrypoint and
     ``working_dir``, polled the same way.
  4. ``ratio`` = median candidate / median baseline (target ≤ 1.3: what lakeray adds to a submission is
     small next to starting the job's driver); ``candidate_s`` / ``baseline_s`` are the medians in
     seconds, ``submit_call_s`` the median of lakeray's submit call alone.

Prints ``jobs_submit: ratio X.XX (target 1.3)`` last and writes bench/results/jobs_submit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine  # noqa: E402  (bench/ is not a package)
from proctree import BUSY_SHARE, OtherLoad  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.3
SCRIPT = "import time\ntime.sleep(2)\n"


def _until_running(state_of, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state_of() in ("RUNNING", "SUCCEEDED", "FAILED", "STOPPED"):
            return
        time.sleep(0.05)
    raise SystemExit("a job did not start within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench/results/jobs_submit.json"))
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    project, root = base / "project", base / "lakehouse"
    project.mkdir()
    shutil.copy(REPO / "lakeray.yaml", project / "lakeray.yaml")
    (project / "noop.py").write_text(SCRIPT)
    from lakeray.cluster import jobs, local_cluster
    from lakeray.config import load_settings

    settings = load_settings(project / "lakeray.yaml", "local", environ={"LAKERAY_STORAGE__ROOT": str(root)})
    os.chdir(project)  # a job names paths relative to the project folder
    load = OtherLoad()
    started = time.perf_counter()
    local_cluster.up(settings, workers=0, head_cpus=2, spark=False)
    cluster_up_s = time.perf_counter() - started
    try:
        target = jobs.resolve_target(settings)
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(target.address, headers=dict(target.headers))
        renv = {"working_dir": str(project)}

        def candidate() -> tuple[float, float]:
            t0 = time.perf_counter()
            done = jobs.submit(settings, ["python", "noop.py"])
            call = time.perf_counter() - t0
            _until_running(lambda: str(client.get_job_status(done.job_id).value))  # polled as the baseline is
            return time.perf_counter() - t0, call

        def baseline() -> float:
            t0 = time.perf_counter()
            job_id = client.submit_job(entrypoint="python noop.py", runtime_env=renv)
            _until_running(lambda: str(client.get_job_status(job_id).value))
            return time.perf_counter() - t0

        candidate()  # warm-up (waits for the job agent, uploads the package)
        baseline()
        cand, calls, base_s = [], [], []
        for _ in range(args.repeats):
            took, call = candidate()
            cand.append(took)
            calls.append(call)
            base_s.append(baseline())
            time.sleep(2.5)  # the previous jobs end: each round starts on an idle head
    finally:
        local_cluster.down(settings)
        shutil.rmtree(base, ignore_errors=True)
    other = load.share()
    ratio = statistics.median(cand) / statistics.median(base_s)
    result = {"name": "jobs_submit", "ratio": round(ratio, 3), "target": TARGET,
              "candidate_s": round(statistics.median(cand), 3), "baseline_s": round(statistics.median(base_s), 3),
              "submit_call_s": round(statistics.median(calls), 3), "cluster_up_s": round(cluster_up_s, 1),
              "candidate_runs_s": [round(v, 3) for v in cand], "baseline_runs_s": [round(v, 3) for v in base_s],
              "params": {"repeats": args.repeats, "workers": 0, "head_cpus": 2},
              "other_load_share": other, "machine": machine()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if other > BUSY_SHARE:
        print(f"WARNING: other processes used {other:.0%} of the machine's CPU during the run")
    print(f"jobs_submit: ratio {ratio:.2f} (target {TARGET})")
    sys.exit(0 if ratio <= TARGET else 1)


if __name__ == "__main__":
    main()
