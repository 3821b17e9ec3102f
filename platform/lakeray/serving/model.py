"""A registered model as a replica serves it: the scorer, its features and the request schema made from them.

The features and their types come from the training run's ``lakeray/features.json`` (``features``
in the model's column order, ``categorical``: column → vocabulary), else from the model's MLflow
signature. The request schema is a pydantic model built from them with ``create_model``, so
``/openapi.json`` says exactly what is accepted: every feature required (``null`` = missing), numbers
for numeric features, strings (or booleans) for categorical ones, no other keys, no NaN/Infinity.
A request that fits that schema is never refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ServedModel", "load_served_model", "instance_model"]


@dataclass
class ServedModel:
    name: str
    version: int
    kind: str  # "xgboost" or "torch"
    features: list[str]
    categorical: dict[str, list[str]]
    scorer: Any = field(repr=False)
    _codes: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._codes = {name: {value: i for i, value in enumerate(vocab)} for name, vocab in self.categorical.items()}

    def matrix(self, rows: list[dict[str, Any]], given: dict[str, Any] | None = None):
        """Rows (feature → value, None for missing) as the float32 matrix the model was trained on:
        categorical values as their vocabulary index, unseen values and nulls as NaN (as in training).
        ``given``: features already encoded as float32 columns (online features), not read from rows."""
        import numpy as np

        given = given or {}
        out = np.empty((len(rows), len(self.features)), dtype=np.float32)
        for j, name in enumerate(self.features):
            out[:, j] = given[name] if name in given else self.encode(name, [row[name] for row in rows])
        return out

    def encode(self, name: str, values: list[Any]) -> list[float]:
        """One feature's raw values as the model's numbers (see :meth:`matrix`)."""
        codes = self._codes.get(name)
        if codes is None:
            return [_NAN if value is None else value for value in values]
        return [codes.get(_category(value), _NAN) for value in values]

    def predict(self, x) -> list[Any]:
        import numpy as np

        if self.kind == "xgboost":
            scores = self.scorer.inplace_predict(x)
        else:
            import torch

            with torch.no_grad():
                scores = self.scorer(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        scores = np.asarray(scores)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        return scores.tolist()


_NAN = float("nan")


def _category(value: Any) -> Any:
    # Training cast booleans to Arrow strings: "true"/"false".
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def instance_model(model: ServedModel, key_fields: dict[str, str] | None = None, looked_up: set[str] | None = None):
    """The pydantic model of one instance: every feature a required field under its own name. With online
    features: the entity key fields (``key_fields``: name → 'int'/'str', required, not null) and the
    request-time features, without the ``looked_up`` ones (the replica fetches those)."""
    from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, create_model

    fields: dict[str, Any] = {}
    for name, kind in (key_fields or {}).items():
        annotation = StrictInt if kind == "int" else StrictStr
        fields[f"k{len(fields)}"] = (annotation, Field(..., alias=name, description=f"entity key ({kind})"))
    for i, name in enumerate(model.features):
        if name in (looked_up or set()) or name in (key_fields or {}):
            continue
        if name in model.categorical:
            vocab = model.categorical[name]
            # Strict types: lax pydantic took 0 as False and "1.5" as 1.5, values the published schema
            # refuses (schemathesis: "schema-violating request accepted"). An integer is a JSON number.
            annotation: Any = StrictStr | StrictBool | None
            info = Field(..., alias=name, description=f"categorical; known values: {vocab[:20]}"
                         f"{' …' if len(vocab) > 20 else ''} (others and null: missing)")
        else:
            annotation = StrictFloat | None
            info = Field(..., alias=name, allow_inf_nan=False, description="number (null: missing)")
        fields[f"f{i}"] = (annotation, info)  # aliases: a feature name need not be a Python identifier
    title = f"{model.name}_v{model.version}_instance"
    return create_model(title, __config__=ConfigDict(extra="forbid", populate_by_name=False,
                                                     title=f"{model.name} v{model.version} instance"), **fields)


def _features(client: Any, run_id: str, uri: str) -> tuple[list[str], dict[str, list[str]]]:
    import mlflow

    try:
        found = mlflow.artifacts.load_dict(f"runs:/{run_id}/lakeray/features.json")
        return list(found["features"]), {k: list(v) for k, v in (found.get("categorical") or {}).items()}
    except Exception:  # a model registered outside lakeray: its signature's column names
        from mlflow.models import get_model_info

        signature = get_model_info(uri).signature
        if signature is None or not signature.inputs.has_input_names():
            raise ValueError(f"{uri} has neither lakeray/features.json nor a named-column signature: "
                             "the endpoint cannot know its features") from None
        return list(signature.inputs.input_names()), {}


def load_served_model(tracking_uri: str, model_uri: str, threads: int = 1) -> ServedModel:
    """``models:/name/N`` → the model, on CPU unless the replica holds a GPU (torch)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, _, version = model_uri.removeprefix("models:/").rpartition("/")
    registered = client.get_model_version(name, version)
    flavors = mlflow.models.get_model_info(model_uri).flavors
    if "xgboost" in flavors:
        import mlflow.xgboost

        kind = "xgboost"
        scorer = mlflow.xgboost.load_model(model_uri)
        scorer.set_param({"device": "cpu", "nthread": threads})
    elif "pytorch" in flavors:
        import mlflow.pytorch

        kind = "torch"
        scorer = mlflow.pytorch.load_model(model_uri, map_location="cpu").eval()
    else:
        raise ValueError(f"{model_uri} has flavours {sorted(flavors)}; lakeray serves xgboost and pytorch models")
    features, categorical = _features(client, registered.run_id, model_uri)
    return ServedModel(name, int(version), kind, features, categorical, scorer)
