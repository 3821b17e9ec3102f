"""XGBoost over one pinned Delta version: the per-worker function that runtime.launch runs.

It avoids the traps measured in DESIGN.md: nothing is reported every boosting round (each Ray Train
report cost ~2 s): the validation metric is computed, the progress line written and the checkpoint
saved every ``checkpoint_every`` rounds. Only early stopping needs the metric every round, and then
XGBoost's own incremental evaluation (cached margins) computes it. Each worker reads its own share of
the files (training.ingest), never through the driver. Strings are categorical features (XGBoost's
native categorical support, codes shared by every worker from the plan's vocabulary).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import xgboost

    from lakeray.training.runtime import WorkerContext
    from lakeray.training.spec import TrainPlan

__all__ = ["fit_xgboost", "xgb_params", "load_booster", "MODEL_FILE"]

MODEL_FILE = "model.ubj"


def xgb_params(plan: TrainPlan, use_gpu: bool) -> dict[str, Any]:
    """The spec's params over lakeray's defaults; the metric is the spec's, the device follows use_gpu."""
    params: dict[str, Any] = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": 6, "eta": 0.1,
                              "seed": plan.spec.model.seed}
    params.update(plan.spec.model.params)
    params["eval_metric"] = plan.spec.metric.name
    params["nthread"] = plan.cpus_per_worker
    params["device"] = "cuda" if use_gpu else "cpu"
    return params


def load_booster(checkpoint_dir: str) -> xgboost.Booster:
    """The booster of a checkpoint, on CPU: the driver never needs a GPU to evaluate or serve."""
    import xgboost

    booster = xgboost.Booster()
    booster.load_model(os.path.join(checkpoint_dir, MODEL_FILE))
    booster.set_param({"device": "cpu"})
    return booster


def _streamed(ctx: WorkerContext, common: dict[str, Any]) -> tuple[Any, Any, tuple[int, int]]:
    """QuantileDMatrix built from batches, one data file at a time: only the quantised matrix (about
    one byte per value) and one file's rows are in memory, never the shard's float32 rows. XGBoost
    reads the batches more than once (sketch, then the index), so each pass reads the files again."""
    import xgboost

    from lakeray.training.data import iter_split

    plan = ctx.plan
    counts = [0, 0]

    class Batches(xgboost.DataIter):
        def __init__(self, held_out: bool) -> None:
            self.held_out = held_out
            self.batches = None
            self.passes = 0  # rows are counted on the first full pass only
            super().__init__()

        def next(self, input_data: Any) -> bool:
            if self.batches is None:
                self.batches = iter_split(plan, ctx.rank, ctx.world, plan.extra.get("shards"), self.held_out)
            for x, y in self.batches:
                if self.passes == 0:
                    counts[self.held_out] += len(y)
                input_data(data=x, label=y, feature_names=common["feature_names"],
                           feature_types=common["feature_types"])
                return True
            self.passes += 1
            return False

        def reset(self) -> None:
            self.batches = None

    categorical = common["enable_categorical"]
    dtrain = xgboost.QuantileDMatrix(Batches(False), nthread=ctx.threads, enable_categorical=categorical)
    dvalid = xgboost.QuantileDMatrix(Batches(True), ref=dtrain, nthread=ctx.threads, enable_categorical=categorical)
    return dtrain, dvalid, (counts[0], counts[1])


def fit_xgboost(ctx: WorkerContext) -> None:
    """Runs on every worker (rank 0 of 1 in a Ray task, or each rank of a Ray Train worker group)."""
    import numpy as np
    import xgboost

    from lakeray.training.data import load_split

    plan = ctx.plan
    started = time.perf_counter()
    common = {"feature_names": plan.features, "enable_categorical": bool(plan.categorical), "nthread": ctx.threads,
              "feature_types": ["c" if f in plan.categorical else "q" for f in plan.features]}
    if plan.extra.get("stream"):
        dtrain, dvalid, rows = _streamed(ctx, common)
    else:
        data = load_split(plan, ctx.rank, ctx.world, plan.extra.get("shards"))
        dtrain = xgboost.QuantileDMatrix(data.x_train, data.y_train, **common)
        dvalid = xgboost.QuantileDMatrix(data.x_valid, data.y_valid, ref=dtrain, **common)
        rows = (len(data.y_train), len(data.y_valid))
        del data  # the quantised matrices are what training needs from here on
    load_s = time.perf_counter() - started

    params = xgb_params(plan, ctx.use_gpu)
    total = plan.spec.model.rounds
    every = plan.spec.checkpoint_every
    metric = plan.spec.metric.name
    resume_dir, done = ctx.resume()
    booster = None
    if resume_dir is not None:
        booster = xgboost.Booster()
        booster.load_model(os.path.join(resume_dir, MODEL_FILE))
    early = plan.spec.early_stopping

    def save(booster: xgboost.Booster) -> Any:
        return lambda folder: booster.save_model(os.path.join(folder, MODEL_FILE))

    class Every(xgboost.callback.TrainingCallback):
        """Every N rounds (and at the last): the validation metric, a progress line, a checkpoint."""

        def after_iteration(self, model: xgboost.Booster, epoch: int, evals_log: dict) -> bool:
            step = done + epoch + 1
            if step % every and step != total:
                return False
            if evals_log.get("valid", {}).get(metric):
                value = float(evals_log["valid"][metric][-1])
            else:  # no per-round evals (no early stopping): evaluate now, on every rank together
                value = float(model.eval_set([(dvalid, "valid")], step).rsplit(":", 1)[1])
            elapsed = time.perf_counter() - boost_started
            ctx.progress(step, {f"valid_{metric}": value, "elapsed_s": round(elapsed, 3)})
            if step != total:
                ctx.checkpoint(step, {f"valid_{metric}": value}, save(model))
            return False

    evals = [(dvalid, "valid")] if early else []
    boost_started = time.perf_counter()
    booster = xgboost.train(params, dtrain, num_boost_round=max(total - done, 0), evals=evals,
                            xgb_model=booster, callbacks=[Every()], verbose_eval=False,
                            early_stopping_rounds=early.rounds if early else None,
                            maximize=plan.spec.metric.direction == "max" if early else None)
    train_s = time.perf_counter() - boost_started

    # The driver sees rank 0's checkpoint only: gather the slowest timings and the row counts.
    sums = np.array([float(rows[0]), float(rows[1])])
    maxima = np.array([train_s, load_s])
    if ctx.world > 1:
        from xgboost import collective

        sums = collective.allreduce(sums, collective.Op.SUM)
        maxima = collective.allreduce(maxima, collective.Op.MAX)
    steps = booster.num_boosted_rounds()
    best = getattr(booster, "best_iteration", None) if early else None
    final = {"train_rows": float(sums[0]), "valid_rows": float(sums[1]), "train_s": float(maxima[0]),
             "load_s": float(maxima[1]), "steps": float(steps)}
    if best is not None:
        final["best_step"] = float(best + 1)
    ctx.checkpoint(steps, final, save(booster), final=True)
