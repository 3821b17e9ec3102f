"""One call from a Delta table version to a registered, aliased model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakeray.errors import DataQualityError

if TYPE_CHECKING:
    import xgboost

    from lakeray.config import Settings
    from lakeray.registry import RegisteredModel
    from lakeray.training.xgboost_trainer import TrainOutcome, TrainSpec

__all__ = ["TrainReport", "make_spec", "holdout_auc", "train_and_register"]


@dataclass(frozen=True)
class TrainReport:
    spec: TrainSpec
    outcome: TrainOutcome
    auc: float
    test_rows: int
    model: RegisteredModel
    seconds: float


def make_spec(settings: Settings, table: str, version: int, label: str, id_column: str,
              features: list[str] | None = None, exclude: tuple[str, ...] = ()) -> TrainSpec:
    """A TrainSpec whose features default to every numeric column except label, id and ``exclude``."""
    import pyarrow.types as pat

    from lakeray.lakehouse.delta import read_arrow
    from lakeray.training.xgboost_trainer import TrainSpec

    path = settings.table_path(table)
    schema = read_arrow(path, version, files=[]).schema
    missing = [c for c in [label, id_column, *(features or [])] if c not in schema.names]
    if missing:
        raise DataQualityError(f"{table}@{version} has no column(s) {missing} (has: {', '.join(schema.names)})",
                               "fix the label/id/feature names or the feature job")
    if features is None:
        skip = {label, id_column, *exclude}
        features = [f.name for f in schema if f.name not in skip
                    and (pat.is_integer(f.type) or pat.is_floating(f.type) or pat.is_boolean(f.type))]
    return TrainSpec(table, path, version, label, list(features), id_column)


def holdout_auc(booster: xgboost.Booster, spec: TrainSpec, test_fraction: float) -> tuple[float, int]:
    """AUC on the rows the trainer held out (same id hash as the workers used)."""
    from sklearn.metrics import roc_auc_score

    import pyarrow as pa

    from lakeray.lakehouse.delta import iter_batches, read_arrow
    from lakeray.training.data import holdout_mask, to_matrix

    # Batch by batch, keeping only the held-out rows: peak memory is the held-out share (plus one
    # batch), not the whole training set.
    held_out = []
    for batch in iter_batches(spec.path, spec.version, columns=[spec.id_column, spec.label, *spec.features]):
        ids = batch.column(spec.id_column).to_numpy(zero_copy_only=False)
        held_out.append(batch.filter(pa.array(holdout_mask(ids, test_fraction))))
    table = pa.Table.from_batches(held_out) if held_out else read_arrow(spec.path, spec.version, files=[])
    x = to_matrix(table, spec.features)
    y = table.column(spec.label).to_numpy(zero_copy_only=False)
    if len(set(y.tolist())) < 2:
        raise DataQualityError(f"the held-out rows of {spec.table}@{spec.version} have a single class",
                               "generate more rows (--rows) so both classes appear")
    return float(roc_auc_score(y, booster.inplace_predict(x))), int(table.num_rows)


def train_and_register(settings: Settings, spec: TrainSpec, alias: str | None = "champion") -> TrainReport:
    """Train on Ray (already started by the caller), evaluate, log to MLflow, register, set alias."""
    from lakeray.training.tracking import log_and_register
    from lakeray.training.xgboost_trainer import train_xgboost

    started = time.perf_counter()
    outcome = train_xgboost(settings, spec)
    auc, test_rows = holdout_auc(outcome.booster, spec, settings.profile.train.test_fraction)
    model = log_and_register(settings, spec, outcome, {"auc": auc, "test_rows": test_rows}, alias=alias)
    return TrainReport(spec, outcome, auc, test_rows, model, time.perf_counter() - started)
