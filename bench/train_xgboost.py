"""Benchmark: lakeray's XGBoost training (Ray Train, 2 workers, Delta version) vs plain xgboost.train.

Method (one process, both sides on the same machine in the same run, so noise hits both):
  1. Write a deterministic synthetic table (rows × features, binary label) as a Delta table with
     delta-rs, in several files so each Ray Train worker reads its own share.
  2. Baseline: read that version fully into memory, keep the training rows (same id-hash split as the
     workers), build a QuantileDMatrix, time ``xgboost.train`` with nthread = workers × threads (the
     same total threads). Run before Ray starts so Ray's idle processes do not take CPU from it.
  3. Candidate: ``lakeray.training.xgboost_trainer.train_xgboost`` twice in one Ray session. The
     ratio compares the slowest worker's boosting time of the second (warm) fit with the baseline's
     boosting time; the fixed start-up cost (actor start, Delta read, collective set-up, checkpoint)
     is reported separately, cold (first fit) and warm (second fit).
  4. Both models are scored on the same held-out rows; the AUCs must agree within 0.01.

Prints ``train_xgboost: ratio X (target 1.5)`` last and writes bench/results/train_xgboost.json.
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

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5
AUC_TOLERANCE = 0.01


def make_table(path: str, rows: int, features: int, files: int, seed: int) -> None:
    """A learnable binary label over numeric features, written as ``files`` parquet files in one commit."""
    import numpy as np
    import pyarrow as pa
    from deltalake import write_deltalake

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    logit = 1.2 * x[:, 0] - 0.8 * x[:, 1] + 0.9 * x[:, 2] * x[:, 3] + 0.6 * np.abs(x[:, 4]) - 1.0
    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int32)
    columns = {"row_id": np.arange(rows, dtype=np.int64), "label": label}
    columns.update({f"f{j:02d}": x[:, j] for j in range(features)})
    table = pa.table(columns)
    # delta-rs splits a write by bytes: aim at ``files`` files of roughly equal size.
    write_deltalake(path, table, mode="overwrite", target_file_size=max(table.nbytes // files, 1 << 20))


def baseline(spec, params: dict, rounds: int, threads: int, test_fraction: float):
    """Plain xgboost.train on the same training rows, already in memory."""
    import xgboost
    from sklearn.metrics import roc_auc_score

    from lakeray.lakehouse.delta import read_arrow
    from lakeray.training.data import holdout_mask, to_matrix

    table = read_arrow(spec.path, spec.version, columns=[spec.id_column, spec.label, *spec.features])
    test = holdout_mask(table.column(spec.id_column).to_numpy(), test_fraction)
    x = to_matrix(table, spec.features)
    y = table.column(spec.label).to_numpy().astype("float32")
    dtrain = xgboost.QuantileDMatrix(x[~test], y[~test], feature_names=spec.features, nthread=threads)
    started = time.perf_counter()
    booster = xgboost.train(dict(params, nthread=threads), dtrain, num_boost_round=rounds)
    seconds = time.perf_counter() - started
    return seconds, float(roc_auc_score(y[test], booster.inplace_predict(x[test]))), int((~test).sum())


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

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from lakeray.cluster.ray_runtime import ray_session
    from lakeray.config import load_settings
    from lakeray.training.api import holdout_auc, make_spec
    from lakeray.training.xgboost_trainer import train_xgboost

    with tempfile.TemporaryDirectory(prefix="lakeray-bench-") as root:
        settings = load_settings(REPO / "lakeray.yaml", "local", environ={"LAKERAY_STORAGE__ROOT": root})
        cfg = settings.profile.train
        threads = cfg.num_workers * cfg.cpus_per_worker
        path = settings.table_path("bench_xgb")
        make_table(path, args.rows, args.features, files=4 * cfg.num_workers, seed=args.seed)
        from lakeray.lakehouse.delta import table_files

        print(f"table: {args.rows} rows x {args.features} features in {len(table_files(path))} files", flush=True)
        spec = make_spec(settings, "bench_xgb", 0, "label", "row_id")
        base_s, base_auc, train_rows = baseline(spec, cfg.params, args.rounds, threads, cfg.test_fraction)
        print(f"baseline xgboost.train ({threads} threads): {base_s:.2f} s, auc {base_auc:.4f}", flush=True)

        fits = []
        with ray_session(settings):
            for attempt in ("cold", "warm"):
                outcome = train_xgboost(settings, spec, num_boost_round=args.rounds)
                fits.append(outcome)
                print(f"lakeray fit ({attempt}): boosting {outcome.train_s:.2f} s, start-up "
                      f"{outcome.startup_s:.2f} s (load {outcome.load_s:.2f} s), fit {outcome.fit_s:.2f} s",
                      flush=True)
        cold, warm = fits
        cand_auc, _ = holdout_auc(warm.booster, spec, cfg.test_fraction)

    ratio = warm.train_s / base_s
    auc_diff = cand_auc - base_auc
    result = {
        "name": "train_xgboost",
        "ratio": round(ratio, 3),
        "target": TARGET,
        "candidate_s": round(warm.train_s, 3),
        "baseline_s": round(base_s, 3),
        "startup_s": round(cold.startup_s, 2),
        "startup_warm_s": round(warm.startup_s, 2),
        "fit_cold_s": round(cold.fit_s, 2),
        "fit_warm_s": round(warm.fit_s, 2),
        "load_s": round(warm.load_s, 3),
        "end_to_end_ratio": round(warm.fit_s / base_s, 3),
        "auc_candidate": round(cand_auc, 5),
        "auc_baseline": round(base_auc, 5),
        "auc_diff": round(auc_diff, 5),
        "params": {"rows": args.rows, "train_rows": train_rows, "features": args.features, "rounds": args.rounds,
                   "workers": cfg.num_workers, "threads_per_worker": cfg.cpus_per_worker,
                   "baseline_threads": threads, "xgb_params": cfg.params},
        "machine": machine(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"  candidate boosting {warm.train_s:.2f} s vs baseline {base_s:.2f} s; start-up cold "
          f"{cold.startup_s:.1f} s, warm {warm.startup_s:.1f} s; auc {cand_auc:.4f} vs {base_auc:.4f}")
    ok_auc = abs(auc_diff) <= AUC_TOLERANCE
    if not ok_auc:
        print(f"AUC check FAILED: |{auc_diff:.4f}| > {AUC_TOLERANCE}")
    if ratio > TARGET:
        print(f"MISSED: ratio {ratio:.2f} is above the target {TARGET}")
    print(f"train_xgboost: ratio {ratio:.2f} (target {TARGET})")
    return 0 if ok_auc else 1


if __name__ == "__main__":
    sys.exit(main())
