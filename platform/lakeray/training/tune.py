"""Hyperparameter search with Ray Tune over a train spec: every trial runs the same code as ``lakeray train``.

``search(settings, tune_spec)`` (Ray connected by the caller) is what ``lakeray tune SPEC.yaml`` runs:

1. :func:`~lakeray.training.tune_spec.resolve_tune_spec` loads the base train spec and checks the space,
   and :func:`~lakeray.training.api.validate` pins the training set: every spec error before any trial;
2. Ray Tune runs a *function* trainable per trial (passing a Trainer to Tuner is deprecated in Ray 2.60).
   A trial builds its TrainSpec (base + sampled values). With one worker it calls the model kind's
   per-worker function (``fit_xgboost`` / ``fit_torch``) right in the trial's own process, with a
   :class:`_TrialContext`: ``progress`` becomes ``ray.tune.report`` (so ASHA sees the metric and can
   stop the trial), ``checkpoint`` a Tune checkpoint, ``resume`` ``ray.tune.get_checkpoint()``; no
   worker group is started. With several workers the trial is the driver of a Ray Train V2 run
   (:func:`~lakeray.training.runtime.launch`, the path of ``lakeray train``): each worker reports
   through :class:`_GroupTrialContext` and Ray's ``TuneReportCallback`` hands rank 0's report to
   the trial, so ASHA stops it the same way (stopping the trial's actor ends its worker group). A
   one-worker trial asks Tune for ``cpus_per_worker`` CPUs; a multi-worker trial for a small driver
   share, its workers' CPUs being one placement group that Ray Train reserves all at once, and the
   default concurrency counts both: trials that do not fit wait in line;
3. the best finished trial's final checkpoint is loaded, scored on the held-out rows and registered
   through :func:`~lakeray.training.tracking.log_training` with the base spec's alias (``challenger``);
   MLflow gets a parent run with one child run per trial (tune_tracking).

The search lives in ``<storage root>/tune_runs/<name>``: Tune's experiment folder (trials, checkpoints,
searcher state) plus ``lakeray_search.json`` (what was logged and registered). ``resume=True`` restores
it with ``Tuner.restore``: finished trials are kept, unfinished ones continue from their checkpoints.
With an object-store root that folder is in the bucket: Tune gets ``storage_filesystem`` (the one Ray
Train gets for ``lakeray train``: it pickles with the credential variable names only), its driver
uploads the experiment state there, trials upload their checkpoints, and lakeray's own files go
through :mod:`lakeray.storage`; ``--resume`` restores from the bucket, on any machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lakeray import storage
from lakeray.errors import ClusterError, ConfigError
from lakeray.training.runtime import WorkerContext, read_state
from lakeray.training.tune_group import GROUP_DRIVER_CPU, TRIAL_RUNS
from lakeray.training.tune_tracking import STATE_FILE, read_search_state, trial_checkpoint, write_search_state
from lakeray.training.tune_spec import TuneSetup, TuneSpec, load_tune_spec, resolve_tune_spec, trial_spec

if TYPE_CHECKING:
    from lakeray.config import Settings
    from lakeray.registry import RegisteredModel
    from lakeray.training.evaluate import Evaluation
    from lakeray.training.spec import TrainPlan

__all__ = ["TuneSpec", "TrialStatus", "TuneReport", "load_tune_spec", "validate_search", "search", "search_folder",
           "check_search_folder", "tune_storage", "trial_cpus", "trial_checkpoint", "read_search_state", "write_search_state",
           "STATE_FILE", "TRIAL_RUNS", "GROUP_DRIVER_CPU"]



# -- inside a trial ---------------------------------------------------------------------------------
class _TrialContext(WorkerContext):
    """A WorkerContext bound to a Tune function trainable (one worker, in the trial's own process).

    The trainers call ``progress`` (metric at a round) and then ``checkpoint`` at the same round. The
    metric is held until that checkpoint call, so each reported round is one ``tune.report``, with a
    Tune checkpoint every ``keep_every`` rounds and at the end (writing the model is what costs).
    """

    def __init__(self, plan: TrainPlan, metric_key: str, keep_every: int, use_gpu: bool) -> None:
        from lakeray.training.runtime import RunFolder

        super().__init__(plan, RunFolder(tempfile.gettempdir(), "lakeray-trial"), 0, 1, use_gpu, 0)
        self.metric_key = metric_key
        self.keep_every = keep_every
        self._pending: tuple[int, dict[str, float]] | None = None

    def restored(self) -> str | None:
        from ray import tune

        found = tune.get_checkpoint()
        if found is None:
            return None
        local = tempfile.mkdtemp(prefix="lakeray-trial-restore-")
        found.to_directory(local)
        return local

    def progress(self, step: int, metrics: dict[str, float], event: str = "step") -> None:
        if event != "step":
            return  # started/resumed events: Tune tracks the trial's state itself
        self.history.append({"step": step, **metrics})
        if self._pending is not None:
            self._report(*self._pending)
        self._pending = (step, metrics)

    def checkpoint(self, step: int, metrics: dict[str, float], write: Callable[[str], None],
                   final: bool = False) -> None:
        if self._pending is not None and self._pending[0] != step:
            self._report(*self._pending)
            self._pending = None
        reported = self._pending[1] if self._pending else {}
        self._pending = None
        if not final and step % self.keep_every:
            self._report(step, reported)
            return
        with tempfile.TemporaryDirectory(prefix="lakeray-trial-ckpt-") as folder:
            self._write_checkpoint(folder, step, metrics, write, final)
            self._report(step, reported, folder, final)

    def _report(self, step: int, metrics: dict[str, float], folder: str | None = None, final: bool = False) -> None:
        from ray import tune

        last = next((h[self.metric_key] for h in reversed(self.history) if self.metric_key in h), None)
        result = {"rounds": step, "final": final, **{k: v for k, v in metrics.items() if k != "elapsed_s"}}
        if self.metric_key not in result and last is not None:
            result[self.metric_key] = last
        checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
        tune.report(result, checkpoint=checkpoint)


def _trial(config: dict[str, Any], plan: TrainPlan, setup: TuneSetup, settings: Settings, folder: str) -> None:
    """A Tune function trainable: the base plan with this trial's values, trained by the kind's fit."""
    from ray import tune

    from lakeray.training.api import model_kind

    spec = trial_spec(plan.spec, config, setup.report_every)
    trial_plan = dataclasses.replace(plan, spec=spec)
    if plan.num_workers > 1:
        from lakeray.training.tune_group import run_group_trial

        run_group_trial(settings, trial_plan, setup, folder)
        return
    found = tune.get_checkpoint()
    if found is not None:
        with found.as_directory() as folder:
            state = read_state(folder)
        if state.get("final"):  # the trial had finished: report it again rather than train on
            tune.report({"rounds": int(state["step"]), "final": True,
                         setup.metric_key: state["history"][-1].get(setup.metric_key) if state["history"] else None},
                        checkpoint=found)
            return
    ctx = _TrialContext(trial_plan, setup.metric_key, setup.checkpoint_every, plan.use_gpu)
    model_kind(spec.model.kind).fit(ctx)


# -- watching the search from the driver ------------------------------------------------------------
@dataclass
class TrialStatus:
    """One trial as the live view and ``--json`` show it."""

    trial_id: str
    config: dict[str, Any]
    state: str  # PENDING, RUNNING, TERMINATED, ERROR, PAUSED
    rounds: int
    metric: float | None
    max_rounds: int
    final: bool = False

    @property
    def stopped_early(self) -> bool:
        """Stopped by the scheduler (or the budget) before its rounds: finished without a final checkpoint."""
        return self.state == "TERMINATED" and not self.final

    def as_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "config": self.config, "state": self.state, "rounds": self.rounds,
                "metric": self.metric, "final": self.final, "stopped_early": self.stopped_early}


# -- the search -------------------------------------------------------------------------------------
@dataclass
class TuneReport:
    name: str
    folder: str
    trials: list[TrialStatus]
    best: TrialStatus
    evaluation: Evaluation
    model: RegisteredModel | None
    parent_run_id: str | None
    rounds_run: int
    rounds_budget: int
    seconds: float
    resumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rounds_saved(self) -> float:
        return 1 - self.rounds_run / self.rounds_budget if self.rounds_budget else 0.0

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "folder": self.folder, "resumed": self.resumed,
                "model": self.model.version_uri if self.model else None,
                "alias": self.model.alias if self.model else None, "parent_run_id": self.parent_run_id,
                "best": self.best.as_dict(), "metrics": {k: round(v, 6) for k, v in self.evaluation.metrics.items()},
                "trials": [t.as_dict() for t in self.trials], "rounds_run": self.rounds_run,
                "rounds_budget": self.rounds_budget, "rounds_saved": round(self.rounds_saved, 4),
                "seconds": round(self.seconds, 2), **self.extra}


def search_folder(settings: Settings, name: str) -> str:
    """``<storage root>/tune_runs/<name>``: a local folder, or a URI in the bucket for an object-store root."""
    folder = storage.join(settings.storage_root, "tune_runs", name)
    return os.path.abspath(folder) if storage.is_local(folder) else folder


def tune_storage(folder: str) -> tuple[Any, str]:
    """(``storage_filesystem``, path) for Tune's RunConfig and ``Tuner.restore``/``can_restore``: (None,
    the folder) locally; for a bucket, the filesystem that pickles with the credential variable NAMES
    (Tune saves it in ``tuner.pkl`` and sends it to every trial) and the ``bucket/key`` path inside it."""
    if storage.is_local(folder):
        return None, folder
    return storage.worker_arrow_fs(folder)


def validate_search(settings: Settings, tune: TuneSpec, where: str = "tune spec",
                    register: bool = True) -> tuple[TuneSetup, TrainPlan]:
    """Every check that needs no cluster: the space, the base spec, the object store (reachable, the
    credentials accepted, the bucket there), the pinned training set, and with ``register`` an MLflow
    store that can work with the storage root (as ``lakeray train``)."""
    from lakeray.training.api import validate

    if register:  # a profile setting: instant, so before the spec's trial runs of XGBoost
        from lakeray.training.tracking import check_store

        check_store(settings)
    setup = resolve_tune_spec(tune, where)
    return setup, validate(settings, setup.base, setup.base_where)


def trial_cpus(plan: TrainPlan) -> float:
    """CPUs one trial holds while it trains: its workers, plus its driver's share for a Ray Train group."""
    if plan.num_workers == 1:
        return float(plan.cpus_per_worker)
    return plan.num_workers * plan.cpus_per_worker + GROUP_DRIVER_CPU


def _max_concurrent(settings: Settings, tune: TuneSpec, plan: TrainPlan, cluster_cpus: float) -> int:
    if tune.max_concurrent:
        return tune.max_concurrent
    # A local Ray reports cores + 2 logical CPUs (DESIGN.md traps): count the physical ones.
    usable = (os.cpu_count() or 1) if settings.profile.ray.address is None else cluster_cpus
    return max(1, int(usable // trial_cpus(plan)))


def _check_fits(plan: TrainPlan, where: str) -> None:
    import ray

    total = ray.cluster_resources()
    need = trial_cpus(plan)
    what = ("scaling.cpus_per_worker of the base spec" if plan.num_workers == 1 else
            f"{plan.num_workers} workers x {plan.cpus_per_worker} CPU(s) + {GROUP_DRIVER_CPU:g} for the trial's driver")
    if need > total.get("CPU", 0):
        raise ClusterError(f"{where}: a trial needs {need:g} CPU(s) ({what}); the Ray cluster has "
                           f"{total.get('CPU', 0):g}, so no trial could ever start",
                           "lower cpus_per_worker or num_workers, or add nodes")
    gpus = plan.num_workers if plan.use_gpu else 0
    if gpus > total.get("GPU", 0):
        raise ClusterError(f"{where}: a trial needs {gpus} GPU(s) (one per worker); the cluster has "
                           f"{total.get('GPU', 0):g}", "set scaling.use_gpu: false or auto, or fewer workers")


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Tune reads a few knobs from the driver's environment when the search starts; set them for it only."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def search(settings: Settings, tune: TuneSpec, where: str = "tune spec", resume: bool = False,
           register: bool = True, on_update: Callable[[list[TrialStatus]], None] | None = None,
           checked: tuple[TuneSetup, TrainPlan] | None = None, start_timeout_s: float | None = None) -> TuneReport:
    """Run (or with ``resume`` continue) the search; register the best trial's model; a report back."""
    from ray import tune as ray_tune

    from lakeray.training.api import prepare
    from lakeray.training.tune_watch import LISTENERS, Listener

    started = time.perf_counter()
    setup, plan = checked or validate_search(settings, tune, where, register)
    plan = prepare(settings, setup.base, setup.base_where, plan)
    folder = check_search_folder(settings, tune.name, resume)
    _check_fits(plan, where)
    start_timeout_s = start_timeout_s or settings.profile.ray.op_timeout_s

    trainable = ray_tune.with_parameters(_trial, plan=plan, setup=setup, settings=settings, folder=folder)
    if plan.num_workers == 1:
        resources = {"CPU": plan.cpus_per_worker, "GPU": 1 if plan.use_gpu else 0}
    else:  # the workers' CPUs/GPUs are Ray Train's placement group, reserved when the trial starts it
        resources = {"CPU": GROUP_DRIVER_CPU}
    trainable = ray_tune.with_resources(trainable, resources)
    listener = Listener(setup, on_update, start_timeout_s,
                         storage.join(folder, TRIAL_RUNS) if plan.num_workers > 1 else None)
    LISTENERS[folder] = listener
    try:
        # TUNE_FORCE_TRIAL_CLEANUP_S: a stopped trial whose actor does not exit gracefully (a
        # multi-worker trial's thread is inside trainer.fit) is killed after 15 s, not Tune's 600 s.
        with _env(TUNE_GLOBAL_CHECKPOINT_S="2", RAY_AIR_NEW_OUTPUT="0", TUNE_FORCE_TRIAL_CLEANUP_S="15"):
            if resume:
                filesystem, path = tune_storage(folder)
                tuner = ray_tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                               storage_filesystem=filesystem)
            else:
                tuner = _new_tuner(settings, setup, plan, trainable, folder)
            fit_started = time.perf_counter()
            results = tuner.fit()
            fit_s = time.perf_counter() - fit_started
    finally:
        LISTENERS.pop(folder, None)
        if plan.num_workers > 1:  # Tune has ended every trial's actor: free what their groups still hold
            deadline = time.monotonic() + 30
            while listener.release([t.trial_id for t in listener.last]) and time.monotonic() < deadline:
                time.sleep(0.5)
    if listener.timed_out and not listener.any_started:
        import ray

        free = ray.available_resources().get("CPU", 0)
        raise ClusterError(f"{where}: no trial started within {start_timeout_s:.0f} s: each needs "
                           f"{trial_cpus(plan):g} CPU(s) and the cluster has {free:g} free",
                           "free CPUs (`ray status`), lower cpus_per_worker, or raise ray.op_timeout_s")
    from lakeray.training.tune_tracking import finish

    report = finish(settings, setup, plan, folder, results, listener.last, register, resume, started)
    report.extra["search_s"] = round(fit_s, 2)  # Tune's fit alone: trials, scheduling, checkpoints
    return report


def check_search_folder(settings: Settings, name: str, resume: bool) -> str:
    """The search's folder, checked against ``resume`` (no Ray needed: the CLI calls it before Ray starts)."""
    from ray.tune import Tuner

    folder = search_folder(settings, name)
    there = storage.is_dir(folder)
    filesystem, path = tune_storage(folder)
    if resume and not (there and Tuner.can_restore(path, storage_filesystem=filesystem)):
        raise ConfigError(f"no search {name!r} to resume under {storage.parent(folder)}",
                          "run it without --resume first (the spec's name is the search's folder)")
    if not resume and there:
        raise ConfigError(f"a search named {name!r} already exists ({folder})",
                          "continue it with --resume, give the spec another name, or delete that folder")
    return folder


def _new_tuner(settings: Settings, setup: TuneSetup, plan: TrainPlan, trainable: Any, folder: str) -> Any:
    import ray
    from ray import tune as ray_tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig

    from lakeray.training.tune_watch import StartStopper, Watch

    tune = setup.tune
    space = {key: rng.tune_domain() for key, rng in tune.space.items()}
    concurrent = _max_concurrent(settings, tune, plan, ray.cluster_resources().get("CPU", 0))
    limit: int | None = concurrent
    if tune.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=tune.search.seed)  # Tune wraps it in a ConcurrencyLimiter
    else:
        from lakeray.training.tune_watch import ResumableGenerator

        # Tune ignores max_concurrent_trials for a SearchAlgorithm: the generator takes the limit itself.
        searcher, limit = ResumableGenerator(random_state=tune.search.seed, max_concurrent=concurrent), None
    scheduler = None
    if tune.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="rounds", max_t=setup.max_rounds, grace_period=tune.scheduler.grace_period,
                                  reduction_factor=tune.scheduler.reduction_factor, brackets=1)
    # On a bucket Tune's driver stages its files locally (Ray's session folder) and uploads them to the
    # search folder; trials upload their checkpoints there themselves, through the same filesystem.
    filesystem, path = tune_storage(folder)
    run_config = RunConfig(
        name=tune.name, storage_path=posixpath.dirname(path), storage_filesystem=filesystem, verbose=0,
        callbacks=[Watch(folder, searcher)],
        stop=StartStopper(folder), failure_config=FailureConfig(max_failures=plan.spec.max_failures),
        # On a bucket every checkpoint is kept: Tune deletes the oldest beyond num_to_keep at once but
        # uploads its state (which names a trial's checkpoint to restore) only every 2 s, in the
        # background; a driver killed in between left a state naming a deleted checkpoint, and --resume
        # failed that trial (seen here with S3Proxy). A local copy of the state takes milliseconds.
        checkpoint_config=CheckpointConfig(num_to_keep=2 if storage.is_local(folder) else None))
    tune_config = TuneConfig(metric=setup.metric_key, mode=setup.mode, search_alg=searcher, scheduler=scheduler,
                             num_samples=tune.num_samples, max_concurrent_trials=limit,
                             time_budget_s=tune.time_budget_s,
                             # A stopped multi-worker trial's actor must go: its thread still drives the
                             # Ray Train run, which ends with the actor that owns its controller.
                             reuse_actors=plan.num_workers == 1)
    return ray_tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
