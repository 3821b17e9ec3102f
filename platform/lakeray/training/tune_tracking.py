"""After a search: pick the best finished trial, score it, register it; MLflow parent and child runs.

The best trial is the best last-reported metric among trials that finished their rounds (they wrote a
final checkpoint); a trial ASHA stopped early is never registered. Its final checkpoint is loaded as
``lakeray train`` loads one (api.outcome_of), scored on the held-out rows (evaluate) and logged and
registered by tracking.log_training: the registered run is the best trial's child run. Every other
trial gets a light child run (config, metric at every reported round, state). The parent run holds the
space, the best configuration, the rounds run and saved, and ``plots/trials.png``: every trial's
metric over rounds. ``lakeray_search.json`` in the search folder records each step, so a resumed
search neither logs a child twice nor registers the best twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

from lakeray import storage
from lakeray.errors import ClusterError, LakerayError

if TYPE_CHECKING:
    from lakeray.config import Settings
    from lakeray.training.spec import TrainPlan
    from lakeray.training.tune import TrialStatus, TuneReport
    from lakeray.training.tune_spec import TuneSetup

__all__ = ["finish", "trial_checkpoint", "read_search_state", "write_search_state", "STATE_FILE"]

STATE_FILE = "lakeray_search.json"  # in the search folder: what was registered and logged


def _trial_rows(results: Any, setup: TuneSetup, seen: list[TrialStatus]) -> list[tuple[TrialStatus, Any]]:
    from lakeray.training.tune import TrialStatus

    states = {t.trial_id: t.state for t in seen}
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or posixpath.basename(result.path)
        config = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in (result.config or {}).items()}
        value = metrics.get(setup.metric_key)
        state = "ERROR" if result.error is not None else states.get(trial_id, "TERMINATED")
        rows.append((TrialStatus(trial_id, config, state, int(metrics.get("rounds", 0) or 0),
                                 float(value) if value is not None else None,
                                 int(config.get("rounds", setup.base.model.rounds)), bool(metrics.get("final"))),
                     result))
    return rows


def _best(rows: list[tuple[TrialStatus, Any]], setup: TuneSetup, folder: str) -> tuple[TrialStatus, Any]:
    finished = [(t, r) for t, r in rows if t.final and t.metric is not None and trial_checkpoint(r, folder) is not None]
    if not finished:
        errors = [r.error for _, r in rows if r.error is not None]
        cause = next((_lakeray_cause(e) for e in errors if _lakeray_cause(e) is not None), None)
        if cause is not None:
            raise cause
        if errors:
            raise ClusterError(f"{setup.where}: every trial failed; the first: {str(errors[0]).strip().splitlines()[-1][:300]}",
                               f"the trials' tracebacks are in the trial folders of {folder}")
        budget = setup.tune.time_budget_s
        raise ClusterError(f"{setup.where}: no trial finished its rounds"
                           + (f" within time_budget_s {budget:g}" if budget else ""),
                           "raise time_budget_s, or lower the rounds; nothing was registered")
    sign = 1 if setup.mode == "max" else -1
    return max(finished, key=lambda tr: sign * tr[0].metric)


def _lakeray_cause(err: BaseException) -> LakerayError | None:
    from lakeray.training.runtime import _lakeray_cause as find

    return find(err)


def _history(result: Any, metric_key: str) -> list[tuple[int, float]]:
    frame = result.metrics_dataframe
    if frame is None or metric_key not in frame or "rounds" not in frame:
        return []
    points = {}
    for rounds, value in zip(frame["rounds"], frame[metric_key], strict=True):
        if value == value:  # not NaN
            points[int(rounds)] = float(value)
    return sorted(points.items())


def finish(settings: Settings, setup: TuneSetup, plan: TrainPlan, folder: str, results: Any,
           seen: list[TrialStatus], register: bool, resumed: bool, started: float) -> TuneReport:
    from lakeray.training.api import outcome_of
    from lakeray.training.evaluate import evaluate
    from lakeray.training.runtime import LaunchResult, RunFolder, read_state
    from lakeray.training.tune import TRIAL_RUNS, TuneReport
    from lakeray.training.tune_spec import trial_spec

    rows = _trial_rows(results, setup, seen)
    best, best_result = _best(rows, setup, folder)
    trial_plan = dataclasses.replace(plan, spec=trial_spec(plan.spec, best_result.config, setup.report_every))
    # The model files on this machine: the checkpoint itself, or a downloaded copy from the bucket.
    checkpoint_dir = storage.get_dir(trial_checkpoint(best_result, folder))
    # A multi-worker trial's model files are its Ray Train run's; a one-worker trial's, Tune's trial folder.
    run = RunFolder(storage.join(folder, TRIAL_RUNS), best.trial_id) if plan.num_workers > 1 else \
        RunFolder(folder, posixpath.basename(best_result.path))
    try:
        launched = LaunchResult(run, checkpoint_dir, read_state(checkpoint_dir),
                                "tune" if plan.num_workers == 1 else "tune-ray-train",
                                float(best_result.metrics.get("time_total_s", 0.0)))
        outcome = outcome_of(trial_plan, launched)
        outcome.run_id = f"{setup.tune.name}-{best.trial_id}"
        evaluation = evaluate(trial_plan, lambda x: _predict(outcome, x))
        state = read_search_state(folder)
        model, parent = None, state.get("parent_run_id")
        if register:
            model, parent = _log(settings, setup, folder, rows, best, outcome, evaluation, state)
    finally:
        if not storage.is_local(folder):
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    rounds_run = sum(t.rounds for t, _ in rows)
    rounds_budget = sum(t.max_rounds for t, _ in rows)
    write_search_state(folder, {**read_search_state(folder), "best_trial": best.trial_id, "rounds_run": rounds_run,
                                "rounds_budget": rounds_budget})
    return TuneReport(setup.tune.name, folder, [t for t, _ in rows], best, evaluation, model, parent, rounds_run,
                      rounds_budget, time.perf_counter() - started, resumed,
                      {"metric": setup.metric, "mode": setup.mode, "input": plan.input, "workers": plan.num_workers,
                       "held_out": round(evaluation.metrics[setup.metric], 6)})


def _predict(outcome: Any, x: Any) -> Any:
    from lakeray.training.api import model_kind

    return model_kind(outcome.kind).predict(outcome.model, x)


def _log(settings: Settings, setup: TuneSetup, folder: str, rows: list[tuple[TrialStatus, Any]],
         best: TrialStatus, outcome: Any, evaluation: Any, state: dict[str, Any]) -> tuple[Any, str]:
    """Register the best (once), then the parent run and one child run per other trial (each once)."""
    from lakeray.registry import RegisteredModel, mlflow_client
    from lakeray.training.tracking import log_training

    client = mlflow_client(settings)
    if settings.profile.storage.is_object_store:
        # The parent run's artifacts go to the bucket through boto3 even when a resumed search has
        # registered the best before (log_training, which sets this too, is then not called).
        storage.use_for_boto3(settings.profile.storage)
    if state.get("registered"):
        model = RegisteredModel(**state["registered"])
    else:
        model = log_training(settings, outcome, evaluation)
        state["registered"] = dataclasses.asdict(model)
        write_search_state(folder, state)
    if not state.get("parent_run_id"):
        experiment = client.get_experiment_by_name(settings.profile.mlflow.experiment)
        parent = client.create_run(experiment.experiment_id, run_name=setup.tune.name,
                                   tags={"lakeray.kind": "tune", "lakeray.search_folder": folder,
                                         "lakeray.input": outcome.plan.input})
        state["parent_run_id"] = parent.info.run_id
        write_search_state(folder, state)
    parent_id = state["parent_run_id"]
    client.set_tag(model.run_id, "mlflow.parentRunId", parent_id)
    client.set_tag(model.run_id, "lakeray.trial_id", best.trial_id)
    logged = set(state.get("children", []))
    for trial, result in rows:
        if trial.trial_id in logged or trial.trial_id == best.trial_id:
            continue
        _log_child(client, parent_id, setup, trial, result)
        logged.add(trial.trial_id)
        state["children"] = sorted(logged)
        write_search_state(folder, state)
    _log_parent(client, parent_id, setup, rows, best, model, evaluation)
    return model, parent_id


def _log_child(client: Any, parent_id: str, setup: TuneSetup, trial: TrialStatus, result: Any) -> None:
    from mlflow.entities import Metric, Param

    experiment_id = client.get_run(parent_id).info.experiment_id
    run = client.create_run(experiment_id, run_name=f"{setup.tune.name}-{trial.trial_id}",
                            tags={"mlflow.parentRunId": parent_id, "lakeray.trial_id": trial.trial_id,
                                  "lakeray.trial_state": trial.state,
                                  "lakeray.stopped_early": str(trial.stopped_early).lower()})
    now = int(time.time() * 1000)
    metrics = [Metric(setup.metric_key, value, now, rounds) for rounds, value in _history(result, setup.metric_key)]
    metrics.append(Metric("rounds", float(trial.rounds), now, 0))
    params = [Param(k, str(v)) for k, v in trial.config.items()]
    for i in range(0, max(len(metrics), 1), 900):  # MLflow takes at most 1,000 entries per batch
        client.log_batch(run.info.run_id, metrics=metrics[i:i + 900], params=params if i == 0 else [])
    client.set_terminated(run.info.run_id, "FAILED" if trial.state == "ERROR" else "FINISHED")


def _log_parent(client: Any, parent_id: str, setup: TuneSetup, rows: list[tuple[TrialStatus, Any]],
                best: TrialStatus, model: Any, evaluation: Any) -> None:
    import json

    from mlflow.entities import Metric, Param

    tune = setup.tune
    now = int(time.time() * 1000)
    rounds_run = sum(t.rounds for t, _ in rows)
    budget = sum(t.max_rounds for t, _ in rows)
    params = [Param("search", tune.search.algorithm), Param("seed", str(tune.search.seed)),
              Param("scheduler", tune.scheduler.kind), Param("num_samples", str(tune.num_samples)),
              Param("metric", setup.metric_key), Param("mode", setup.mode)]
    existing = client.get_run(parent_id).data.params
    metrics = [Metric(f"best_{setup.metric_key}", float(best.metric), now, 0),
               Metric(f"held_out_{setup.metric}", float(evaluation.metrics[setup.metric]), now, 0),
               Metric("trials", float(len(rows)), now, 0), Metric("rounds_run", float(rounds_run), now, 0),
               Metric("rounds_budget", float(budget), now, 0),
               Metric("rounds_saved", 1 - rounds_run / budget if budget else 0.0, now, 0)]
    client.log_batch(parent_id, metrics=metrics, params=[p for p in params if p.key not in existing])
    client.set_tag(parent_id, "lakeray.best_trial", best.trial_id)
    client.set_tag(parent_id, "lakeray.model", model.version_uri)
    client.log_dict(parent_id, {"trial_id": best.trial_id, "config": best.config, "metric": best.metric,
                                "model": model.version_uri}, "best_config.json")
    client.log_dict(parent_id, json.loads(tune.model_dump_json(by_alias=True)), "tune_spec.json")
    with tempfile.TemporaryDirectory(prefix="lakeray-tune-plot-") as folder:
        path = os.path.join(folder, "trials.png")
        _plot(path, setup, rows, best)
        client.log_artifact(parent_id, path, "plots")
    client.set_terminated(parent_id, "FINISHED")


def _plot(path: str, setup: TuneSetup, rows: list[tuple[TrialStatus, Any]], best: TrialStatus) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.6), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=f"{setup.tune.name}: {setup.metric_key} of every trial", xlabel="round", ylabel=setup.metric_key)
    ax.grid(alpha=0.3)
    for trial, result in rows:
        points = _history(result, setup.metric_key)
        if not points:
            continue
        is_best = trial.trial_id == best.trial_id
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=2.5,
                linewidth=2.4 if is_best else 1.0, alpha=1.0 if is_best else 0.55, zorder=3 if is_best else 2,
                label=f"best {trial.trial_id}" if is_best else None)
    ax.legend(loc="best")
    fig.savefig(path)


def trial_checkpoint(result: Any, folder: str | None = None) -> str | None:
    """Where a trial's last checkpoint is: Tune's own (one-worker trials), or the Ray Train checkpoint a
    multi-worker trial reported (``checkpoint_path``, set by TuneReportCallback). A local folder, or
    for a search in a bucket (``folder`` a URI) the checkpoint's URI: Tune's paths there are
    ``bucket/key``, without the scheme."""
    if result.checkpoint is not None:
        path = result.checkpoint.path
    else:
        path = (result.metrics or {}).get("checkpoint_path")
    if not path:
        return None
    if folder is not None and not storage.is_local(folder):
        path = f"{storage.scheme(folder)}://{path.lstrip('/')}"
    if result.checkpoint is not None:
        return path
    return path if storage.is_dir(path) else None


def read_search_state(folder: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(storage.join(folder, STATE_FILE)))
    except FileNotFoundError:
        return {}


def write_search_state(folder: str, state: dict[str, Any]) -> None:
    storage.write_text_atomic(storage.join(folder, STATE_FILE), json.dumps(state, indent=2))
