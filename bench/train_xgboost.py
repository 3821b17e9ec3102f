"""Benchmark: lakeray's XGBoost training (Ray Train, 2 workers × 1 thread) vs plain xgboost.train.

Method (one process, both sides on the same machine in the same run):
  1. Write a deterministic synthetic table (rows × features, binary label) as a Delta table with
     delta-rs: one commit per equal slice, so the pinned version has ``4 × workers`` files of equal
     rows and the trainer's round-robin file sharding gives every worker the same number of rows
     (one delta-rs commit splits files by bytes, unevenly, and the slowest worker sets the time).
  2. Baseline: read that version fully into memory, keep the training rows (the trainer's id-hash
     split), build a QuantileDMatrix (not timed: the workers' DMatrix build is not in train_s either)
     and time ``xgboost.train`` with nthread = workers × threads, i.e. the same total threads. It runs
     before Ray starts and again after Ray has shut down; the faster of the two counts, so noise from
     other work or from Ray's processes can only make the ratio worse for lakeray, never better.
  3. Candidate: ``train_xgboost`` twice in one Ray session. The ratio compares the slowest worker's
     boosting time of the second (warm) fit with the baseline. The fixed cost around the boosting
     (worker start, Delta read + DMatrix, collective set-up, checkpoint) is reported separately, cold
     (first fit) and warm (second fit): it is what users feel on small runs (DESIGN.md, Traps).
  4. Both models are scored on the same held-out rows; the AUCs must agree within 0.01 (exit 1 if not).

Caveat: 2 OpenMP threads on a 2-core machine busy with other work spin-wait on each other; the
baseline then slows down many times (80k rows × 20 rounds, load 5: 6.6 s; 0.5 s with
OMP_WAIT_POLICY=passive) while the 1-thread workers do not. The run records the CPU share that other
processes used while it ran and warns above 10%.

Prints ``train_xgboost: ratio X.XX (target 1.5)`` last and writes bench/results/train_xgboost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from proctree import BUSY_SHARE, OtherLoad  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5
AUC_TOLERANCE = 0.01
TABLE = "bench_xgb"


def make_table(path: str, rows: int, features: int, files: int, seed: int) -> int:
    """A learnable binary label over numeric features in ``files`` equal files; returns the version."""
    import numpy as np
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    # A few main effects, an interaction and a non-linearity, plus the Bernoulli draw's noise:
    # held-out AUC ≈ 0.8, far enough from 1.0 that a worse model shows.
    logit = 1.2 * x[:, 0] - 0.8 * x[:, 1] + 0.9 * x[:, 2] * x[:, 3] + 0.6 * np.abs(x[:, 4]) - 1.0
    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int32)
    columns = {"row_id": np.arange(rows, dtype=np.int64), "label": label}
    columns.update({f"f{j:02d}": x[:, j] for j in range(features)})
    table = pa.table(columns)
    per = -(-rows // files)
    for i in range(files):
        # A huge target size keeps each commit to exactly one file.
        write_deltalake(path, table.slice(i * per, per), mode="overwrite" if i == 0 else "append",
                        target_file_size=1 << 40)
    return DeltaTable(path).version()


def load_baseline(spec, threads: int, test_fraction: float):
    """The training rows in a QuantileDMatrix, and the held-out rows, read from the pinned version."""
    import xgboost

    from lakeray.lakehouse.delta import read_arrow
    from lakeray.training.data import holdout_mask, to_matrix

    table = read_arrow(spec.path, spec.version, columns=[spec.id_column, spec.label, *spec.features])
    test = holdout_mask(table.column(spec.id_column).to_numpy(), test_fraction)
    x = to_matrix(table, spec.features)
    y = table.column(spec.label).to_numpy().astype("float32")
    dtrain = xgboost.QuantileDMatrix(x[~test], y[~test], feature_names=spec.features, nthread=threads)
    return dtrain, x[test], y[test]


def time_baseline(dtrain, params: dict, rounds: int, threads: int):
    import xgboost

    started = time.perf_counter()
    booster = xgboost.train(dict(params, nthread=threads), dtrain, num_boost_round=rounds)
    return time.perf_counter() - started, booster


def machine() -> dict:
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(REPO / "bench/results/train_xgboost.json"))
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    other_load = OtherLoad()

    from sklearn.metrics import roc_auc_score

    from lakeray.cluster.ray_runtime import ray_session
    from lakeray.config import load_settings
    from lakeray.training.api import holdout_auc, make_spec
    from lakeray.training.xgboost_trainer import train_xgboost

    with tempfile.TemporaryDirectory(prefix="lakeray-bench-") as root:
        # The shipped local profile, not the caller's LAKERAY_* overrides: the set-up is part of the benchmark.
        settings = load_settings(REPO / "lakeray.yaml", "local", environ={"LAKERAY_STORAGE__ROOT": root})
        cfg = settings.profile.train
        threads = cfg.num_workers * cfg.cpus_per_worker
        files = 4 * cfg.num_workers
        version = make_table(settings.table_path(TABLE), args.rows, args.features, files, args.seed)
        spec = make_spec(settings, TABLE, version, "label", "row_id")
        dtrain, x_test, y_test = load_baseline(spec, threads, cfg.test_fraction)
        train_rows = dtrain.num_row()
        print(f"table {TABLE}@{version}: {args.rows} rows x {args.features} features, {files} files; "
              f"{train_rows} train rows", flush=True)

        base_before, booster = time_baseline(dtrain, cfg.params, args.rounds, threads)
        auc_baseline = float(roc_auc_score(y_test, booster.inplace_predict(x_test)))
        fits = []
        with ray_session(settings):
            for _ in ("cold", "warm"):
                fits.append(train_xgboost(settings, spec, num_boost_round=args.rounds))
        cold, warm = fits
        base_after, _ = time_baseline(dtrain, cfg.params, args.rounds, threads)
        auc_candidate, _ = holdout_auc(warm.booster, spec, cfg.test_fraction)

    baseline_s = min(base_before, base_after)
    ratio = warm.train_s / baseline_s
    auc_diff = auc_candidate - auc_baseline
    other_share = other_load.share()
    busy = other_share > BUSY_SHARE
    result = {
        "name": "train_xgboost",
        "ratio": round(ratio, 3),
        "target": TARGET,
        "candidate_s": round(warm.train_s, 3),
        "candidate_cold_s": round(cold.train_s, 3),
        "baseline_s": round(baseline_s, 3),
        "baseline_before_ray_s": round(base_before, 3),
        "baseline_after_ray_s": round(base_after, 3),
        "startup_s": round(cold.startup_s, 2),
        "startup_warm_s": round(warm.startup_s, 2),
        "fit_cold_s": round(cold.fit_s, 2),
        "fit_warm_s": round(warm.fit_s, 2),
        "load_s": round(warm.load_s, 3),
        "load_cold_s": round(cold.load_s, 3),
        "end_to_end_ratio": round(warm.fit_s / baseline_s, 3),
        "auc_candidate": round(auc_candidate, 5),
        "auc_baseline": round(auc_baseline, 5),
        "auc_diff": round(auc_diff, 5),
        "params": {"rows": args.rows, "train_rows": train_rows, "features": args.features, "rounds": args.rounds,
                   "files": files, "workers": cfg.num_workers, "threads_per_worker": cfg.cpus_per_worker,
                   "baseline_threads": threads, "seed": args.seed, "xgb_params": cfg.params},
        "machine": dict(machine(), load_avg_1m_at_start=round(load_start, 2), other_processes_cpu_share=other_share,
                        busy=busy),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    rows = [("", "boosting s", "fit s", "start-up s", "load s", "AUC"),
            ("baseline (before Ray)", f"{base_before:.2f}", "", "", "", f"{auc_baseline:.4f}"),
            ("baseline (after Ray)", f"{base_after:.2f}", "", "", "", ""),
            ("lakeray cold", f"{cold.train_s:.2f}", f"{cold.fit_s:.1f}", f"{cold.startup_s:.1f}",
             f"{cold.load_s:.2f}", ""),
            ("lakeray warm", f"{warm.train_s:.2f}", f"{warm.fit_s:.1f}", f"{warm.startup_s:.1f}",
             f"{warm.load_s:.2f}", f"{auc_candidate:.4f}")]
    for row in rows:
        print(f"{row[0]:<22}" + "".join(f"{cell:>12}" for cell in row[1:]))
    print(f"written: {args.out}")
    failed = []
    if abs(auc_diff) > AUC_TOLERANCE:
        failed.append(f"AUC check FAILED: |{auc_candidate:.4f} - {auc_baseline:.4f}| > {AUC_TOLERANCE}")
    if warm.train_rows != train_rows:
        failed.append(f"row check FAILED: workers trained on {warm.train_rows} rows, baseline on {train_rows}")
    for line in failed:
        print(line)
    if busy:
        print(f"WARNING: other processes used {other_share:.0%} of the machine's CPU during the run: the 2-thread "
              "baseline slows down a lot on a busy machine; re-run on an idle one before trusting the ratio")
    if ratio > TARGET:
        print(f"MISSED: ratio {ratio:.2f} is above the target {TARGET}")
    print(f"train_xgboost: ratio {ratio:.2f} (target {TARGET})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
