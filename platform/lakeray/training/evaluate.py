"""Driver-side evaluation on the held-out rows of a plan: the numbers models are compared on.

The driver reads only the validation rows (batch by batch), scores them with the model on CPU, and
computes every metric a spec can name. Promotion compares two models on exactly these rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakeray.errors import DataQualityError

if TYPE_CHECKING:
    import numpy as np

    from lakeray.training.spec import TrainPlan

__all__ = ["Evaluation", "evaluate", "metrics_of"]

Predict = Callable[["np.ndarray"], "np.ndarray"]  # encoded float32 features → P(label = 1)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    y_true: np.ndarray
    y_score: np.ndarray

    @property
    def rows(self) -> int:
        return int(len(self.y_true))


def metrics_of(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    import numpy as np
    from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

    if len(set(np.asarray(y_true).tolist())) < 2:
        raise DataQualityError("the held-out rows have a single class: AUC is undefined",
                               "change the split or build a training set with both classes")
    clipped = np.clip(y_score, 1e-7, 1 - 1e-7)
    return {"auc": float(roc_auc_score(y_true, y_score)), "aucpr": float(average_precision_score(y_true, y_score)),
            "logloss": float(log_loss(y_true, clipped, labels=[0, 1])),
            "error": float(np.mean((y_score >= 0.5) != (y_true == 1)))}


def evaluate(plan: TrainPlan, predict: Predict) -> Evaluation:
    """Score every held-out row of ``plan`` with ``predict``; metrics, labels and scores back."""
    import numpy as np

    from lakeray.training.data import encode, iter_validation, labels

    ys, scores = [], []
    for table in iter_validation(plan):
        if table.num_rows:
            ys.append(labels(table, plan))
            scores.append(np.asarray(predict(encode(table, plan)), dtype=np.float64).reshape(-1))
    y_true = np.concatenate(ys) if ys else np.empty(0, dtype=np.float32)
    y_score = np.concatenate(scores) if scores else np.empty(0)
    return Evaluation(metrics_of(y_true, y_score), y_true, y_score)
