"""MLflow: log a training run with its lineage, register the model, point an alias at it.

Runs are tagged with the table name@version they read (``lakeray.input``), so a registered model
leads back to the exact rows it was trained on. Registration is all-or-nothing: if setting the alias
fails, the new model version is deleted again, so no half-registered model is left behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lakeray.errors import ModelRegistryError
from lakeray.registry import RegisteredModel, mlflow_client

if TYPE_CHECKING:
    from lakeray.config import Settings
    from lakeray.training.xgboost_trainer import TrainOutcome, TrainSpec

__all__ = ["log_and_register"]


def _experiment_id(client: Any, settings: Settings) -> str:
    name = settings.profile.mlflow.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # With a SQLite store MLflow would put artifacts in ./mlruns of whatever the cwd is: pin them.
    artifacts = None if settings.profile.mlflow.tracking_uri else f"file://{settings.mlflow_artifact_root}"
    return client.create_experiment(name, artifact_location=artifacts)


def log_and_register(settings: Settings, spec: TrainSpec, outcome: TrainOutcome, metrics: dict[str, float],
                     alias: str | None = "champion", model_name: str | None = None) -> RegisteredModel:
    """Log params, metrics, lineage tags and the model; register it and set ``alias``."""
    import mlflow
    import mlflow.xgboost
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature

    client = mlflow_client(settings)
    name = model_name or settings.profile.mlflow.model_name
    experiment_id = _experiment_id(client, settings)
    tags = {
        "lakeray.input": f"{spec.table}@{spec.version}",
        "lakeray.input_path": spec.path,
        "lakeray.input_version": str(spec.version),
        "lakeray.label": spec.label,
        "lakeray.trainer": "xgboost/ray-train",
    }
    example = pd.DataFrame(np.zeros((2, len(spec.features)), dtype=np.float64), columns=spec.features)
    signature = infer_signature(example, np.zeros(2, dtype=np.float64))
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        mlflow.log_params({**{f"xgb.{k}": v for k, v in outcome.params.items()},
                           "num_boost_round": outcome.num_boost_round, "num_workers": outcome.num_workers,
                           "features": ",".join(spec.features)})
        mlflow.log_metrics({**metrics, "train_rows": outcome.train_rows, "train_s": outcome.train_s,
                            "startup_s": outcome.startup_s})
        # Explicit requirements: MLflow would otherwise infer them in a subprocess that imports the
        # model's flavour (10-60 s on a loaded 2-core machine) to arrive at the same two pins.
        import xgboost

        requirements = [f"mlflow=={mlflow.__version__}", f"xgboost=={xgboost.__version__}"]
        info = mlflow.xgboost.log_model(outcome.booster, name="model", signature=signature,
                                        registered_model_name=name, model_format="ubj",
                                        pip_requirements=requirements)
    version = int(info.registered_model_version)
    if alias:
        try:
            client.set_registered_model_alias(name, alias, str(version))
        except Exception as exc:
            client.delete_model_version(name, str(version))
            raise ModelRegistryError(f"could not set alias {alias!r} on {name} v{version}: {exc}",
                                     "check the MLflow store; the new version was removed again") from exc
    return RegisteredModel(name, version, alias, run.info.run_id)
