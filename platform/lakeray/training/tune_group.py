"""Multi-worker trials: a Tune trial that drives a Ray Train V2 run, as ``lakeray train`` does.

A base train spec with ``scaling.num_workers > 1`` makes every trial the driver of a Ray Train run
(:func:`~lakeray.training.runtime.launch`: ``XGBoostTrainer`` / ``TorchTrainer``) named after the
trial, in ``<search folder>/trial_runs/<trial id>`` (in the bucket for an object-store root: every
access through :mod:`lakeray.storage`). Its workers report through
:class:`_GroupTrialContext`: one ``ray.train.report`` of every rank per reported round, handed to the
trial by Ray's ``TuneReportCallback``, so ASHA stops a multi-worker trial as it stops a one-worker one.

Ray Train V2 reserves the workers in a placement group of its own, created by its controller (an
actor the trial owns). When Tune stops a trial, the trial's actor and the controller die, but Ray
keeps a placement group until its creator's *job* has ended as well; Ray Train's own cleaner needs
the dashboard's State API, which a private local Ray runs without. :func:`release_group` frees it
from the search's driver once the controller is dead (the ids come from :class:`_GroupRecorder`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lakeray import storage
from lakeray.training.runtime import RunFolder, _RayTrainContext

if TYPE_CHECKING:
    from lakeray.config import Settings
    from lakeray.training.spec import TrainPlan
    from lakeray.training.tune_spec import TuneSetup

__all__ = ["GROUP_DRIVER_CPU", "TRIAL_RUNS", "GROUP_FILE", "run_group_trial", "group_started", "release_group"]

TRIAL_RUNS = "trial_runs"  # <search folder>/trial_runs/<trial id>: a multi-worker trial's Ray Train run
GROUP_FILE = "group.json"  # in that run folder: the Ray Train controller and its placement group
# What a multi-worker trial's own actor asks Tune for: it only drives the Ray Train controller (0 CPUs)
# and waits, so it must not hold a whole CPU that its workers' placement group then lacks (2 cores:
# two trial drivers holding 1 CPU each would starve both groups forever). Tune refuses 0.
GROUP_DRIVER_CPU = 0.1


class _GroupTrialContext(_RayTrainContext):
    """A worker of a multi-worker trial's Ray Train group. Every reported round is one
    ``ray.train.report`` of every rank (Ray Train's barrier), which the trial's ``TuneReportCallback``
    hands to Tune with ``rounds`` and the metric (ASHA's inputs); rank 0 attaches a checkpoint every
    ``keep_every`` rounds and at the end (its path reaches Tune as ``checkpoint_path``)."""

    def __init__(self, plan: TrainPlan, run: RunFolder, rank: int, world: int, use_gpu: bool, attempt: int, *,
                 metric_key: str, keep_every: int) -> None:
        super().__init__(plan, run, rank, world, use_gpu, attempt)
        self.metric_key = metric_key
        self.keep_every = keep_every

    def checkpoint(self, step: int, metrics: dict[str, float], write: Callable[[str], None],
                   final: bool = False) -> None:
        import ray.train

        result = {"rounds": step, "final": final, **{k: v for k, v in metrics.items() if k != "elapsed_s"}}
        last = next((h[self.metric_key] for h in reversed(self.history) if self.metric_key in h), None)
        if self.metric_key not in result and last is not None:
            result[self.metric_key] = last  # the final report carries the last round's metric
        if self.rank != 0 or (not final and step % self.keep_every):
            ray.train.report(result)
            return
        self._report_with_checkpoint(result, step, metrics, write, final)


def _recorder(run: RunFolder) -> Any:
    """A Ray Train callback (it runs in the controller) that writes the controller's actor id and its
    worker group's placement group to the run folder each time a group starts."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class _GroupRecorder(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group: Any) -> None:
            import ray

            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            body = {"controller": ray.get_runtime_context().get_actor_id(), "placement_group": group.id.hex()}
            storage.write_text_atomic(storage.join(run.path, GROUP_FILE), json.dumps(body))

    return _GroupRecorder()


def run_group_trial(settings: Settings, plan: TrainPlan, setup: TuneSetup, folder: str) -> None:
    """Inside a Tune trial: run the trial's plan on a Ray Train worker group, reporting to the trial.

    A trial that Tune restarts (``--resume``, or a failed trial retried) starts its run again under the
    same name, and Ray Train resumes it from the run's last checkpoint. The trial waits for its workers
    as long as Tune lets it: the search's driver bounds the wait of the whole search instead (no
    trial's workers started within ``ray.op_timeout_s``), so a trial queued behind others is not failed.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lakeray.training.api import model_kind
    from lakeray.training.runtime import launch

    kind = model_kind(plan.spec.model.kind)
    run = RunFolder(storage.join(folder, TRIAL_RUNS), tune.get_context().get_trial_id())
    storage.makedirs(run.path)
    context = functools.partial(_GroupTrialContext, metric_key=setup.metric_key, keep_every=setup.checkpoint_every)
    launch(settings, plan, kind.fit, run, plan.use_gpu, kind.ray_trainer, start_timeout_s=math.inf,
           context=context, callbacks=[TuneReportCallback(), _recorder(run)])


def group_started(runs_root: str, trial_id: str) -> bool:
    """Whether rank 0 of the trial's worker group has started (its placement group was granted)."""
    from lakeray.training.runtime import _read_progress

    return any(e.get("event") == "started" for e in _read_progress(RunFolder(runs_root, trial_id).progress_file))


def release_group(runs_root: str, trial_id: str) -> bool:
    """Remove a finished trial's worker-group placement group once its controller is dead; True when
    nothing is left to release (removed now, removed before, or never created)."""
    import ray
    from ray._private.state import actors
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    path = storage.join(RunFolder(runs_root, trial_id).path, GROUP_FILE)
    try:
        body = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return True
    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(body["placement_group"])))
    if ray.util.placement_group_table(group).get("state") in (None, "REMOVED"):
        return True
    if (actors(actor_id=body["controller"]) or {}).get("State", "DEAD") != "DEAD":
        return False  # still running (or ending its group itself): removing it now would fail its workers
    remove_placement_group(group)
    return True
