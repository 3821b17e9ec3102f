"""Benchmark: `lakeray tune` with ASHA (16 XGBoost configurations, 2 at once) vs the same 16 trained to completion.

Method (one process, both sides on the same machine in the same run):
  1. Write a deterministic synthetic table (250k rows × 30 features, binary label) with delta-rs.
  2. Candidate: with Ray running, ``lakeray.training.tune.search`` over a TuneSpec: 16 random draws of
     max_depth, eta, subsample, colsample_bytree, min_child_weight; up to 200 rounds; ASHA (grace 10,
     factor 3: rungs at 10, 30, 90 rounds); 2 trials at once with 1 thread each. ``candidate_s`` is
     Tune's fit (every trial: its process, Delta read, DMatrix, boosting, reports, checkpoints).
     The whole path (spec validation + pinning, the search, the best trial's held-out evaluation and
     its MLflow registration with a parent and 16 child runs) is ``whole_path_s``; Ray's own start
     (once per CLI call) is reported as ``ray_start_s``.
  3. Baseline: the same 16 configurations (the ones the search drew), each trained to completion
     (200 rounds) one after another with plain ``xgboost.train`` at the same total threads (2), on
     a QuantileDMatrix built once from the same pinned files (read and build timed).
  4. ``ratio`` = candidate_s / baseline_s (target ≤ 0.7); ``rounds_saved`` = the share of the
     16 × 200 rounds ASHA did not run; the registered model's held-out AUC is checked against the best
     fully trained baseline configuration (within 0.01; exit 1 if worse).

Prints ``tune_asha: ratio X.XX (target 0.7)`` last and writes bench/results/tune_asha.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine, make_table  # noqa: E402  (bench/ is not a package)
from proctree import BUSY_SHARE, OtherLoad  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.7
AUC_TOLERANCE = 0.01
TABLE = "bench_tune"


def tune_spec(rounds: int, samples: int, concurrent: int, seed: int) -> dict:
    return {
        "name": "bench_tune_asha",
        "train": {"name": "bench_tune_base", "model": {"kind": "xgboost", "rounds": rounds, "seed": seed},
                  "training_set": TABLE, "label": "label", "features": {"all_except": []},
                  "split": {"kind": "hash", "column": "row_id", "fraction": 0.2},
                  "scaling": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False},
                  "registry": {"model_name": "bench_tune_asha", "alias": "challenger"}},
        "space": {"max_depth": {"int": [3, 10]}, "eta": {"loguniform": [0.01, 0.3]},
                  "subsample": {"uniform": [0.5, 1.0]}, "colsample_bytree": {"uniform": [0.5, 1.0]},
                  "min_child_weight": {"choice": [1, 5, 20]}},
        "search": {"algorithm": "random", "seed": seed},
        "scheduler": {"kind": "asha", "grace_period": 10, "reduction_factor": 3},
        "num_samples": samples, "max_concurrent": concurrent,
    }


def baseline(plan, configs: list[dict], rounds: int, threads: int) -> tuple[float, float, list[float]]:
    """(seconds, best AUC, AUCs): every configuration trained to completion, one after another."""
    import numpy as np
    import pyarrow.dataset as ds
    import xgboost
    from deltalake import DeltaTable
    from sklearn.metrics import roc_auc_score

    from lakeray.training.data import labels, to_matrix, validation_mask

    started = time.perf_counter()
    table = ds.dataset(DeltaTable(plan.path, version=plan.version).file_uris(), format="parquet").to_table()
    held = validation_mask(table, plan)
    x, y = to_matrix(table, plan.features), labels(table, plan)
    dtrain = xgboost.QuantileDMatrix(x[~held], y[~held], nthread=threads)
    dvalid = xgboost.DMatrix(x[held], y[held], nthread=threads)
    aucs = []
    for config in configs:
        params = {"objective": "binary:logistic", "tree_method": "hist", "eval_metric": "auc",
                  "nthread": threads, "seed": 7, **config}
        booster = xgboost.train(params, dtrain, num_boost_round=rounds)
        aucs.append(float(roc_auc_score(y[held], booster.predict(dvalid))))
    return time.perf_counter() - started, max(aucs), [round(a, 5) for a in aucs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(REPO / "bench/results/tune_asha.json"))
    args = parser.parse_args()
    other_load = OtherLoad()
    load_start = os.getloadavg()[0]

    from lakeray.cluster.ray_runtime import ray_session
    from lakeray.config import load_settings
    from lakeray.training.tune import TuneSpec, search, validate_search

    root = tempfile.mkdtemp(prefix="lakeray-bench-tune-")
    try:
        settings = load_settings(REPO / "lakeray.yaml", "local", environ={"LAKERAY_STORAGE__ROOT": root})
        make_table(settings.table_path(TABLE), args.rows, args.features, 1, args.seed)
        spec = TuneSpec.parse(tune_spec(args.rounds, args.samples, args.concurrent, args.seed), "bench spec")
        ray_started = time.perf_counter()
        with ray_session(settings):
            ray_start_s = time.perf_counter() - ray_started
            whole_started = time.perf_counter()
            checked = validate_search(settings, spec, "bench spec")
            report = search(settings, spec, "bench spec", checked=checked)
            whole_path_s = time.perf_counter() - whole_started
        candidate_s = report.extra["search_s"]
        configs = [{k: v for k, v in t.config.items()} for t in report.trials]
        baseline_s, best_baseline_auc, baseline_aucs = baseline(checked[1], configs, args.rounds, args.concurrent)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ratio = candidate_s / baseline_s
    tuned_auc = report.evaluation.metrics["auc"]
    auc_ok = tuned_auc >= best_baseline_auc - AUC_TOLERANCE
    stopped = sum(t.stopped_early for t in report.trials)
    other_share = other_load.share()
    result = {
        "name": "tune_asha", "ratio": round(ratio, 3), "target": TARGET,
        "candidate_s": round(candidate_s, 2), "baseline_s": round(baseline_s, 2),
        "rounds_saved": round(report.rounds_saved, 3), "rounds_run": report.rounds_run,
        "rounds_budget": report.rounds_budget, "trials_stopped_early": stopped,
        "whole_path_ratio": round(whole_path_s / baseline_s, 3), "whole_path_s": round(whole_path_s, 2),
        "whole_path_with_ray_start_ratio": round((whole_path_s + ray_start_s) / baseline_s, 3),
        "ray_start_s": round(ray_start_s, 2),
        "tuned_auc": round(tuned_auc, 5), "best_baseline_auc": round(best_baseline_auc, 5), "auc_ok": auc_ok,
        "baseline_aucs": baseline_aucs, "best_config": report.best.config,
        "params": {"rows": args.rows, "features": args.features, "max_rounds": args.rounds, "configs": args.samples,
                   "concurrent": args.concurrent, "threads_total": args.concurrent,
                   "scheduler": "asha grace 10, factor 3", "search": f"random, seed {args.seed}",
                   "candidate": "lakeray.training.tune.search: Tune fit (trials 1 thread each)",
                   "baseline": "plain xgboost.train, 2 threads, configs one after another, full rounds"},
        "machine": dict(machine(), load_avg_1m_at_start=round(load_start, 2), other_processes_cpu_share=other_share),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("baseline_aucs",)}, indent=2))
    if other_share > BUSY_SHARE:
        print(f"WARNING: other processes used {other_share:.0%} of the machine's CPU during the run")
    if not auc_ok:
        print(f"tuned AUC {tuned_auc:.4f} is more than {AUC_TOLERANCE} below the best full configuration "
              f"{best_baseline_auc:.4f}", file=sys.stderr)
    print(f"tune_asha: ratio {ratio:.2f} (target {TARGET})")
    return 0 if auc_ok else 1


if __name__ == "__main__":
    sys.exit(main())
