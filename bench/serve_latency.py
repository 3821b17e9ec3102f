"""Benchmark: lakeray's endpoint vs a plain FastAPI + uvicorn process vs default Ray Serve, over HTTP on loopback.

Method (one run, the same registered XGBoost model on 30 features, the same one-instance request):
  1. Train a booster and register it in the run's own MLflow store (bench/servelib.py); write a small
     Delta feature table (10,000 entities, 20 of the 30 features; bench/serve_layers.py). A request
     carries an entity id and the other 10 features; every server looks the 20 up in memory.
  2. Default Serve: a minimal hand-written deployment in a private Ray with Serve's defaults (default
     HTTP proxy, 1 replica, max_ongoing_requests 5) and the same lookup, then stopped.
  3. Plain baseline: one FastAPI + uvicorn process, the same scorer, request schema and in-memory
     lookup (lakeray.serving.online.OnlineStore) as a replica; no batching, no log.
  4. lakeray: ``deploy()`` of a ServeSpec with the shipped defaults (HAProxy ingress and throughput-
     optimised mode from the profile, @serve.batch 64, online features, the Delta prediction log on),
     one replica.
  5. Plain and lakeray are measured interleaved, ``--rounds`` times, alternating which goes first (load
     drift on a shared machine then hits both alike); each figure is the median over rounds.
  6. The same lakeray app without the prediction log, at 64 connections, in the same rounds (what the
     log costs).
  7. Where the time goes: the replica's own FastAPI app, built in this process without Serve, timed per
     layer (bench/serve_layers.py); the rest of a c=1 p50 is the HTTP path.
  Each server: p50/p99 at concurrency 1 and requests/s at 64 (wrk, or bench/loadgen.py's client),
  each after a warm-up run. Bounded: every run by time and request count, loopback only.

Prints ``serve_latency: p50 ratio X (target 2.0)`` last; writes bench/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine  # noqa: E402  (bench/ is not a package)
from loadgen import wrk_path  # noqa: E402
from proctree import BUSY_SHARE, OtherLoad  # noqa: E402
from serve_layers import layer_breakdown_us, online_body, online_features, online_table  # noqa: E402
from servelib import (REPO, batch_sizes, bench_ray, bench_settings, deploy_spec, healthz, measure,  # noqa: E402
                      register_model, serve_spec, start_default_serve, start_plain)

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


def _median(runs: list[dict], key: str, field: str) -> float:
    return round(statistics.median(run[key][field] for run in runs), 3)


def _interleaved(plain_url: str, lakeray_url: str, nolog_url: str, body: bytes,
                 args) -> tuple[list[dict], list[dict], list[dict]]:
    """``args.rounds`` rounds, alternating the order: c=1 then c=64 on plain and lakeray, c=64 on the
    lakeray app without the prediction log."""
    plain_runs, lakeray_runs, nolog_runs = [], [], []
    for round_no in range(args.rounds):
        order = [("plain", plain_url), ("lakeray", lakeray_url), ("nolog", nolog_url)]
        for name, url in order if round_no % 2 == 0 else order[::-1]:
            if name == "nolog":
                nolog_runs.append(measure(f"{url}/predict", body, 64, args.seconds, warmup_s=2.0).as_dict())
                print(f"round {round_no + 1} lakeray without log: c=64 {nolog_runs[-1]['rps']:.0f} req/s", flush=True)
                continue
            figures = _both(f"{url}/predict", body, args, url if name == "lakeray" else None)
            (plain_runs if name == "plain" else lakeray_runs).append(figures)
            print(f"round {round_no + 1} {name}: c=1 p50 {figures['c1']['p50_ms']:.2f} ms, "
                  f"c=64 {figures['c64']['rps']:.0f} req/s", flush=True)
    return plain_runs, lakeray_runs, nolog_runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="Measured seconds per load run.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved plain/lakeray rounds (median counts).")
    parser.add_argument("--out", default=str(REPO / "bench/results/serve_latency.json"))
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    other_load = OtherLoad()
    started = time.perf_counter()

    from lakeray.serving.online import plan_online_features
    from lakeray.serving.spec import Batching, app_args

    with tempfile.TemporaryDirectory(prefix="lakeray-bench-serve-") as root:
        settings = bench_settings(root)
        model = register_model(settings)
        online_table(settings, model["features"])
        features = online_features(model["features"])
        spec = serve_spec("bench-latency", "/bench", features=features)
        plan_file = f"{root}/online-plan.json"
        Path(plan_file).write_text(json.dumps(plan_online_features(settings, spec.features, model["uri"])))
        body = online_body(model["features"])
        tracking = settings.mlflow_tracking_uri
        print(f"model {model['uri']}: {len(model['features'])} features, online lookup of 20; load tool "
              f"{'wrk' if wrk_path() else 'asyncio (install wrk: make bench-tools)'}", flush=True)

        default = start_default_serve(tracking, model["uri"], f"{root}/default-serve.log", plan_file)
        try:
            default_serve = _both(f"{default.url}/predict", body, args)
        finally:
            default.stop()
        print(f"default Serve: {default_serve}", flush=True)

        plain = start_plain(tracking, model["uri"], f"{root}/plain.log", plan_file)
        try:
            with bench_ray(settings) as handle:
                deploy_started = time.perf_counter()
                endpoint = deploy_spec(settings, spec)
                deploy_s = time.perf_counter() - deploy_started
                # What the prediction log costs at c=64: the same app without it, in the same rounds.
                nolog = deploy_spec(settings, serve_spec("bench-nolog", "/nolog", log=False, features=features))
                plain_runs, lakeray_runs, nolog_runs = _interleaved(plain.url, endpoint.url, nolog.url, body, args)
                health = healthz(endpoint.url)
                fast_proxy = handle.fast_proxy
                layers = layer_breakdown_us(app_args(serve_spec("bench-layers", "/layers", features=features),
                                                     settings, model["uri"]), body)
        finally:
            plain.stop()

    plain_p50 = _median(plain_runs, "c1", "p50_ms")
    plain_p99 = _median(plain_runs, "c1", "p99_ms")
    plain_rps = _median(plain_runs, "c64", "rps")
    lk_p50 = _median(lakeray_runs, "c1", "p50_ms")
    lk_p99 = _median(lakeray_runs, "c1", "p99_ms")
    lk_rps = _median(lakeray_runs, "c64", "rps")
    ds = default_serve
    p50_ratio = lk_p50 / plain_p50
    throughput_ratio = lk_rps / plain_rps
    vs_default = lk_rps / ds["c64"]["rps"]
    sizes = lakeray_runs[-1]["batch_sizes"]
    other_share = other_load.share()
    nolog_rps = round(statistics.median(run["rps"] for run in nolog_runs), 3)
    runs = [f[c] for f in (*plain_runs, *lakeray_runs, ds) for c in ("c1", "c64")] + nolog_runs
    during = max((r["other_cpu_share"] for r in runs if r.get("other_cpu_share") is not None), default=other_share)
    busy = during > BUSY_SHARE
    tool = lakeray_runs[0]["c1"]["tool"]
    model_work = layers["validate"] + layers["lookup"] + layers["matrix"] + layers["predict"]
    where = {
        "lakeray_c1_p50_us": round(lk_p50 * 1e3, 1),
        "lakeray_replica_app_us": layers["asgi_total"],
        "lakeray_replica_app_layers_us": layers,
        "lakeray_http_path_us": round(lk_p50 * 1e3 - layers["asgi_total"], 1),
        "plain_c1_p50_us": round(plain_p50 * 1e3, 1),
        "plain_model_work_us": round(model_work, 1),
        "plain_http_and_fastapi_us": round(plain_p50 * 1e3 - model_work, 1),
    }
    notes = [
        f"c=1, lakeray p50 {lk_p50 * 1e3:.0f} µs: the replica's FastAPI app takes {layers['asgi_total']:.0f} µs in "
        f"process (validate {layers['validate']:.0f}, lookup {layers['lookup']:.0f}, matrix {layers['matrix']:.0f}, "
        f"predict {layers['predict']:.0f}, batch function overhead "
        f"{layers['vectorised'] - layers['lookup'] - layers['matrix'] - layers['predict']:.0f}, metrics "
        f"{layers['metrics']:.0f}, log append {layers['log_append']:.0f}, FastAPI routing + middlewares + response "
        f"{layers['asgi_other']:.0f}); the HTTP path (HAProxy, Serve's replica request path, loopback) "
        f"{where['lakeray_http_path_us']:.0f} µs. A request alone in the replica skips the @serve.batch hand-off "
        f"({layers['batch_handoff']:.0f} µs when taken).",
        f"c=1, plain p50 {plain_p50 * 1e3:.0f} µs: model work (validate, lookup, matrix, predict) "
        f"{model_work:.0f} µs; uvicorn + FastAPI (a sync endpoint: the thread pool) + loopback "
        f"{where['plain_http_and_fastapi_us']:.0f} µs.",
        f"c=64: lakeray scored {sizes['mean']:.1f} requests per predict on average (largest {sizes['max']}); plain "
        f"and default Serve score one request per predict. Default Serve queues in its proxy beyond "
        f"max_ongoing_requests 5.",
        f"c=64 without the prediction log: {nolog_rps:.0f} req/s vs {lk_rps:.0f} with it (medians, same rounds).",
        f"the load generator ({tool}) runs on the same cores as the servers it measures.",
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
        "p99_ratio": round(lk_p99 / plain_p99, 3),
        "candidate_s": round(lk_p50 / 1e3, 6),
        "baseline_s": round(plain_p50 / 1e3, 6),
        "lakeray": lakeray_runs, "plain_fastapi": plain_runs, "default_serve": ds,
        "lakeray_p50_ms": lk_p50, "lakeray_p99_ms": lk_p99, "lakeray_rps_c64": lk_rps,
        "plain_p50_ms": plain_p50, "plain_p99_ms": plain_p99, "plain_rps_c64": plain_rps,
        "default_serve_p50_ms": ds["c1"]["p50_ms"], "default_serve_rps_c64": ds["c64"]["rps"],
        "lakeray_nolog_rps_c64": nolog_rps, "lakeray_nolog": nolog_runs,
        "log_throughput_ratio": round(lk_rps / nolog_rps, 3),
        "batch_sizes": sizes,
        "prediction_log": health.get("prediction_log"),
        "online_features": health.get("online_features"),
        "where_the_time_goes": where,
        "deploy_s": round(deploy_s, 2),
        "fast_proxy": fast_proxy,
        "notes": notes,
        "params": {"features": len(model["features"]), "model": f"xgboost {model['rounds']} rounds depth 6",
                   "instances_per_request": 1, "online_features": "20 of 30 looked up (10,000 entities)",
                   "rounds": args.rounds, "seconds_per_run": args.seconds, "warmup_s": [1.0, 2.0],
                   "concurrency": [1, 64], "load_tool": tool, "lakeray_spec": "shipped defaults, 1 replica "
                   f"(0.5 CPU), batching 64 / {Batching().wait_timeout_ms:g} ms wait, online lookup, "
                   "prediction log on",
                   "plain": "FastAPI + uvicorn, 1 process, same schema, lookup and scorer, no batching",
                   "default_serve": "@serve.deployment defaults, __call__ with the same schema, lookup and scorer, "
                                    "default HTTP proxy"},
        "machine": dict(machine(), load_avg_1m_at_start=round(load_start, 2), other_processes_cpu_share=other_share,
                        other_share_during_runs_max=during, busy=busy),
        "wall_s": round(time.perf_counter() - started, 1),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'':<16}{'p50 ms c=1':>12}{'p99 ms c=1':>12}{'req/s c=64':>12}{'p99 ms c=64':>13}")
    labelled = [*((f"plain {i + 1}", f) for i, f in enumerate(plain_runs)), ("default Serve", ds),
                *((f"lakeray {i + 1}", f) for i, f in enumerate(lakeray_runs))]
    for label, figures in labelled:
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
