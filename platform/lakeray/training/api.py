"""One call from a train spec to a registered model: plan, launch, evaluate, log, register.

``train(settings, spec)`` (Ray connected by the caller) is what ``lakeray train SPEC.yaml`` runs:

1. :func:`~lakeray.training.spec.plan_training` pins the training set and validates the spec;
2. the GPU choice is made against the cluster (``use_gpu: true`` without GPUs fails here);
3. :func:`~lakeray.training.runtime.launch` runs the model kind's worker function (one Ray task, or a
   Ray Train worker group), with checkpoints and restarts;
4. the final checkpoint is loaded on the driver (CPU), scored on the held-out rows;
5. MLflow gets params, metrics, plots, the model and its lineage; the new version gets the spec's
   alias (``challenger`` by default; ``lakeray models promote`` moves ``champion``).

``resume(settings, run_id)`` picks up a run whose driver died, from the run folder's ``run.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lakeray.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from lakeray.config import Settings
    from lakeray.registry import RegisteredModel
    from lakeray.training.evaluate import Evaluation
    from lakeray.training.runtime import LaunchResult, RunFolder, WorkerContext
    from lakeray.training.spec import TrainPlan, TrainSpec

__all__ = ["TrainOutcome", "TrainReport", "ModelKind", "model_kind", "validate", "prepare", "train", "resume",
           "load_run_spec", "train_and_register", "outcome_of"]


@dataclass(frozen=True)
class ModelKind:
    """How lakeray fits, loads and scores one kind of model."""

    name: str
    fit: Callable[[WorkerContext], None]  # the per-worker function
    load: Callable[[str, TrainPlan], Any]  # checkpoint folder → model on CPU
    predict: Callable[[Any, Any], Any]  # (model, float32 matrix) → P(label = 1)
    ray_trainer: str  # the Ray Train class for several workers: "xgboost" or "torch"


def model_kind(name: str) -> ModelKind:
    if name == "xgboost":
        from lakeray.training.xgboost_trainer import fit_xgboost, load_booster

        return ModelKind("xgboost", fit_xgboost, lambda ckpt, plan: load_booster(ckpt),
                         lambda booster, x: booster.inplace_predict(x), "xgboost")
    if name == "torch":
        from lakeray.training.torch_trainer import fit_torch, load_torch, predict_torch

        return ModelKind("torch", fit_torch, load_torch, predict_torch, "torch")
    raise ConfigError(f"unknown model kind {name!r}", "use xgboost or torch")


@dataclass
class TrainOutcome:
    """A trained model back on the driver, with where it came from and what each part cost."""

    plan: TrainPlan
    kind: str
    model: Any  # xgboost.Booster or torch.nn.Module, on CPU
    run_id: str
    run_dir: str
    checkpoint_dir: str
    path: str  # "task" (one worker) or "ray-train"
    use_gpu: bool
    steps: int  # rounds / epochs in the final model
    best_step: int | None
    history: list[dict[str, Any]]  # one entry per reported step: {"step": n, "valid_<metric>": x, ...}
    train_rows: int
    valid_rows: int
    train_s: float  # slowest worker's training loop
    load_s: float  # slowest worker's Delta read + matrix
    fit_s: float  # launch → final checkpoint, start-up included
    restarts: int = 0
    redone_steps: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def startup_s(self) -> float:
        """Fixed cost around the training loop: worker start, imports, data load, checkpoint hand-back."""
        return max(self.fit_s - self.train_s, 0.0)


@dataclass(frozen=True)
class TrainReport:
    outcome: TrainOutcome
    evaluation: Evaluation
    model: RegisteredModel | None
    seconds: float

    @property
    def metric(self) -> float:
        return self.evaluation.metrics[self.outcome.plan.spec.metric.name]

    def summary(self) -> dict[str, Any]:
        o = self.outcome
        return {
            "run_id": o.run_id, "model": self.model.version_uri if self.model else None,
            "alias": self.model.alias if self.model else None, "input": o.plan.input, "kind": o.kind,
            "path": o.path, "workers": o.plan.num_workers, "use_gpu": o.use_gpu, "steps": o.steps,
            "best_step": o.best_step, "metrics": {k: round(v, 6) for k, v in self.evaluation.metrics.items()},
            "train_rows": o.train_rows, "valid_rows": o.valid_rows, "train_s": round(o.train_s, 2),
            "startup_s": round(o.startup_s, 2), "load_s": round(o.load_s, 2), "fit_s": round(o.fit_s, 2),
            "restarts": o.restarts, "redone_steps": o.redone_steps, "seconds": round(self.seconds, 2),
            "ingest": "stream" if o.plan.extra.get("stream") else "memory",
            "features": o.plan.features, "skipped_columns": o.plan.skipped,
        }


def validate(settings: Settings, spec: TrainSpec, where: str = "train spec") -> TrainPlan:
    """Every check that needs no cluster: the object store, the model module, the pinned version, columns,
    types, split."""
    from lakeray import storage
    from lakeray.training.spec import plan_training

    if settings.profile.storage.is_object_store:
        # Wrong credentials or a missing bucket would otherwise read as a missing table.
        storage.check_access(settings.storage_root, settings.profile.storage)

    if spec.model.kind == "torch":
        from lakeray.training.torch_trainer import validate_torch_spec

        validate_torch_spec(spec, where)  # the module imports and builds, before any data is read
    return plan_training(settings, spec, where)


def prepare(settings: Settings, spec: TrainSpec, where: str = "train spec", plan: TrainPlan | None = None) -> TrainPlan:
    """The validated plan (``plan`` when already validated), with the GPU choice made against the
    connected Ray cluster and the file shards of each worker."""
    import ray

    from lakeray.training.spec import resolve_gpu

    from lakeray.training.ingest import table_shards

    plan = plan or validate(settings, spec, where)
    use_gpu = resolve_gpu(spec.scaling.use_gpu, ray.cluster_resources().get("GPU", 0), spec.scaling.num_workers, where)
    extra = dict(plan.extra, stream=_ingest(plan, ray.cluster_resources()))
    if plan.num_workers > 1:
        extra["shards"] = table_shards(plan.path, plan.version, plan.num_workers)
    return dataclasses.replace(plan, use_gpu=use_gpu, extra=extra)


def _ingest(plan: TrainPlan, resources: dict[str, float]) -> bool:
    """Whether workers stream their rows (True) or hold them (False). A shard that would not fit in
    half a worker's memory is streamed file by file into XGBoost's quantised matrix (~1 byte per value
    instead of 4, plus one file's rows); when even that would not fit, or the model cannot stream
    (torch), it is refused here, with the numbers, rather than killed by the OOM killer mid-run."""
    from lakeray.lakehouse.delta import table_bytes
    from lakeray.training.ingest import DECODED_EXPANSION, should_stream

    mode = plan.spec.ingest
    memory = resources.get("memory", 0)
    if mode != "auto" or memory <= 0:
        return mode == "stream"  # a cluster that does not report memory: nothing to compare with
    per_worker = memory / plan.num_workers
    size = table_bytes(plan.path, plan.version)
    if not should_stream(size, plan.num_workers, int(per_worker)):
        return False
    quantised_fits = size * DECODED_EXPANSION / 4 / plan.num_workers <= per_worker / 2
    if plan.spec.model.kind == "xgboost" and quantised_fits:
        return True
    gib = 1 << 30
    raise ClusterError(
        f"{plan.where}: {plan.input} is {size / gib:.1f} GiB of parquet (~{size * DECODED_EXPANSION / gib:.1f} GiB in "
        f"memory); split over {plan.num_workers} worker(s) with ~{per_worker / gib:.1f} GiB each, a shard would "
        f"not fit in half a worker's memory{'' if plan.spec.model.kind == 'xgboost' else ' (torch cannot stream)'}",
        "raise scaling.num_workers or add memory/nodes")


def _write_run_file(run: RunFolder, plan: TrainPlan) -> None:
    from lakeray import storage

    storage.makedirs(run.path)
    pinned = plan.spec.model_copy(update={"training_set": plan.input})
    body = {"run_id": run.run_id, "where": plan.where, "spec": pinned.model_dump(mode="json"),
            "spec_hash": plan.spec.digest(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_text_atomic(run.run_file, json.dumps(body, indent=2))


def _outcome(plan: TrainPlan, kind: ModelKind, launched: LaunchResult) -> TrainOutcome:
    state = launched.state
    m = state["metrics"]
    return TrainOutcome(
        plan=plan, kind=kind.name, model=kind.load(launched.checkpoint_dir, plan), run_id=launched.run.run_id,
        run_dir=launched.run.path, checkpoint_dir=launched.checkpoint_dir, path=launched.path, use_gpu=plan.use_gpu,
        steps=int(m["steps"]), best_step=int(m["best_step"]) if "best_step" in m else None,
        history=list(state.get("history", [])), train_rows=int(m["train_rows"]), valid_rows=int(m["valid_rows"]),
        train_s=float(m["train_s"]), load_s=float(m["load_s"]), fit_s=launched.fit_s, restarts=launched.restarts,
        redone_steps=launched.redone_steps, params=dict(m.get("params", {})) or _params(plan))


def outcome_of(plan: TrainPlan, launched: LaunchResult) -> TrainOutcome:
    """The TrainOutcome of a finished launch (or of a Tune trial's final checkpoint): the model loaded on CPU."""
    return _outcome(plan, model_kind(plan.spec.model.kind), launched)


def _params(plan: TrainPlan) -> dict[str, Any]:
    if plan.spec.model.kind == "xgboost":
        from lakeray.training.xgboost_trainer import xgb_params

        return xgb_params(plan, plan.use_gpu)
    model = plan.spec.model
    return {**model.params, "epochs": model.rounds, "batch_size": model.batch_size,
            "learning_rate": model.learning_rate, "seed": model.seed, "module": model.module}


def _run(settings: Settings, plan: TrainPlan, run: RunFolder, register: bool,
         on_event: Callable[[dict[str, Any]], None] | None) -> TrainReport:
    from lakeray.training.evaluate import evaluate
    from lakeray.training.runtime import launch

    started = time.perf_counter()
    kind = model_kind(plan.spec.model.kind)
    if register:
        from lakeray.training.tracking import check_store

        check_store(settings)  # before the cluster time, not after it
    _write_run_file(run, plan)
    launched = launch(settings, plan, kind.fit, run, plan.use_gpu, kind.ray_trainer, on_event)
    outcome = _outcome(plan, kind, launched)
    evaluation = evaluate(plan, lambda x: kind.predict(outcome.model, x))
    model = None
    if register:
        from lakeray.training.tracking import log_training

        model = log_training(settings, outcome, evaluation)
    return TrainReport(outcome, evaluation, model, time.perf_counter() - started)


def train(settings: Settings, spec: TrainSpec, where: str = "train spec", register: bool = True,
          on_event: Callable[[dict[str, Any]], None] | None = None, run_id: str | None = None,
          plan: TrainPlan | None = None) -> TrainReport:
    """Validate (unless ``plan`` is given), train on Ray (connected by the caller), evaluate, log, register."""
    from lakeray.training.runtime import new_run_id, run_folder

    plan = prepare(settings, spec, where, plan)
    return _run(settings, plan, run_folder(settings, run_id or new_run_id(spec.name)), register, on_event)


def load_run_spec(settings: Settings, run_id: str) -> tuple[TrainSpec, str]:
    """The spec of run ``run_id`` pinned to its table version, and where it came from."""
    from lakeray import storage
    from lakeray.training.runtime import run_folder
    from lakeray.training.spec import TrainSpec

    run = run_folder(settings, run_id)
    if not storage.exists(run.run_file):
        raise ConfigError(f"no training run {run_id!r} under {run.root}",
                          "pass a run id printed by `lakeray train` (folders of storage root/train_runs)")
    body = json.loads(storage.read_text(run.run_file))
    return TrainSpec.parse(body["spec"], f"{run.run_file}: spec"), body.get("where", run.run_file)


def resume(settings: Settings, run_id: str, register: bool = True,
           on_event: Callable[[dict[str, Any]], None] | None = None, plan: TrainPlan | None = None) -> TrainReport:
    """Continue run ``run_id`` from its last checkpoint (same pinned version, same spec)."""
    from lakeray.training.runtime import run_folder

    spec, where = load_run_spec(settings, run_id)
    plan = prepare(settings, spec, where, plan)
    return _run(settings, plan, run_folder(settings, run_id), register, on_event)


def train_and_register(settings: Settings, spec: TrainSpec, where: str = "train spec") -> TrainReport:
    """``train`` with registration (the name the demo and older callers use)."""
    return train(settings, spec, where)
