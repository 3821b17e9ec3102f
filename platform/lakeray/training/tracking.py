"""MLflow: log a training run with its lineage, plots and model; register it; point an alias at it.

Lineage tags are portable: table names, versions and storage-relative paths (never this machine's
absolute paths), so a registry copied to another machine or read from a cluster still leads back to
the exact rows: ``lakeray.input`` (training set@version), ``lakeray.manifest`` (its manifest, relative
to the storage root), ``lakeray.inputs`` (every table@version of the manifest), ``lakeray.code_versions``
(the feature job code version that wrote each of those versions, read from its Delta commit),
``lakeray.spec_hash``. The run also carries ``lakeray/spec.json`` (the spec pinned to table@version:
enough to rebuild the held-out rows), ``lakeray/features.json``, ``lakeray/feature_importance.json``,
PNG plots under ``plots/`` (learning curve, feature importance, ROC, precision-recall) and the model
with a named-column signature and an input example of real held-out rows.

Registration is all-or-nothing: if setting the alias fails, the new model version is deleted again.
:mod:`lakeray.training.lineage` reads all of it back.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

from lakeray import storage
from lakeray.errors import ConfigError, ModelRegistryError
from lakeray.registry import RegisteredModel, mlflow_client
from lakeray.training.lineage import commit_lineage, manifest_relpath

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from lakeray.config import Settings
    from lakeray.training.api import TrainOutcome
    from lakeray.training.evaluate import Evaluation
    from lakeray.training.spec import TrainPlan

__all__ = ["log_training", "lineage_tags", "load_model", "check_store", "artifact_location"]

_EXAMPLE_ROWS = 5
_SAMPLE_ROWS = 2_000  # held-out rows kept for the input example and permutation importance
_TOP_FEATURES = 20


def check_store(settings: Settings) -> None:
    """ConfigError before any training when the MLflow store cannot work with this storage root: the
    default SQLite file cannot live in a bucket."""
    if not storage.is_local(settings.storage_root) and not settings.profile.mlflow.tracking_uri:
        raise ConfigError(f"storage.root {settings.storage_root} is an object store and mlflow.tracking_uri is "
                          "empty: the default SQLite registry cannot live in a bucket",
                          "set mlflow.tracking_uri (sqlite:////local/path/mlflow.db or an MLflow server's "
                          "http(s):// URL); artifacts still go to the bucket")


def artifact_location(settings: Settings) -> str | None:
    """Where a new experiment keeps its artifacts: ``<root>/mlartifacts`` (a bucket's ``s3://`` URI for an
    object-store root); None lets an MLflow server decide."""
    tracking = settings.profile.mlflow.tracking_uri or ""
    if not storage.is_local(settings.storage_root):
        return None if tracking.startswith(("http://", "https://")) else storage.to_arrow(settings.mlflow_artifact_root)
    # With a SQLite store MLflow would put artifacts in ./mlruns of whatever the cwd is: pin them.
    return None if tracking else f"file://{settings.mlflow_artifact_root}"


def _experiment_id(client: Any, settings: Settings) -> str:
    name = settings.profile.mlflow.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(settings))


def _relative(settings: Settings, path: str) -> str:
    root = settings.storage_root
    if "://" in root or "://" in path:
        return path
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return path if rel.startswith("..") else rel


def lineage_tags(settings: Settings, outcome: TrainOutcome) -> dict[str, str]:
    import lakeray

    plan = outcome.plan
    manifest = plan.manifest or {}
    inputs = {str(t): int(v) for t, v in manifest.get("inputs", {}).items()}
    codes = {t: commit_lineage(settings, t, v).get("code_version") for t, v in inputs.items()}
    return {
        "lakeray.input": plan.input,
        "lakeray.input_path": _relative(settings, plan.path),
        "lakeray.input_version": str(plan.version),
        "lakeray.manifest": manifest_relpath(plan.table, plan.version) if manifest else "",
        "lakeray.inputs": json.dumps(inputs, sort_keys=True),
        "lakeray.training_set_hash": str(manifest.get("content_hash", "")),
        "lakeray.code_versions": json.dumps({t: c for t, c in codes.items() if c}, sort_keys=True),
        "lakeray.spec_hash": plan.spec.digest(),
        "lakeray.spec_name": plan.spec.name,
        "lakeray.run_dir": _relative(settings, outcome.run_dir),
        "lakeray.label": plan.label,
        "lakeray.kind": outcome.kind,
        "lakeray.trainer": f"{outcome.kind}/{outcome.path}",
        "lakeray.metric": plan.spec.metric.name,
        "lakeray.metric_direction": plan.spec.metric.direction,
        "lakeray.version": lakeray.__version__,
        "lakeray.split": json.dumps({"kind": plan.split_kind, "column": plan.split_column,
                                     "fraction": plan.split_fraction, "cutoff_us": plan.split_cutoff_us}),
    }


def _held_out_sample(plan: TrainPlan, limit: int = _SAMPLE_ROWS) -> tuple[pd.DataFrame, np.ndarray]:
    """The first ``limit`` held-out rows, encoded as the model sees them (float32, feature names as
    columns), with their labels: real rows for the input example, not zeros."""
    import numpy as np
    import pandas as pd

    from lakeray.training.data import encode, iter_validation, labels

    xs, ys, have = [], [], 0
    for table in iter_validation(plan):
        if table.num_rows:
            table = table.slice(0, limit - have)
            xs.append(encode(table, plan))
            ys.append(labels(table, plan))
            have += table.num_rows
        if have >= limit:
            break
    x = np.concatenate(xs) if xs else np.empty((0, len(plan.features)), dtype=np.float32)
    return pd.DataFrame(x, columns=plan.features), (np.concatenate(ys) if ys else np.empty(0, dtype=np.float32))


def _signature(features: list[str]) -> Any:
    """Named double columns (float32 and float64 frames both pass MLflow's schema check; NaN is a
    missing value), one float32 score per row."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([ColSpec("double", name) for name in features]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]))


def _importance(outcome: TrainOutcome, sample: pd.DataFrame, y: np.ndarray) -> dict[str, Any]:
    """XGBoost: total gain per feature. Torch has no built-in importance: the drop in AUC on the
    held-out sample when one feature's column is shuffled (permutation importance)."""
    import numpy as np

    if outcome.kind == "xgboost":
        scores = outcome.model.get_score(importance_type="gain")
        return {"method": "gain", "values": {f: float(scores.get(f, 0.0)) for f in outcome.plan.features}}
    from sklearn.metrics import roc_auc_score

    from lakeray.training.api import model_kind

    predict = model_kind(outcome.kind).predict
    x = sample.to_numpy(dtype=np.float32)
    if len(set(y.tolist())) < 2:
        return {"method": "permutation_auc", "values": {}}
    base = roc_auc_score(y, np.asarray(predict(outcome.model, x)).reshape(-1))
    rng = np.random.default_rng(outcome.plan.spec.model.seed)
    values = {}
    for j, name in enumerate(outcome.plan.features):
        shuffled = x.copy()
        shuffled[:, j] = rng.permutation(shuffled[:, j])
        values[name] = float(base - roc_auc_score(y, np.asarray(predict(outcome.model, shuffled)).reshape(-1)))
    return {"method": "permutation_auc", "values": values}


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    # A bare Figure on the Agg canvas: no pyplot, so the process's global backend is never touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _write_plots(folder: str, outcome: TrainOutcome, evaluation: Evaluation, importance: dict[str, Any]
                 ) -> list[str]:
    """learning_curve, feature_importance, roc_curve, pr_curve as PNG files in ``folder``."""
    import numpy as np
    from sklearn.metrics import precision_recall_curve, roc_curve

    written = []
    unit = "round" if outcome.kind == "xgboost" else "epoch"
    series = sorted({k for point in outcome.history for k in point if k.startswith(("valid_", "train_"))})
    if series:
        fig, ax = _figure(f"Learning curve ({outcome.plan.spec.metric.name})", unit, "metric")
        for key in series:
            points = [(p["step"], p[key]) for p in outcome.history if key in p]
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=key)
        if outcome.best_step:
            ax.axvline(outcome.best_step, color="grey", linestyle="--", label=f"best {unit} {outcome.best_step}")
        ax.legend()
        fig.savefig(os.path.join(folder, "learning_curve.png"))
        written.append("learning_curve.png")
    top = sorted(importance["values"].items(), key=lambda kv: kv[1], reverse=True)[:_TOP_FEATURES]
    if top:
        label = {"gain": "average gain per split", "permutation_auc": "AUC drop when shuffled"}[importance["method"]]
        fig, ax = _figure(f"Feature importance (top {len(top)}, {importance['method']})", label, "")
        ax.barh([n for n, _ in reversed(top)], [v for _, v in reversed(top)])
        fig.savefig(os.path.join(folder, "feature_importance.png"))
        written.append("feature_importance.png")
    y, s = evaluation.y_true, evaluation.y_score
    if len(set(np.asarray(y).tolist())) == 2 and np.all(np.isfinite(s)):
        fpr, tpr, _ = roc_curve(y, s)
        fig, ax = _figure("ROC curve (held-out rows)", "false positive rate", "true positive rate")
        ax.plot(fpr, tpr, label=f"AUC {evaluation.metrics['auc']:.4f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="chance")
        ax.legend(loc="lower right")
        fig.savefig(os.path.join(folder, "roc_curve.png"))
        precision, recall, _ = precision_recall_curve(y, s)
        fig, ax = _figure("Precision-recall curve (held-out rows)", "recall", "precision")
        ax.plot(recall, precision, label=f"AP {evaluation.metrics['aucpr']:.4f}")
        ax.axhline(float(np.mean(y)), color="grey", linestyle="--", label="positive rate")
        ax.legend(loc="upper right")
        fig.savefig(os.path.join(folder, "pr_curve.png"))
        written += ["roc_curve.png", "pr_curve.png"]
    return written


def _log_model(outcome: TrainOutcome, name: str, example: Any, signature: Any) -> Any:
    import mlflow

    if outcome.kind == "xgboost":
        import mlflow.xgboost
        import xgboost

        # Explicit requirements: MLflow would otherwise infer them in a subprocess that imports the
        # model's flavour (10-60 s on a loaded 2-core machine) to arrive at the same two pins.
        requirements = [f"mlflow=={mlflow.__version__}", f"xgboost=={xgboost.__version__}"]
        return mlflow.xgboost.log_model(outcome.model, name="model", signature=signature, input_example=example,
                                        registered_model_name=name, model_format="ubj",
                                        pip_requirements=requirements)
    import mlflow.pytorch
    import torch

    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}"]
    # The module returns logits; with a Sigmoid on top, pyfunc returns P(label = 1) as XGBoost's does.
    # Built-in torch classes only, so unpickling needs nothing but the user's module (shipped as code).
    # Pickle, not MLflow 3's default pt2 (torch.export): that needs a tensor example (no column names)
    # and traces the graph at one batch size.
    scored = torch.nn.Sequential(outcome.model, torch.nn.Sigmoid())
    return mlflow.pytorch.log_model(scored, name="model", signature=signature, input_example=example,
                                    registered_model_name=name, pip_requirements=requirements,
                                    serialization_format="pickle", code_paths=_code_paths(outcome.model) or None)


def _code_paths(module: Any) -> list[str]:
    """The user's own module file (or top-level package folder) behind a torch model, so the pickled
    model loads where that code is not installed (a Serve replica); nothing for lakeray's own modules."""
    import sys

    top = type(module).__module__.split(".")[0]
    found = sys.modules.get(top)
    path = getattr(found, "__file__", None) if found is not None else None
    if top == "lakeray" or not path or "site-packages" in path:
        return []
    return [os.path.dirname(path)] if hasattr(found, "__path__") else [path]


def load_model(uri: str, kind: str) -> Any:
    """A registered model in the form ``model_kind(kind).predict`` takes, on CPU: an XGBoost Booster, or
    the torch module that returns logits (the Sigmoid added for pyfunc is taken off again). Artifacts in
    a bucket are read with this process's object-store settings (the profile's, or LAKERAY_STORAGE__*)."""
    if storage.configured() is not None:
        storage.use_for_boto3()
    if kind == "xgboost":
        import mlflow.xgboost

        booster = mlflow.xgboost.load_model(uri)
        booster.set_param({"device": "cpu"})  # trained on GPU or not: the driver scores on CPU
        return booster
    import mlflow.pytorch
    import torch

    model = mlflow.pytorch.load_model(uri, map_location="cpu")
    if isinstance(model, torch.nn.Sequential) and len(model) == 2 and isinstance(model[1], torch.nn.Sigmoid):
        model = model[0]
    return model.eval()


def log_training(settings: Settings, outcome: TrainOutcome, evaluation: Evaluation) -> RegisteredModel:
    """Log params, per-step metrics, plots, lineage and the model; register it and set the spec's alias."""
    import mlflow

    plan = outcome.plan
    check_store(settings)
    if settings.profile.storage.is_object_store:
        storage.use_for_boto3(settings.profile.storage)  # MLflow's S3 artifact store is boto3
    client = mlflow_client(settings)
    name = plan.spec.registry.model_name or settings.profile.mlflow.model_name
    alias = plan.spec.registry.alias
    experiment_id = _experiment_id(client, settings)
    sample, sample_y = _held_out_sample(plan)
    importance = _importance(outcome, sample, sample_y)
    with mlflow.start_run(experiment_id=experiment_id, run_name=outcome.run_id,
                          tags=lineage_tags(settings, outcome)) as run:
        mlflow.log_params({**{f"model.{k}": v for k, v in outcome.params.items()},
                           "kind": outcome.kind, "steps": outcome.steps, "num_workers": plan.num_workers,
                           "use_gpu": outcome.use_gpu, "features": ",".join(plan.features)[:6000]})
        for point in outcome.history:
            step = int(point["step"])
            mlflow.log_metrics({k: float(v) for k, v in point.items() if k != "step"}, step=step)
        mlflow.log_metrics({**evaluation.metrics,  # the held-out scores; valid_<metric> is the per-step history
                            "train_rows": outcome.train_rows, "valid_rows": outcome.valid_rows,
                            "train_s": outcome.train_s, "startup_s": outcome.startup_s, "load_s": outcome.load_s,
                            "restarts": outcome.restarts, "redone_steps": outcome.redone_steps})
        mlflow.log_dict({"features": plan.features, "categorical": plan.categorical}, "lakeray/features.json")
        mlflow.log_dict(importance, "lakeray/feature_importance.json")
        # The spec pinned to its table version: enough to rebuild the plan (and so the held-out rows).
        pinned = plan.spec.model_copy(update={"training_set": plan.input})
        mlflow.log_dict(pinned.model_dump(mode="json"), "lakeray/spec.json")
        with tempfile.TemporaryDirectory(prefix="lakeray-plots-") as folder:
            if _write_plots(folder, outcome, evaluation, importance):
                mlflow.log_artifacts(folder, "plots")
        example = sample.head(_EXAMPLE_ROWS) if len(sample) else None
        info = _log_model(outcome, name, example, _signature(plan.features))
    version = int(info.registered_model_version)
    if alias:
        try:
            client.set_registered_model_alias(name, alias, str(version))
        except Exception as exc:
            client.delete_model_version(name, str(version))
            raise ModelRegistryError(f"could not set alias {alias!r} on {name} v{version}: {exc}",
                                     "check the MLflow store; the new version was removed again") from exc
    return RegisteredModel(name, version, alias, run.info.run_id)
