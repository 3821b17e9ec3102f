"""Benchmark: lakeray's endpoint vs a plain FastAPI + uvicorn process vs default Ray Serve, over HTTP on loopback.

Method (one run, the same registered XGBoost model on 30 features, the same one-instance request):
  1. Train a booster and register it in the run's own MLflow store (bench/servelib.py).
  2. Plain baseline: one FastAPI + uvicorn process, the same scorer and request schema as a replica,
     no batching, no log. Measured before and after lakeray; the better figures count, so noise can
     only hurt lakeray.
  3. Default Serve: a minimal hand-written deployment in a private Ray with Serve's defaults (default
     HTTP proxy, 1 replica, max_ongoing_requests 5), then stopped.
  4. lakeray: ``deploy()`` of a ServeSpec with the shipped defaults (HAProxy ingress and throughput-
     optimised mode from the profile, @serve.batch 64, the Delta prediction log on), one replica.
  5. The same lakeray app without the prediction log, at 64 connections (what the log costs).
  Each server: p50/p99 at concurrency 1 and requests/s at 64 (wrk, or bench/loadgen.py's client),
  each after a warm-up run. Bounded: every run by time and request count, loopback only.

Where the time goes: the in-process cost of one request (schema validation, feature matrix, predict)
is timed without HTTP; the rest of a c=1 p50 is the server's HTTP path.

Prints ``serve_latency: p50 ratio X (target 2.0)`` last; writes bench/results/serve_latency.json.
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
from loadgen import wrk_path  # noqa: E402
from proctree import BUSY_SHARE, OtherLoad  # noqa: E402
from servelib import (REPO, batch_sizes, bench_ray, bench_settings, deploy_spec, healthz,  # noqa: E402
                      in_process_cost_ms, measure, register_model, request_body, serve_spec, start_default_serve,
                      start_plain)

P50_TARGET = 2.0  # lakeray p50 / plain p50 at c=1, at most
THROUGHPUT_TARGET = 1.2  # lakeray req/s / plain req/s at c=64, at least
DEFAULT_SERVE_TARGET = 4.0  # lakeray req/s / default Serve req/s at c=64, at least


def _both(url: str, body: bytes, args, health_url: str | None = None) -> dict:
    """c=1 then c=64; with ``health_url`` (lakeray), the batch sizes of the c=64 run from /healthz."""
    one = measure(url, body, 1, args.seconds, warmup_s=1.0)
    before = healthz(health_url) if health_url else None
    many = measure(url, body, 64, args.seconds, warmup_s=2.0)
    sizes = batch_sizes(before, healthz(health_url)) if health_url else None
    for run in (one, many):
        if run.errors > 0.01 * max(run.requests, 1):
            raise RuntimeError(f"{url}: {run.errors} of {run.requests} requests failed at c={run.concurrency}")
    return {"c1": one.as_dict(), "c64": many.as_dict(), **({"batch_sizes": sizes} if sizes else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="Measured seconds per load run.")
    parser.add_argument("--out", default=str(REPO / "bench/results/serve_latency.json"))
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    other_load = OtherLoad()
    started = time.perf_counter()


    from lakeray.serving.spec import Batching

    with tempfile.TemporaryDirectory(prefix="lakeray-bench-serve-") as root:
        settings = bench_settings(root)
        model = register_model(settings)
        body = request_body(model["features"])
        tracking = settings.mlflow_tracking_uri
        print(f"model {model['uri']}: {len(model['features'])} features; load tool "
              f"{'wrk' if wrk_path() else 'asyncio (install wrk: make bench-tools)'}", flush=True)

        plain = start_plain(tracking, model["uri"], f"{root}/plain.log")
        try:
            plain_before = _both(f"{plain.url}/predict", body, args)
            print(f"plain FastAPI: {plain_before}", flush=True)

            default = start_default_serve(tracking, model["uri"], f"{root}/default-serve.log")
            try:
                default_serve = _both(f"{default.url}/predict", body, args)
            finally:
                default.stop()
            print(f"default Serve: {default_serve}", flush=True)

            with bench_ray(settings) as handle:
                deploy_started = time.perf_counter()
                endpoint = deploy_spec(settings, serve_spec("bench-latency", "/bench"))
                deploy_s = time.perf_counter() - deploy_started
                candidate = _both(f"{endpoint.url}/predict", body, args, endpoint.url)
                health = healthz(endpoint.url)
                # Where the time goes at c=64: the same app without the prediction log.
                nolog = deploy_spec(settings, serve_spec("bench-nolog", "/nolog", log=False))
                nolog_c64 = measure(f"{nolog.url}/predict", body, 64, args.seconds, warmup_s=2.0).as_dict()
                fast_proxy = handle.fast_proxy
            print(f"lakeray: {candidate}", flush=True)

            plain_after = _both(f"{plain.url}/predict", body, args)
        finally:
            plain.stop()
        cost = in_process_cost_ms(tracking, model["uri"], body)

    def best(key: str, field: str, pick) -> float:
        return pick(plain_before[key][field], plain_after[key][field])

    plain_p50 = best("c1", "p50_ms", min)
    plain_p99 = best("c1", "p99_ms", min)
    plain_rps = best("c64", "rps", max)
    lk, ds = candidate, default_serve
    p50_ratio = lk["c1"]["p50_ms"] / plain_p50
    throughput_ratio = lk["c64"]["rps"] / plain_rps
    vs_default = lk["c64"]["rps"] / ds["c64"]["rps"]
    in_process = cost["validate_ms"] + cost["matrix_ms"] + cost["predict_1_row_ms"]
    sizes = lk["batch_sizes"]
    other_share = other_load.share()
    runs = [f[c] for f in (plain_before, plain_after, ds, lk) for c in ("c1", "c64")] + [nolog_c64]
    during = max((r["other_cpu_share"] for r in runs if r.get("other_cpu_share") is not None), default=other_share)
    busy = during > BUSY_SHARE
    tool = lk["c1"]["tool"]
    notes = [
        f"c=1: a request's own work in-process (schema validation {cost['validate_ms']:.3f} ms, feature matrix "
        f"{cost['matrix_ms']:.3f} ms, 1-row predict {cost['predict_1_row_ms']:.3f} ms) is {in_process:.2f} ms; "
        f"the rest of the p50 is the HTTP path: plain uvicorn {plain_p50 - in_process:.2f} ms, lakeray "
        f"{lk['c1']['p50_ms'] - in_process:.2f} ms (HAProxy hop, Serve's replica request path, FastAPI with "
        f"the body-limit middleware, the @serve.batch queue incl. its wait_timeout, the log append), default "
        f"Serve {ds['c1']['p50_ms'] - in_process:.2f} ms (Serve's Python HTTP proxy, then a Ray actor call).",
        f"c=64: lakeray scored {sizes['mean']:.1f} requests per predict on average (largest {sizes['max']}); plain "
        f"and default Serve score one request per predict. Default Serve queues in its proxy beyond "
        f"max_ongoing_requests 5.",
        f"c=64 without the prediction log: {nolog_c64['rps']:.0f} req/s vs {lk['c64']['rps']:.0f} with it (appending "
        "rows on the request path, Arrow conversion and a Delta commit every flush_rows in the replica's process).",
        f"the load generator ({tool}) runs on the same 2 cores as the server it measures.",
    ]
    result = {
        "name": "serve_latency",
        "ratio": round(p50_ratio, 3),
        "target": P50_TARGET,
        "p50_ratio": round(p50_ratio, 3),
        "p50_target": P50_TARGET,
        "throughput_ratio": round(throughput_ratio, 3),
        "throughput_target": THROUGHPUT_TARGET,
        "vs_default_serve": round(vs_default, 3),
        "vs_default_serve_target": DEFAULT_SERVE_TARGET,
        "p99_ratio": round(lk["c1"]["p99_ms"] / plain_p99, 3),
        "candidate_s": round(lk["c1"]["p50_ms"] / 1e3, 6),
        "baseline_s": round(plain_p50 / 1e3, 6),
        "lakeray": lk, "plain_fastapi": {"before": plain_before, "after": plain_after}, "default_serve": ds,
        "lakeray_p50_ms": lk["c1"]["p50_ms"], "lakeray_p99_ms": lk["c1"]["p99_ms"], "lakeray_rps_c64": lk["c64"]["rps"],
        "plain_p50_ms": plain_p50, "plain_p99_ms": plain_p99, "plain_rps_c64": plain_rps,
        "default_serve_p50_ms": ds["c1"]["p50_ms"], "default_serve_rps_c64": ds["c64"]["rps"],
        "lakeray_nolog_rps_c64": nolog_c64["rps"],
        "log_throughput_ratio": round(lk["c64"]["rps"] / nolog_c64["rps"], 3),
        "batch_sizes": sizes,
        "prediction_log": health.get("prediction_log"),
        "in_process_ms": cost,
        "deploy_s": round(deploy_s, 2),
        "fast_proxy": fast_proxy,
        "notes": notes,
        "params": {"features": len(model["features"]), "model": f"xgboost {model['rounds']} rounds depth 6",
                   "instances_per_request": 1, "seconds_per_run": args.seconds, "warmup_s": [1.0, 2.0],
                   "concurrency": [1, 64], "load_tool": tool, "lakeray_spec": "shipped defaults, 1 replica "
                   f"(0.5 CPU), batching 64 / {Batching().wait_timeout_ms:g} ms wait, prediction log on",
                   "plain": "FastAPI + uvicorn, 1 process, same schema and scorer, no batching",
                   "default_serve": "@serve.deployment defaults, __call__ with the same schema and scorer, "
                                    "default HTTP proxy"},
        "machine": dict(machine(), load_avg_1m_at_start=round(load_start, 2), other_processes_cpu_share=other_share,
                        other_share_during_runs_max=during, busy=busy),
        "wall_s": round(time.perf_counter() - started, 1),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'':<16}{'p50 ms c=1':>12}{'p99 ms c=1':>12}{'req/s c=64':>12}{'p99 ms c=64':>13}")
    for label, figures in [("plain before", plain_before), ("plain after", plain_after),
                           ("default Serve", ds), ("lakeray", lk)]:
        print(f"{label:<16}{figures['c1']['p50_ms']:>12.2f}{figures['c1']['p99_ms']:>12.2f}"
              f"{figures['c64']['rps']:>12.0f}{figures['c64']['p99_ms']:>13.1f}")
    for note in notes:
        print(f"- {note}")
    print(f"written: {args.out} ({result['wall_s']:.0f} s)")
    if busy:
        print(f"WARNING: other processes used up to {during:.0%} of the machine's CPU during a measured run; "
              "re-run on an idle machine before trusting the ratios")
    if throughput_ratio < THROUGHPUT_TARGET:
        print(f"MISSED: throughput_ratio {throughput_ratio:.2f} is below the target {THROUGHPUT_TARGET}")
    if vs_default < DEFAULT_SERVE_TARGET:
        print(f"MISSED: vs_default_serve {vs_default:.2f} is below the target {DEFAULT_SERVE_TARGET}")
    if p50_ratio > P50_TARGET:
        print(f"MISSED: p50_ratio {p50_ratio:.2f} is above the target {P50_TARGET}")
    print(f"serve_latency: p50 ratio {p50_ratio:.2f} (target {P50_TARGET})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
