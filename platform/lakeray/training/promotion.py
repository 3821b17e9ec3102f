"""The promotion gate: ``champion`` moves to the challenger only when it wins on the same held-out rows.

:func:`promote` rebuilds the challenger's plan from its run's ``lakeray/spec.json`` (the spec pinned to
table@version), so the held-out rows are exactly the ones the challenger was evaluated on. Both models
are loaded from the registry (natively, on CPU) and scored on those rows, each with its own feature
list and category vocabulary (``lakeray/features.json``), on the challenger's metric and direction.
The comparison is recorded on both model versions (tag ``lakeray.promotion.<UTC time>``) whatever the
decision; a refusal is a :class:`PromotionRefused` naming both values.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lakeray.errors import DataQualityError, ModelRegistryError
from lakeray.registry import mlflow_client, resolve_alias
from lakeray.training.lineage import PROMOTION_TAG

if TYPE_CHECKING:
    from lakeray.config import Settings
    from lakeray.training.spec import TrainPlan

__all__ = ["PromotionResult", "Contender", "PromotionRefused", "promote"]


class PromotionRefused(ModelRegistryError):
    """The challenger does not beat the champion (or cannot be compared with it): champion stays.

    ``result`` holds the comparison for callers that print it (it is not pickled: promotion never
    crosses Ray)."""

    result: PromotionResult | None = None


@dataclass(frozen=True)
class Contender:
    alias: str
    version: int
    run_id: str
    kind: str
    value: float | None  # the metric on the shared held-out rows; None when it could not be scored
    note: str = ""


@dataclass(frozen=True)
class PromotionResult:
    model_name: str
    metric: str
    direction: str  # "max" or "min": which way is better
    evaluated_on: str  # table@version whose held-out rows both models were scored on
    rows: int
    challenger: Contender
    champion: Contender | None
    decision: str  # "promoted", "first champion", "forced", "refused", "already champion"
    promoted: bool
    tag: str  # the model version tag holding this comparison ("" when nothing was compared)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def headline(self) -> str:
        ch = self.challenger
        if self.decision == "already champion":
            return f"{self.model_name} v{ch.version} is already {self.champion.alias}: nothing to compare"  # type: ignore[union-attr]
        if self.champion is None:
            return f"{self.model_name} v{ch.version} is champion ({self.metric} {_fmt(ch.value)} on {self.rows:,} " \
                   f"held-out rows of {self.evaluated_on}; there was no champion)"
        cp = self.champion
        if cp.value is None:
            return (f"challenger v{ch.version} ({self.metric} {_fmt(ch.value)} on {self.rows:,} held-out rows of "
                    f"{self.evaluated_on}) vs champion v{cp.version}: {cp.note}: {self.decision}")
        return (f"challenger v{ch.version} ({self.metric} {_fmt(ch.value)}) vs champion v{cp.version} "
                f"({self.metric} {_fmt(cp.value)}) on the same {self.rows:,} held-out rows of {self.evaluated_on} "
                f"({'higher' if self.direction == 'max' else 'lower'} is better): {self.decision}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _artifact(run_id: str, path: str) -> dict[str, Any] | None:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except (MlflowException, OSError, ValueError):
        return None


def _challenger_plan(settings: Settings, name: str, version: int, run_id: str) -> TrainPlan:
    from lakeray.training.spec import TrainSpec, plan_training

    where = f"{name} v{version}: lakeray/spec.json"
    body = _artifact(run_id, "lakeray/spec.json")
    if body is None:
        raise ModelRegistryError(f"{name} v{version} has no lakeray/spec.json in its run {run_id}: its held-out "
                                 "rows cannot be rebuilt", "register the challenger with `lakeray train SPEC.yaml`")
    return plan_training(settings, TrainSpec.parse(body, where), where)


def _load(name: str, version: int, kind: str) -> Any:
    from lakeray.training.tracking import load_model

    return load_model(f"models:/{name}/{version}", kind)


def _kind(run: Any, spec: dict[str, Any] | None) -> str:
    kind = run.data.tags.get("lakeray.kind") or ((spec or {}).get("model") or {}).get("kind")
    return kind or "xgboost"  # models registered before lakeray tagged the kind were all XGBoost


def _features(run_id: str, model: Any, kind: str) -> tuple[list[str], dict[str, list[str]]] | None:
    meta = _artifact(run_id, "lakeray/features.json")
    if meta is not None:
        return list(meta["features"]), {k: list(v) for k, v in (meta.get("categorical") or {}).items()}
    if kind == "xgboost" and model.feature_names:
        return list(model.feature_names), {}
    return None


def _score(plan: TrainPlan, kind: str, model: Any, features: list[str], categorical: dict[str, list[str]],
           metric: str) -> tuple[float, int]:
    """The metric of ``model`` on ``plan``'s held-out rows, encoded with the model's own features."""
    from lakeray.training.api import model_kind
    from lakeray.training.evaluate import evaluate

    predict = model_kind(kind).predict
    own = dataclasses.replace(plan, features=features, categorical=categorical)
    evaluation = evaluate(own, lambda x: predict(model, x))
    return evaluation.metrics[metric], evaluation.rows


def _better(challenger: float, champion: float, direction: str) -> bool:
    return challenger > champion if direction == "max" else challenger < champion


def _record(client: Any, result: PromotionResult, force: bool) -> None:
    body = json.dumps({"metric": result.metric, "direction": result.direction, "evaluated_on": result.evaluated_on,
                       "rows": result.rows, "decision": result.decision, "force": force,
                       "challenger": {"version": result.challenger.version, "value": result.challenger.value},
                       "champion": None if result.champion is None else
                       {"version": result.champion.version, "value": result.champion.value,
                        "note": result.champion.note}}, sort_keys=True)
    for contender in (result.challenger, result.champion):
        if contender is not None:
            client.set_model_version_tag(result.model_name, str(contender.version), result.tag, body)


def promote(settings: Settings, model_name: str, challenger: str = "challenger", champion: str = "champion",
            force: bool = False) -> PromotionResult:
    """Move ``champion`` to the ``challenger`` version when it is strictly better on the challenger's
    held-out rows (or ``force``, or there is no champion yet); record the comparison on both versions.

    Raises PromotionRefused (champion unchanged) when the challenger is not better, or when the
    champion cannot be scored on those rows (its features are missing from the table) and not ``force``.
    """
    client = mlflow_client(settings)
    new = resolve_alias(settings, f"models:/{model_name}@{challenger}")
    aliases = client.get_registered_model(model_name).aliases or {}
    old_version = int(aliases[champion]) if champion in aliases else None
    ch_run = client.get_run(new.run_id)
    plan = _challenger_plan(settings, model_name, new.version, new.run_id)
    metric, direction = plan.spec.metric.name, plan.spec.metric.direction
    ch_kind = _kind(ch_run, None)
    if old_version == new.version:  # nothing to compare: report the run's own held-out figure
        ch = Contender(challenger, new.version, new.run_id, ch_kind, ch_run.data.metrics.get(f"valid_{metric}"))
        return PromotionResult(model_name, metric, direction, plan.input, plan.extra.get("valid_rows", 0), ch,
                               dataclasses.replace(ch, alias=champion), "already champion", False, "")
    ch_model = _load(model_name, new.version, ch_kind)
    ch_feats = _features(new.run_id, ch_model, ch_kind) or (plan.features, plan.categorical)
    ch_value, rows = _score(plan, ch_kind, ch_model, *ch_feats, metric)
    ch = Contender(challenger, new.version, new.run_id, ch_kind, ch_value)
    tag = PROMOTION_TAG + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    cp = None
    if old_version is not None:
        cp_run = client.get_run(client.get_model_version(model_name, str(old_version)).run_id)
        cp_kind = _kind(cp_run, _artifact(cp_run.info.run_id, "lakeray/spec.json"))
        cp_model = _load(model_name, old_version, cp_kind)
        cp_feats = _features(cp_run.info.run_id, cp_model, cp_kind)
        columns = set(_columns(plan))
        missing = sorted(set(cp_feats[0]) - columns) if cp_feats else None
        if cp_feats is None or missing:
            why = "its feature list is unknown" if cp_feats is None else \
                f"its feature(s) {missing[:5]}{'…' if len(missing) > 5 else ''} are not in {plan.input}"
            cp = Contender(champion, old_version, cp_run.info.run_id, cp_kind, None, f"not comparable: {why}")
        else:
            try:
                cp_value, _ = _score(plan, cp_kind, cp_model, *cp_feats, metric)
                cp = Contender(champion, old_version, cp_run.info.run_id, cp_kind, cp_value, _split_note(cp_run, ch_run))
            except DataQualityError as exc:  # e.g. a feature whose type no longer encodes
                cp = Contender(champion, old_version, cp_run.info.run_id, cp_kind, None,
                               f"not comparable: {exc.headline}")

    if cp is None:
        decision = "first champion"
    elif cp.value is not None and _better(ch_value, cp.value, direction):
        decision = "promoted"
    else:
        decision = "forced" if force else "refused"
    promoted = decision != "refused"
    result = PromotionResult(model_name, metric, direction, plan.input, rows, ch, cp, decision, promoted, tag)
    _record(client, result, force)
    if not promoted:
        fix = ("the champion cannot be scored on these rows; pass --force to promote anyway"
               if cp is not None and cp.value is None else
               "keep the champion, or retrain; pass --force to promote anyway")
        err = PromotionRefused(result.headline + f"; champion stays v{cp.version}", fix)  # type: ignore[union-attr]
        err.result = result
        raise err
    client.set_registered_model_alias(model_name, champion, str(new.version))
    return result


def _columns(plan: TrainPlan) -> list[str]:
    from lakeray.lakehouse.delta import read_arrow

    return read_arrow(plan.path, plan.version, files=[]).schema.names


def _split_note(champion_run: Any, challenger_run: Any) -> str:
    """A champion trained with another split may have trained on some of these held-out rows."""
    a, b = champion_run.data.tags.get("lakeray.split"), challenger_run.data.tags.get("lakeray.split")
    # The split tag holds the resolved cutoff, so equal tags on the same table hold out the same rows.
    tables = [run.data.tags.get("lakeray.input", "").partition("@")[0] for run in (champion_run, challenger_run)]
    if a and b and a == b and tables[0] == tables[1]:
        return ""
    return ("trained on another training set or split than the challenger: some of these held-out rows may "
            "have been its training rows")
