"""Tune hooks of a lakeray search: a callback feeding the live view, a stopper for the start deadline,
and the driver's :class:`Listener` they report to (trial rows, the start deadline, freed worker groups).

Tune pickles both into the experiment folder (``tuner.pkl``) and ``Tuner.restore`` unpickles them, so
they carry only the search's folder and look up the driver's live listener in :data:`LISTENERS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray.tune import Callback
from ray.tune.search import BasicVariantGenerator
from ray.tune.stopper import Stopper

if TYPE_CHECKING:
    from lakeray.training.tune import TrialStatus
    from lakeray.training.tune_spec import TuneSetup

__all__ = ["LISTENERS", "Listener", "ResumableGenerator", "Watch", "StartStopper"]

LISTENERS: dict[str, Any] = {}  # search folder → the Listener of this driver


class ResumableGenerator(BasicVariantGenerator):
    """Tune's random/grid generator, safe to resume.

    Tune saves the generator's state (its draw counter, its running trial ids) and the trials' states
    at different moments. After a --resume the restored generator could (a) count as running a trial
    that had already ended, and with max_concurrent never draw another one: Tune's loop then blocked
    600 s at a time waiting for a trial, forever (seen on a bucket, where the state is uploaded every
    2 s); (b) draw again a trial the experiment already has (same id and configuration: its counter was
    behind). Each step, before Tune asks for trials, Watch calls :meth:`sync` with the experiment's trials.
    """

    def sync(self, trials: list[Any]) -> None:
        self._known = {t.trial_id for t in trials}
        unfinished = {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")}
        self._live_trials.intersection_update(unfinished)

    def next_trial(self) -> Any:
        while True:
            trial = super().next_trial()
            if trial is None or trial.trial_id not in getattr(self, "_known", ()):
                return trial
            self._live_trials.discard(trial.trial_id)  # already in the experiment: skip this draw


class Watch(Callback):
    """Hands the list of trials to the listener at every step of Tune's loop (the listener throttles),
    and keeps the search algorithm's count of running trials true (below)."""

    def __init__(self, key: str, searcher: Any = None) -> None:
        self.key = key
        # The same object as the TuneConfig's search_alg, also after Tuner.restore (tuner.pkl is one pickle).
        self.searcher = searcher

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        _forget_ended_trials(self.searcher, trials)
        listener = LISTENERS.get(self.key)
        if listener is not None:
            listener.update(trials)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.on_step_begin(0, trials)


def _forget_ended_trials(searcher: Any, trials: list[Any]) -> None:
    """Bring the search algorithm's view in line with the experiment's trials (ResumableGenerator); a
    no-op for other searchers (Optuna behind Tune's ConcurrencyLimiter)."""
    if isinstance(searcher, ResumableGenerator):
        searcher.sync(trials)


class StartStopper(Stopper):
    """Ends the search when no trial could start within the listener's bounded wait."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        listener = LISTENERS.get(self.key)
        return bool(listener is not None and listener.timed_out)


@dataclass
class Listener:
    """The driver's view of the search: rows for the live table, the start deadline, freed groups."""

    setup: TuneSetup
    on_update: Callable[[list[TrialStatus]], None] | None
    start_timeout_s: float
    group_runs: str | None = None  # multi-worker trials: where their Ray Train runs write progress
    started: float = field(default_factory=time.monotonic)
    any_started: bool = False
    timed_out: bool = False
    last: list[TrialStatus] = field(default_factory=list)
    released: set[str] = field(default_factory=set)  # ended multi-worker trials whose group is freed

    def _trial_started(self, row: TrialStatus) -> bool:
        if row.state == "PENDING":
            return False
        if self.group_runs is None or row.rounds > 0:
            return True
        # A running multi-worker trial may still wait for its workers' placement group.
        from lakeray.training.tune_group import group_started

        return group_started(self.group_runs, row.trial_id)

    def release(self, trial_ids: list[str]) -> list[str]:
        """Free the worker groups of ended multi-worker trials (tune_group.release_group); those left."""
        from lakeray.training.tune_group import release_group

        for trial_id in trial_ids:
            if self.group_runs is not None and trial_id not in self.released \
                    and release_group(self.group_runs, trial_id):
                self.released.add(trial_id)
        return [t for t in trial_ids if t not in self.released]

    def update(self, trials: list[Any]) -> None:
        rows = [_status(t, self.setup) for t in trials]
        if self.group_runs is not None:
            self.release([r.trial_id for r in rows if r.state in ("TERMINATED", "ERROR")])
        if self.timed_out or self.any_started:
            pass  # the stopper ends the trials now: their new states say nothing about starting
        elif any(self._trial_started(r) for r in rows):
            self.any_started = True
        elif time.monotonic() - self.started > self.start_timeout_s and trials:
            self.timed_out = True
        if rows != self.last:
            self.last = rows
            if self.on_update is not None:
                self.on_update(rows)


def _status(trial: Any, setup: TuneSetup) -> TrialStatus:
    from lakeray.training.tune import TrialStatus

    result = trial.last_result or {}
    config = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in (trial.config or {}).items()}
    rounds_cap = int(config.get("rounds", setup.base.model.rounds))
    metric = result.get(setup.metric_key)
    return TrialStatus(trial.trial_id, config, str(trial.status), int(result.get("rounds", 0) or 0),
                       float(metric) if metric is not None else None, rounds_cap, bool(result.get("final")))
