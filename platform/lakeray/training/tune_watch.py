"""Tune hooks of a lakeray search: a callback feeding the live view, a stopper for the start deadline.

Tune pickles both into the experiment folder (``tuner.pkl``) and ``Tuner.restore`` unpickles them, so
they carry only the search's folder and look up the driver's live listener in :data:`LISTENERS`.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

__all__ = ["LISTENERS", "Watch", "StartStopper"]

LISTENERS: dict[str, Any] = {}  # search folder → lakeray.training.tune._Listener of this driver


class Watch(Callback):
    """Hands the list of trials to the listener at every step of Tune's loop (the listener throttles)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        listener = LISTENERS.get(self.key)
        if listener is not None:
            listener.update(trials)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.on_step_begin(0, trials)


class StartStopper(Stopper):
    """Ends the search when no trial could start within the listener's bounded wait."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        listener = LISTENERS.get(self.key)
        return bool(listener is not None and listener.timed_out)
