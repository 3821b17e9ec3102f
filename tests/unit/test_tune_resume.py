"""After `lakeray tune --resume`, Tune's restored random/grid generator may count as running a trial
that had already ended when the experiment state was saved, and its draw counter may be behind the
experiment (the two are saved at different moments); with max_concurrent it then never drew another
trial. ResumableGenerator, synced by Watch each step, fixes both. Offline: no Ray cluster."""

import ray.cloudpickle as pickle  # what Tune saves its state with
from types import SimpleNamespace

from lakeray.training.tune_watch import ResumableGenerator, Watch


def _trial(trial_id: str, status: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, status=status, config={}, last_result={}, checkpoint=None)


def _generator(samples: int) -> ResumableGenerator:
    from ray.tune.experiment import Experiment

    generator = ResumableGenerator(max_concurrent=1, random_state=7)
    generator.add_configurations([Experiment("search", lambda config: None, num_samples=samples,
                                             config={"eta": 0.1})])
    return generator


def test_a_restored_generator_behind_the_experiment_draws_the_next_new_trial():
    generator = _generator(3)
    first = generator.next_trial()
    assert generator.next_trial() is None  # one running, the limit 1
    state = pickle.loads(pickle.dumps(generator.get_state()))  # saved now: first one live, counter 1
    second_id = first.trial_id[:-5] + "00001"

    restored = _generator(3)
    restored.set_state(state)
    # The experiment state, saved later: the first trial finished, the second runs.
    trials = [_trial(first.trial_id, "TERMINATED"), _trial(second_id, "RUNNING")]
    Watch("no-listener", restored).on_step_begin(0, trials)
    assert restored._live_trials == set()
    third = restored.next_trial()  # not the second again (same id): the next new sample
    assert third is not None and third.trial_id == first.trial_id[:-5] + "00002"
    assert restored.next_trial() is None  # the limit again: the third runs
    Watch("no-listener", restored).on_step_begin(1, [*trials, _trial(third.trial_id, "PENDING")])
    assert restored._live_trials == {third.trial_id}


def test_the_generator_pickles_by_reference_and_other_searchers_are_left_alone():
    generator = _generator(2)
    assert pickle.loads(pickle.dumps(generator)).__class__ is ResumableGenerator
    Watch("no-listener").on_step_begin(0, [_trial("t_00000", "RUNNING")])
    other = SimpleNamespace(live_trials={"t_00000", "t_00009"})
    Watch("no-listener", other).on_step_begin(0, [_trial("t_00000", "RUNNING")])
    assert other.live_trials == {"t_00000", "t_00009"}
