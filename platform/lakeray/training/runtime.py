"""Where a training function runs: one Ray task, or a Ray Train worker group; checkpoints, progress, resume.

A model trainer (xgboost_trainer, torch_trainer) is one function ``fit(ctx: WorkerContext) -> None``
that runs on every worker. It asks ``ctx`` for its rank, its restored checkpoint, and calls
``ctx.checkpoint(step, metrics, write)`` every ``checkpoint_every`` steps and ``ctx.progress`` as it
likes. :func:`launch` runs it:

- **one worker**: a single Ray task (``num_cpus``/``num_gpus`` reserved, ``max_retries`` =
  ``max_failures``). No worker group, no collective, no train context: the start-up is a Ray worker
  process and the imports (measured in bench/train_xgboost.py). A killed task is retried by Ray and
  resumes from the latest ``checkpoint_<step>`` folder of the run.
- **several workers**: a Ray Train V2 trainer (``XGBoostTrainer`` sets up XGBoost's collective,
  ``TorchTrainer`` the DDP process group) with ``FailureConfig(max_failures)``; checkpoints go through
  ``ray.train.report`` into the same run folder, and ``ray.train.get_checkpoint()`` restores them after
  a worker failure, or when ``lakeray train --resume RUN`` starts the run again under the same name.

Every run has a folder ``<storage root>/train_runs/<run id>/``: ``run.json`` (spec, pinned version),
``progress.jsonl`` (one line per reported step, written by rank 0, read by the driver's live view) and
the ``checkpoint_*`` folders. A checkpoint is a folder of model files plus ``lakeray_state.json``
(step, metrics history, final flag), written last so a folder without it is ignored. With an
object-store root the run folder is in the bucket (every access through :mod:`lakeray.storage`), Ray
Train's storage too (``RunConfig.storage_filesystem``), so a worker restarted on another host finds
the checkpoints; workers write their model files to a local temporary folder that is then uploaded.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lakeray import storage
from lakeray.errors import ClusterError, LakerayError

if TYPE_CHECKING:
    from lakeray.config import Settings
    from lakeray.training.spec import TrainPlan

__all__ = ["WorkerContext", "RunFolder", "LaunchResult", "launch", "new_run_id", "run_folder", "STATE_FILE",
           "latest_checkpoint", "read_state"]

STATE_FILE = "lakeray_state.json"
PROGRESS_FILE = "progress.jsonl"
_CHECKPOINT_PREFIX = "checkpoint_"


def _checkpoint_name(step: int, final: bool) -> str:
    # The final checkpoint gets its own name: early stopping can end on a step already checkpointed.
    return f"{_CHECKPOINT_PREFIX}{step:06d}{'_final' if final else ''}"


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"


@dataclass(frozen=True)
class RunFolder:
    """``<storage root>/train_runs/<run id>``: a local folder or an object-store prefix (URIs)."""

    root: str
    run_id: str

    @property
    def path(self) -> str:
        return storage.join(self.root, self.run_id)

    @property
    def progress_file(self) -> str:
        return storage.join(self.path, PROGRESS_FILE)

    @property
    def run_file(self) -> str:
        return storage.join(self.path, "run.json")


def run_folder(settings: Settings, run_id: str) -> RunFolder:
    root = storage.join(settings.storage_root, "train_runs")
    # Ray Train wants an absolute local path; a worker's cwd is not the driver's.
    return RunFolder(os.path.abspath(root) if storage.is_local(root) else root, run_id)


def read_state(checkpoint_dir: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(checkpoint_dir, STATE_FILE)))


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint folder (path or URI) with the highest step (ties: the final, then the newest), or None."""
    best: tuple[int, bool, float, str] | None = None
    for name in storage.list_dir(run_dir):
        full = storage.join(run_dir, name)
        if not name.startswith(_CHECKPOINT_PREFIX) or ".tmp" in name:
            continue
        if not storage.exists(storage.join(full, STATE_FILE)):  # written last: absent while being written
            continue
        state = read_state(full)
        key = (int(state["step"]), bool(state.get("final")), float(state.get("time", 0)), full)
        if best is None or key > best:
            best = key
    return best[3] if best else None


class WorkerContext:
    """What a training function sees on its worker. Subclasses bind it to a Ray task or to Ray Train."""

    def __init__(self, plan: TrainPlan, run: RunFolder, rank: int, world: int, use_gpu: bool, attempt: int):
        self.plan = plan
        self.run = run
        self.rank = rank
        self.world = world
        self.use_gpu = use_gpu
        self.attempt = attempt  # 0 on the first try; restarts count up
        self.threads = plan.cpus_per_worker
        self.history: list[dict[str, Any]] = []

    # -- checkpoints ------------------------------------------------------------------------------
    def restored(self) -> str | None:
        """A local folder holding the checkpoint to resume from (a downloaded copy when the run is on an
        object store), or None to start fresh."""
        raise NotImplementedError

    def resume(self) -> tuple[str | None, int]:
        """The checkpoint folder to resume from and its step, or (None, 0) to start fresh. Restores the
        metrics history and records the resume in the progress file (the driver counts redone steps)."""
        found = self.restored()
        if found is None:
            return None, 0
        state = read_state(found)
        self.history = list(state.get("history", []))
        step = int(state["step"])
        self.progress(step, {}, "resumed")
        return found, step

    def checkpoint(self, step: int, metrics: dict[str, float], write: Callable[[str], None],
                   final: bool = False) -> None:
        """Every rank calls this at the same step; rank 0's ``write(folder)`` saves the model files."""
        raise NotImplementedError

    def _write_checkpoint(self, folder: str, step: int, metrics: dict[str, float], write: Callable[[str], None],
                          final: bool) -> None:
        write(folder)
        state = {"step": step, "final": final, "metrics": metrics, "history": self.history,
                 "attempt": self.attempt, "time": time.time()}
        with open(storage.join(folder, STATE_FILE), "w", encoding="utf-8") as fh:  # a local temporary folder
            json.dump(state, fh)

    # -- progress ---------------------------------------------------------------------------------
    def progress(self, step: int, metrics: dict[str, float], event: str = "step") -> None:
        """Rank 0 appends one line to the run's progress file (cheap: no Ray round trip)."""
        if event == "step":
            self.history.append({"step": step, **metrics})
        if self.rank != 0:
            return
        line = {"event": event, "step": step, "attempt": self.attempt, "time": time.time(), "pid": os.getpid(),
                **metrics}
        storage.append_text(self.run.progress_file, json.dumps(line) + "\n")


class _TaskContext(WorkerContext):
    def restored(self) -> str | None:
        found = latest_checkpoint(self.run.path)
        return storage.get_dir(found) if found else None

    def checkpoint(self, step: int, metrics: dict[str, float], write: Callable[[str], None],
                   final: bool = False) -> None:
        target = storage.join(self.run.path, _checkpoint_name(step, final))
        with tempfile.TemporaryDirectory(prefix="lakeray-ckpt-") as tmp:
            self._write_checkpoint(tmp, step, metrics, write, final)
            storage.put_dir(tmp, target, last=STATE_FILE)  # a restart never sees half a checkpoint
        self.progress(step, metrics, "checkpoint")


class _RayTrainContext(WorkerContext):
    def restored(self) -> str | None:
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            return None
        local = tempfile.mkdtemp(prefix="lakeray-restore-")
        found.to_directory(local)
        return local

    def checkpoint(self, step: int, metrics: dict[str, float], write: Callable[[str], None],
                   final: bool = False) -> None:
        import ray.train

        # ray.train.report is a barrier: every rank reports, rank 0 alone carries the files.
        report = {"step": step, "final": final, **metrics}
        if self.rank != 0:
            ray.train.report(report)
            return
        self._report_with_checkpoint(report, step, metrics, write, final)

    def _report_with_checkpoint(self, report: dict[str, Any], step: int, metrics: dict[str, float],
                                write: Callable[[str], None], final: bool) -> None:
        """Rank 0's report carrying the checkpoint files (written to a temporary folder Ray copies)."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="lakeray-ckpt-") as tmp:
            self._write_checkpoint(tmp, step, metrics, write, final)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=_checkpoint_name(step, final))
        self.progress(step, metrics, "checkpoint")


def _task_entry(fit: Callable[[WorkerContext], None], plan: TrainPlan, run: RunFolder, use_gpu: bool) -> None:
    attempts = storage.join(run.path, ".attempts")
    storage.append_text(attempts, f"{os.getpid()}\n")
    attempt = len(storage.read_text(attempts).split()) - 1
    ctx = _TaskContext(plan, run, 0, 1, use_gpu, attempt)
    ctx.progress(0, {}, "started")
    fit(ctx)


def _train_entry(config: dict[str, Any]) -> None:
    import ray.train

    plan, run = config["plan"], config["run"]
    ctx_info = ray.train.get_context()
    # Each (re)start of the worker group appends one "started" line (rank 0): count the earlier ones.
    attempt = sum(1 for e in _read_progress(run.progress_file) if e["event"] == "started")
    context = config.get("context") or _RayTrainContext  # tune binds the worker's reports to its trial
    ctx = context(plan, run, ctx_info.get_world_rank(), ctx_info.get_world_size(), config["use_gpu"], attempt)
    ctx.progress(0, {}, "started")
    config["fit"](ctx)


@dataclass
class LaunchResult:
    run: RunFolder
    checkpoint_dir: str  # the final checkpoint (model files + state), a local folder (a copy for a bucket run)
    state: dict[str, Any]
    path: str  # "task" or "ray-train"
    fit_s: float
    restarts: int = 0
    redone_steps: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


def _read_progress(path: str) -> list[dict[str, Any]]:
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _restarts(events: list[dict[str, Any]]) -> tuple[int, int]:
    """(restarts, steps redone). A restart that resumed from a checkpoint at step c redid the steps
    between c and the furthest step reported before the failure; one that found no checkpoint (it
    failed before Ray Train registered one) started again from 0 and redid them all."""
    restarts, redone, furthest = 0, 0, 0
    attempt: int | None = None
    pending = False  # a restart whose starting point is not known yet
    for event in events:
        kind = event["event"]
        if kind == "started" and event["attempt"] != attempt:
            if attempt is not None:
                restarts += 1
                pending = True
            attempt = event["attempt"]
        elif kind == "resumed":
            if pending:
                redone += max(furthest - int(event["step"]), 0)
                pending = False
        elif kind in ("step", "checkpoint"):
            if pending:
                redone += furthest
                pending = False
            furthest = max(furthest, int(event["step"]))
    return restarts, redone


@contextmanager
def _watching(progress_file: str, on_event: Callable[[dict[str, Any]], None] | None) -> Iterator[None]:
    """Tail the progress file in a thread while the block runs, handing each new event to ``on_event``."""
    if on_event is None:
        yield
        return
    stop = threading.Event()
    seen = len(_read_progress(progress_file))

    def poll() -> None:
        nonlocal seen
        while True:
            events = _read_progress(progress_file)
            for event in events[seen:]:
                on_event(event)
            seen = len(events)
            if stop.wait(0.5):
                for event in _read_progress(progress_file)[seen:]:
                    on_event(event)
                return

    thread = threading.Thread(target=poll, name="lakeray-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def _check_resources(plan: TrainPlan, use_gpu: bool) -> None:
    import ray

    total = ray.cluster_resources()
    need_cpu = plan.num_workers * plan.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise ClusterError(f"{plan.where}: scaling asks for {plan.num_workers} worker(s) x {plan.cpus_per_worker} "
                           f"CPU(s) = {need_cpu} CPUs; the Ray cluster has {total.get('CPU', 0):g}",
                           "lower scaling.num_workers or cpus_per_worker, or add nodes")
    if use_gpu and plan.num_workers > total.get("GPU", 0):
        raise ClusterError(f"{plan.where}: {plan.num_workers} GPU worker(s) need as many GPUs; the cluster has "
                           f"{total.get('GPU', 0):g}", "set scaling.use_gpu: false or auto")
    strategy = plan.spec.scaling.placement_strategy
    if plan.num_workers > 1 and strategy.startswith("STRICT_"):
        # A strict placement group that cannot be placed waits, it does not fail: check what can be.
        fits = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= plan.cpus_per_worker]
        roomy = [n for n in fits if n["Resources"]["CPU"] >= need_cpu]
        if strategy == "STRICT_SPREAD" and len(fits) < plan.num_workers:
            raise ClusterError(f"{plan.where}: scaling.placement_strategy STRICT_SPREAD needs {plan.num_workers} "
                               f"nodes with {plan.cpus_per_worker} CPU(s) each; the Ray cluster has {len(fits)}",
                               "use SPREAD (different nodes where possible), or add nodes")
        if strategy == "STRICT_PACK" and not roomy:
            raise ClusterError(f"{plan.where}: scaling.placement_strategy STRICT_PACK needs one node with "
                               f"{need_cpu} CPUs; no node of the Ray cluster has that many",
                               "use PACK, or lower scaling.num_workers or cpus_per_worker")


def launch(settings: Settings, plan: TrainPlan, fit: Callable[[WorkerContext], None], run: RunFolder,
           use_gpu: bool, trainer: str = "xgboost", on_event: Callable[[dict[str, Any]], None] | None = None,
           start_timeout_s: float | None = None, context: Callable[..., WorkerContext] | None = None,
           callbacks: list[Any] | None = None) -> LaunchResult:
    """Run ``fit`` on the plan's workers (Ray connected by the caller); the final checkpoint back.

    ``trainer`` picks the Ray Train class for several workers: ``xgboost`` (collective) or ``torch`` (DDP).
    Workers that have not started within ``start_timeout_s`` (default ``ray.op_timeout_s``) fail the run
    with a ClusterError instead of waiting for CPUs that never come. For several workers, ``context``
    (called like the WorkerContext constructor on each worker) and ``callbacks`` (Ray Train callbacks)
    let a Tune trial route the workers' reports to itself (training.tune_group).
    """
    _check_resources(plan, use_gpu)
    storage.makedirs(run.path)
    start_timeout_s = start_timeout_s or settings.profile.ray.op_timeout_s
    started = time.perf_counter()
    with _watching(run.progress_file, on_event):
        if plan.num_workers == 1:
            checkpoint_dir, path = _run_task(plan, fit, run, use_gpu, start_timeout_s), "task"
        else:
            checkpoint_dir, path = _run_ray_train(settings, plan, fit, run, use_gpu, trainer, start_timeout_s,
                                                  context, callbacks), "ray-train"
    fit_s = time.perf_counter() - started
    events = _read_progress(run.progress_file)
    restarts, redone = _restarts(events)
    return LaunchResult(run, checkpoint_dir, read_state(checkpoint_dir), path, fit_s, restarts, redone, events)


def _wait_started(run: RunFolder, done: Callable[[], bool], timeout_s: float, since: float) -> None:
    """Block until a worker wrote "started" (or the work finished); ClusterError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done() or any(e["event"] == "started" and e["time"] >= since for e in _read_progress(run.progress_file)):
            return
        time.sleep(0.2)
    raise ClusterError(f"no training worker started within {timeout_s:.0f} s",
                       "check `ray status` for free CPUs/GPUs, or raise ray.op_timeout_s")


def _run_task(plan: TrainPlan, fit: Callable[[WorkerContext], None], run: RunFolder, use_gpu: bool,
              start_timeout_s: float) -> str:
    import ray

    since = time.time()
    remote = ray.remote(_task_entry).options(
        num_cpus=plan.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_retries=plan.spec.max_failures,
        retry_exceptions=False, name=f"lakeray-train:{run.run_id}")
    ref = remote.remote(fit, plan, run, use_gpu)
    try:
        _wait_started(run, lambda: bool(ray.wait([ref], timeout=0)[0]), start_timeout_s, since)
        ray.get(ref)
    except ClusterError:
        ray.cancel(ref, force=True)
        raise
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), LakerayError) else None
        if cause is not None:
            raise cause from None
        raise ClusterError(f"training {plan.input} failed: {str(exc).strip().splitlines()[-1]}",
                           f"the worker's traceback is in the Ray log; run dir {run.path}") from None
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.TaskCancelledError) as exc:
        raise ClusterError(f"training {plan.input} failed after {plan.spec.max_failures} retries: {exc}",
                           "raise max_failures, or see the Ray log") from None
    final = latest_checkpoint(run.path)
    if final is None or not read_state(final).get("final"):
        raise ClusterError(f"training {plan.input} ended without a final checkpoint", f"see {run.path}")
    return storage.get_dir(final)


def _run_ray_train(settings: Settings, plan: TrainPlan, fit: Callable[[WorkerContext], None], run: RunFolder,
                   use_gpu: bool, trainer: str, start_timeout_s: float,
                   context: Callable[..., WorkerContext] | None = None, callbacks: list[Any] | None = None) -> str:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    if trainer == "torch":
        from ray.train.torch import TorchTrainer as Trainer
    else:
        from ray.train.xgboost import XGBoostTrainer as Trainer
    # On an object store, Ray Train's controller and workers reach the run folder through a filesystem
    # that carries the settings, not the secrets (each process reads them from the variables named).
    filesystem, storage_path = storage.worker_arrow_fs(run.root)
    trainer_obj = Trainer(
        _train_entry,
        train_loop_config={"fit": fit, "plan": plan, "run": run, "use_gpu": use_gpu, "context": context},
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": plan.cpus_per_worker,
                                                           **({"GPU": 1} if use_gpu else {})},
                                     placement_strategy=plan.spec.scaling.placement_strategy),
        run_config=RunConfig(name=run.run_id, storage_path=storage_path,
                             storage_filesystem=None if storage.is_local(run.root) else filesystem,
                             # Ray Train V2 retries a worker group that cannot start (its 60 s start
                             # timeout is a controller failure) without end by default: after a host is
                             # lost and the rest lack the CPUs, the run would wait forever. As many
                             # start retries as worker failures (at least one), then a clear error.
                             failure_config=FailureConfig(max_failures=plan.spec.max_failures,
                                                          controller_failure_limit=max(1, plan.spec.max_failures)),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer_obj.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    since = time.time()
    thread = threading.Thread(target=target, name="lakeray-train-fit", daemon=True)
    thread.start()
    _wait_started(run, lambda: not thread.is_alive(), start_timeout_s, since)
    thread.join()
    if "error" in box:
        err = box["error"]
        inner = _lakeray_cause(err)
        if inner is not None:
            raise inner from None
        raise ClusterError(f"training {plan.input} failed: {str(err).strip().splitlines()[-1][:500]}",
                           f"the worker's traceback is in the Ray log; run dir {run.path}") from None
    result = box["result"]
    if result.checkpoint is None:
        raise ClusterError(f"training {plan.input} ended without a checkpoint", f"see {run.path}")
    if storage.is_local(run.root):
        return result.checkpoint.path
    return result.checkpoint.to_directory(tempfile.mkdtemp(prefix="lakeray-final-"))


def _lakeray_cause(err: BaseException) -> LakerayError | None:
    """A LakerayError raised in a worker, found through Ray's wrappers (TrainingFailedError, RayTaskError)."""
    seen = set()
    stack = [err]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, LakerayError):
            return cur
        stack += [getattr(cur, "cause", None), cur.__cause__, cur.__context__]
        for value in getattr(cur, "worker_failures", {}).values() if hasattr(cur, "worker_failures") else []:
            stack.append(value)
    return None
