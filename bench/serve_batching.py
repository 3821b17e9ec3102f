"""Benchmark: lakeray's @serve.batch scoring vs max_batch_size 1, same model and replicas, at 64 connections.

Method (one run, one Ray, one Serve with HAProxy ingress as lakeray ships it):
  Three apps of the same registered XGBoost model (30 features), each one replica of 0.5 CPU with the
  prediction log on, deployed with ``lakeray.serving.deploy.deploy``:
    - ``batch``: the shipped batching (max_batch_size 64, wait_timeout_ms as the spec's default, 0:
      a batch is whatever queued while the previous predict ran);
    - ``batch-wait``: max_batch_size 64, wait_timeout_ms 2 (the default before this benchmark);
    - ``nobatch``: max_batch_size 1 (the baseline; measured before and after, the better counts).
  Each: requests/s and p99 at c=64 after a warm-up, p50 at c=1 for the batching apps (what the wait
  costs an idle endpoint); the batch sizes each replica reached come from its ``/healthz``.

Prints ``serve_batching: ratio X (target 1.5)`` last; writes bench/results/serve_batching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine  # noqa: E402  (bench/ is not a package)
from proctree import BUSY_SHARE, OtherLoad  # noqa: E402
from servelib import (REPO, batch_sizes, bench_ray, bench_settings, deploy_spec, healthz, measure,  # noqa: E402
                      register_model, request_body, serve_spec)

TARGET = 1.5  # batching req/s ÷ no-batching req/s at c=64, at least
WAIT_MS = 2.0  # the batch wait compared with the shipped one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="Measured seconds per load run.")
    parser.add_argument("--out", default=str(REPO / "bench/results/serve_batching.json"))
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    other_load = OtherLoad()
    started = time.perf_counter()

    from lakeray.serving.spec import Batching

    default_wait_ms = Batching().wait_timeout_ms
    apps = {"batch": {"max_batch_size": 64}, "batch-wait": {"max_batch_size": 64, "wait_timeout_ms": WAIT_MS},
            "nobatch": {"max_batch_size": 1}}
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lakeray-bench-serve-") as root:
        settings = bench_settings(root)
        model = register_model(settings)
        body = request_body(model["features"])
        with bench_ray(settings) as handle:
            urls = {}
            for name, batching in apps.items():
                urls[name] = deploy_spec(settings, serve_spec(f"bench-{name}", f"/{name}", **batching)).url
            for name in ["nobatch", "batch", "batch-wait", "nobatch"]:
                before = healthz(urls[name])
                run = measure(f"{urls[name]}/predict", body, 64, args.seconds, warmup_s=2.0).as_dict()
                figures.setdefault(name, {}).setdefault("c64", []).append(run)
                # The batches of this run (and its warm-up) only, not the c=1 runs below.
                figures[name]["batch_sizes"] = batch_sizes(before, healthz(urls[name]))
                print(f"{name} c=64: {run['rps']:.0f} req/s, p99 {run['p99_ms']:.1f} ms, errors {run['errors']}",
                      flush=True)
            for name in ["batch", "batch-wait"]:
                run = measure(f"{urls[name]}/predict", body, 1, args.seconds, warmup_s=1.0).as_dict()
                figures[name]["c1"] = run
                print(f"{name} c=1: p50 {run['p50_ms']:.2f} ms", flush=True)
            fast_proxy = handle.fast_proxy

    def best_rps(name: str) -> float:
        return max(r["rps"] for r in figures[name]["c64"])

    baseline_rps, candidate_rps, wait_rps = best_rps("nobatch"), best_rps("batch"), best_rps("batch-wait")
    ratio = candidate_rps / baseline_rps
    other_share = other_load.share()
    runs = [r for f in figures.values() for r in [*f["c64"], *([f["c1"]] if "c1" in f else [])]]
    during = max((r["other_cpu_share"] for r in runs if r.get("other_cpu_share") is not None), default=other_share)
    busy = during > BUSY_SHARE
    errors = sum(r["errors"] for f in figures.values() for r in f["c64"])
    sizes = figures["batch"]["batch_sizes"]
    notes = [
        f"at c=64 the batching replica scored {sizes['mean']:.1f} requests per predict on average (largest "
        f"{sizes['max']}); without batching every request pays its own predict call and event-loop turn.",
        f"wait_timeout_ms {default_wait_ms:g} vs {WAIT_MS:g}: {candidate_rps:.0f} vs {wait_rps:.0f} req/s at c=64, "
        f"p50 at c=1 {figures['batch']['c1']['p50_ms']:.2f} vs {figures['batch-wait']['c1']['p50_ms']:.2f} ms: an idle "
        "endpoint pays the wait on every request, a busy one fills batches from what queued during the "
        "previous predict.",
    ]
    result = {
        "name": "serve_batching",
        "ratio": round(ratio, 3),
        "target": TARGET,
        "candidate_rps": round(candidate_rps, 1),
        "baseline_rps": round(baseline_rps, 1),
        "candidate_s": round(1 / candidate_rps, 6),  # seconds per request at c=64
        "baseline_s": round(1 / baseline_rps, 6),
        "wait_ratio": round(wait_rps / baseline_rps, 3),
        "wait_ms_compared": WAIT_MS,
        "batch_sizes": sizes,
        "batch_sizes_wait": figures["batch-wait"]["batch_sizes"],
        "errors": errors,
        "runs": figures,
        "fast_proxy": fast_proxy,
        "notes": notes,
        "params": {"features": len(model["features"]), "model": f"xgboost {model['rounds']} rounds depth 6",
                   "concurrency": 64, "seconds_per_run": args.seconds, "replicas": "1 x 0.5 CPU per app",
                   "batching": f"max_batch_size 64, wait_timeout_ms {default_wait_ms:g} (spec default)",
                   "baseline": "max_batch_size 1", "prediction_log": True,
                   "load_tool": figures["batch"]["c64"][0]["tool"]},
        "machine": dict(machine(), load_avg_1m_at_start=round(load_start, 2), other_processes_cpu_share=other_share,
                        other_share_during_runs_max=during, busy=busy),
        "wall_s": round(time.perf_counter() - started, 1),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for note in notes:
        print(f"- {note}")
    print(f"written: {args.out} ({result['wall_s']:.0f} s)")
    if errors:
        print(f"WARNING: {errors} requests failed under load")
    if busy:
        print(f"WARNING: other processes used up to {during:.0%} of the machine's CPU during a measured run; "
              "re-run on an idle machine before trusting the ratio")
    if ratio < TARGET:
        print(f"MISSED: ratio {ratio:.2f} is below the target {TARGET}")
    print(f"serve_batching: ratio {ratio:.2f} (target {TARGET})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
