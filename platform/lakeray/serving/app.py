"""The model endpoint: a Ray Serve deployment behind a FastAPI ingress.

``POST /predict`` takes ``{"instances": [{"<feature>": <number or null>, ...}, ...]}`` and returns
one probability per instance. The request is validated against the model's own feature names: a
missing or unknown feature, a string where a number belongs, an empty or oversized batch all get a
422 naming the field (FastAPI's error format), never a 500. ``null`` means "missing" (XGBoost's NaN).

The replica resolves ``models:/<name>@<alias>`` to a concrete version once at start and reports it
with every answer, so a prediction can always be traced to the model version that made it.
"""


import math
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

__all__ = ["PredictRequest", "PredictResponse", "ModelServer", "build_app"]

api = FastAPI(title="lakeray model endpoint", docs_url="/docs")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[dict[str, float | None]] = Field(
        min_length=1, description="Rows to score: feature name → value (null for missing)."
    )


class PredictResponse(BaseModel):
    predictions: list[float]
    model: str
    model_version: int


def _error(loc: list[Any], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


@serve.deployment(name="model", max_ongoing_requests=64)
@serve.ingress(api)
class ModelServer:
    def __init__(self, tracking_uri: str, model_uri: str, max_batch_rows: int):
        import mlflow
        import mlflow.xgboost

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        client = mlflow.MlflowClient()
        name, _, alias = model_uri.removeprefix("models:/").partition("@")
        if alias:
            self.version = int(client.get_model_version_by_alias(name, alias).version)
        else:
            name, _, version = name.rpartition("/")
            self.version = int(version)
        self.name = name
        # Pin the resolved version: moving the alias later must not change this replica's model.
        self.booster = mlflow.xgboost.load_model(f"models:/{name}/{self.version}")
        self.features: list[str] = list(self.booster.feature_names or [])
        self._feature_set = set(self.features)
        self.max_batch_rows = max_batch_rows

    def _matrix(self, request: PredictRequest):
        import numpy as np

        if len(request.instances) > self.max_batch_rows:
            raise HTTPException(422, [_error(["body", "instances"],
                                             f"at most {self.max_batch_rows} instances per request")])
        errors = []
        for i, row in enumerate(request.instances):
            for name in sorted(self._feature_set - row.keys()):
                errors.append(_error(["body", "instances", i, name], "Field required", "missing"))
            for name in sorted(row.keys() - self._feature_set):
                errors.append(_error(["body", "instances", i, name],
                                     "unknown feature for this model", "extra_forbidden"))
            for name, value in row.items():
                if value is not None and not math.isfinite(value):
                    errors.append(_error(["body", "instances", i, name], "must be a finite number or null"))
        if errors:
            raise HTTPException(422, errors[:50])
        return np.array([[math.nan if row[f] is None else row[f] for f in self.features]
                         for row in request.instances], dtype=np.float32)

    @api.post("/predict", response_model=PredictResponse)
    def predict(self, request: PredictRequest) -> PredictResponse:
        x = self._matrix(request)
        scores = self.booster.inplace_predict(x)
        return PredictResponse(predictions=[float(s) for s in scores], model=self.name,
                               model_version=self.version)

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.name, "model_version": self.version, "features": self.features}


def build_app(tracking_uri: str, model_uri: str, max_batch_rows: int, num_replicas: int, replica_cpus: float):
    return ModelServer.options(num_replicas=num_replicas, ray_actor_options={"num_cpus": replica_cpus}).bind(
        tracking_uri, model_uri, max_batch_rows
    )
