"""Benchmark: lakeray's autoscaling under a load step: low → high → low, on the spec's shipped defaults.

Method (one run, one Ray, Serve with HAProxy ingress as lakeray ships it):
  1. Register the XGBoost model (30 features) and deploy it with ``lakeray.serving.deploy.deploy``
     from a ServeSpec with the shipped autoscaling defaults (or the ones given on the command line),
     batching and the prediction log on.
  2. Load in back-to-back 1-second windows (wrk, or bench/loadgen.py's client): ``--low`` connections
     for ``--low-s``, ``--high`` connections for ``--high-s``, then ``--low`` again until the replicas
     are back at the minimum (at most ``--after-max-s``). Each window's requests/s and p99 are kept.
  3. A thread reads Serve's replica states every 0.5 s.

Figures (seconds from the step): ``scale_up_decided_s`` (a replica is added, STARTING),
``scale_up_s`` (it is RUNNING), ``p99_recovered_s`` (the first of 3 windows in a row with p99 at or
under ``--p99-target-ms``; 0 when the step never pushed it over), ``scale_down_s`` (back at the
minimum after the load fell). ``ratio`` is scale_up_s ÷ upscale_delay_s (target ≤ 2).

Prints ``serve_autoscale: ratio X (target Y)`` last; writes bench/results/serve_autoscale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import machine  # noqa: E402  (bench/ is not a package)
from loadgen import run_load  # noqa: E402
from proctree import BUSY_SHARE, OtherLoad  # noqa: E402
from servelib import (REPO, bench_ray, deploy_spec, bench_settings, register_model, replica_counts,  # noqa: E402
                      request_body, serve_spec)

APP = "bench-autoscale"
# The issue names no ratio here: ``ratio`` is scale_up_s ÷ upscale_delay_s, how much longer than the
# configured delay it takes until the added replica serves; at most 2 (docs/decisions.md).
TARGET = 2.0


class ReplicaSampler(threading.Thread):
    """(seconds since t0, running, all non-stopped replicas) every ``every_s`` until stopped."""

    def __init__(self, t0: float, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.t0, self.every_s, self.samples, self.errors = t0, every_s, [], 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                counts = replica_counts(APP)
                alive = sum(v for k, v in counts.items() if k in ("STARTING", "UPDATING", "RECOVERING", "RUNNING"))
                self.samples.append((round(time.perf_counter() - self.t0, 2), counts.get("RUNNING", 0), alive))
            except Exception:  # a slow controller answer must not end the sampling
                self.errors += 1
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _first(samples: list, after: float, test) -> float | None:
    return next((t - after for t, running, alive in samples if t >= after and test(running, alive)), None)


def main() -> int:
    from lakeray.serving.spec import Autoscaling

    shipped = Autoscaling()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=2, help="Connections before and after the step.")
    parser.add_argument("--high", type=int, default=64, help="Connections during the step.")
    parser.add_argument("--low-s", type=float, default=8.0)
    parser.add_argument("--high-s", type=float, default=40.0)
    parser.add_argument("--after-max-s", type=float, default=110.0,
                        help="Longest low-load tail waiting for scale-down.")
    parser.add_argument("--p99-target-ms", type=float, default=100.0)
    parser.add_argument("--max-replicas", type=int, default=shipped.max_replicas)
    parser.add_argument("--target-ongoing", type=float, default=shipped.target_ongoing_requests)
    parser.add_argument("--upscale-delay-s", type=float, default=shipped.upscale_delay_s)
    parser.add_argument("--downscale-delay-s", type=float, default=shipped.downscale_delay_s)
    parser.add_argument("--metrics-interval-s", type=float, default=shipped.metrics_interval_s,
                        help="Replica → autoscaler report period (Ray's default: 10).")
    parser.add_argument("--look-back-period-s", type=float, default=shipped.look_back_period_s,
                        help="Seconds of reports the autoscaler averages (Ray's default: 30).")
    parser.add_argument("--out", default=str(REPO / "bench/results/serve_autoscale.json"))
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    other_load = OtherLoad()
    started = time.perf_counter()


    autoscaling = {"min_replicas": shipped.min_replicas, "max_replicas": args.max_replicas,
                   "target_ongoing_requests": args.target_ongoing, "upscale_delay_s": args.upscale_delay_s,
                   "downscale_delay_s": args.downscale_delay_s, "metrics_interval_s": args.metrics_interval_s,
                   "look_back_period_s": args.look_back_period_s}
    windows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lakeray-bench-serve-") as root:
        settings = bench_settings(root)
        model = register_model(settings)
        body = request_body(model["features"])
        with bench_ray(settings) as handle:
            endpoint = deploy_spec(settings, serve_spec(APP, "/auto", **autoscaling))
            url = f"{endpoint.url}/predict"
            t0 = time.perf_counter()
            sampler = ReplicaSampler(t0)
            sampler.start()

            def window(concurrency: int, phase: str) -> None:
                begin = time.perf_counter() - t0
                run = run_load(url, body, concurrency, 1.0, 100_000)
                # A window without a single answer has no percentiles: every request took over a second.
                answered = run.requests > 0
                windows.append({"t": round(begin, 2), "phase": phase, "c": concurrency, "rps": round(run.rps, 1),
                                "answered": run.requests, "errors": run.errors,
                                "p50_ms": round(run.p50_ms, 2) if answered else None,
                                "p99_ms": round(run.p99_ms, 2) if answered else None})

            try:
                while time.perf_counter() - t0 < args.low_s:
                    window(args.low, "low")
                step_up = time.perf_counter() - t0
                while time.perf_counter() - t0 < step_up + args.high_s:
                    window(args.high, "high")
                step_down = time.perf_counter() - t0
                while time.perf_counter() - t0 < step_down + args.after_max_s:
                    window(args.low, "low-after")
                    scaled_up = any(alive > shipped.min_replicas for t, _, alive in sampler.samples if t >= step_up)
                    latest = sampler.samples[-1][2] if sampler.samples else None
                    if not scaled_up or latest is not None and latest <= shipped.min_replicas:
                        window(args.low, "low-after")  # one window at the minimum (nothing to wait for if never up)
                        break
            finally:
                sampler.stop()
            fast_proxy = handle.fast_proxy
            lowest = shipped.min_replicas

    samples = sampler.samples
    scale_up_decided = _first(samples, step_up, lambda running, alive: alive > lowest)
    scale_up = _first(samples, step_up, lambda running, alive: running > lowest)
    peak = max((alive for t, _, alive in samples if t >= step_up), default=lowest)
    scale_down = _first(samples, step_down, lambda running, alive: alive <= lowest) if peak > lowest else None
    high = [w for w in windows if w["phase"] == "high"]

    def under(w: dict) -> bool:
        return w["p99_ms"] is not None and w["p99_ms"] <= args.p99_target_ms

    over = [i for i, w in enumerate(high) if not under(w)]
    p99_recovered = 0.0 if not over else None
    for i in range(over[0] + 1 if over else len(high), len(high) - 2):
        if all(under(w) for w in high[i:i + 3]):
            p99_recovered = round(high[i]["t"] - step_up, 2)
            break
    stalled = [w["t"] for w in high if not w["answered"]]
    one_replica = [w for w in high if _replicas_at(samples, w["t"]) <= lowest]
    more = [w for w in high if _replicas_at(samples, w["t"]) > lowest]

    def mean(items: list[dict], key: str) -> float | None:
        values = [w[key] for w in items if w[key] is not None]
        return round(sum(values) / len(values), 2) if values else None

    start_cost = (scale_up - scale_up_decided) if scale_up is not None and scale_up_decided is not None else None
    other_share = other_load.share()
    busy = other_share > BUSY_SHARE
    notes = [
        f"scale-up = upscale_delay_s ({args.upscale_delay_s:g} s) + Serve's metric look-back and control loop "
        f"({(scale_up_decided or 0) - args.upscale_delay_s:.1f} s) + starting a replica (actor, model load from "
        f"MLflow, FastAPI app: {start_cost if start_cost is not None else float('nan'):.1f} s).",
        f"at c={args.high}: {mean(one_replica, 'rps')} req/s, p99 {mean(one_replica, 'p99_ms')} ms with "
        f"{lowest} replica vs {mean(more, 'rps')} req/s, p99 {mean(more, 'p99_ms')} ms with more: on 2 cores the "
        "extra replica shares the same cores with HAProxy, the first replica and the load generator.",
        f"scale-down = downscale_delay_s ({args.downscale_delay_s:g} s) plus the look-back over which Serve "
        "averages ongoing requests, plus the replica's graceful drain.",
        f"Serve's autoscaling sees replicas' ongoing requests as reported every metrics_interval_s "
        f"({args.metrics_interval_s:g} s; Ray's default 10) and averaged over look_back_period_s "
        f"({args.look_back_period_s:g} s; Ray's default 30): the part of the scale-up reaction beyond "
        "upscale_delay_s.",
    ]
    if stalled:
        notes.append(f"{len(stalled)} one-second windows at c={args.high} got no answer at all (t = {stalled}): the "
                     "serving replica stalled while the new one started (model load, imports) on the same cores.")
    result = {
        "name": "serve_autoscale",
        "ratio": round(scale_up / args.upscale_delay_s, 3) if scale_up is not None and args.upscale_delay_s else None,
        "target": TARGET,
        "scale_up_decided_s": _round(scale_up_decided), "scale_up_s": _round(scale_up),
        "replica_start_s": round(start_cost, 2) if start_cost is not None else None,
        "p99_recovered_s": p99_recovered, "p99_target_ms": args.p99_target_ms,
        "scale_down_s": _round(scale_down), "peak_replicas": peak,
        "stalled_windows_at": stalled,
        "candidate_s": _round(scale_up), "baseline_s": args.upscale_delay_s,
        "high_load_one_replica": {"rps": mean(one_replica, "rps"), "p99_ms": mean(one_replica, "p99_ms")},
        "high_load_scaled": {"rps": mean(more, "rps"), "p99_ms": mean(more, "p99_ms")},
        "errors": sum(w["errors"] for w in windows),
        "windows": windows, "replica_samples": samples, "sampler_errors": sampler.errors,
        "fast_proxy": fast_proxy,
        "notes": notes,
        "params": {"autoscaling": autoscaling, "low_connections": args.low, "high_connections": args.high,
                   "low_s": args.low_s, "high_s": args.high_s, "window_s": 1.0, "features": len(model["features"]),
                   "replica": "0.5 CPU, batching 64, prediction log on",
                   "load_tool": _tool()},
        "machine": dict(machine(), load_avg_1m_at_start=round(load_start, 2), other_processes_cpu_share=other_share,
                        busy=busy),
        "wall_s": round(time.perf_counter() - started, 1),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for w in windows:
        p99 = f"{w['p99_ms']:8.1f} ms" if w["p99_ms"] is not None else "no answer"
        print(f"t={w['t']:6.1f} {w['phase']:<9} c={w['c']:<3} {w['rps']:7.0f} req/s p99 {p99} "
              f"replicas {_replicas_at(samples, w['t'])}")
    print(f"scale-up decided {_round(scale_up_decided)} s, running {_round(scale_up)} s; p99 under "
          f"{args.p99_target_ms:g} ms after {p99_recovered} s; scale-down {_round(scale_down)} s after the load fell "
          f"(peak {peak} replicas)")
    for note in notes:
        print(f"- {note}")
    print(f"written: {args.out} ({result['wall_s']:.0f} s)")
    if busy:
        print(f"WARNING: other processes used {other_share:.0%} of the machine's CPU during the run")
    print(f"serve_autoscale: ratio {result['ratio']} (target {TARGET})", flush=True)
    return 0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _tool() -> str:
    from loadgen import wrk_path

    return "wrk" if wrk_path() else "asyncio"


def _replicas_at(samples: list, t: float) -> int:
    """Running replicas at time ``t`` (the last sample at or before it)."""
    running = 0
    for ts, count, _ in samples:
        if ts > t:
            break
        running = count
    return running


if __name__ == "__main__":
    sys.exit(main())
