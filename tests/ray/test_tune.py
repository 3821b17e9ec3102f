"""`lakeray tune` on a real local Ray: ASHA stops weak trials early and the best is registered as challenger
(MLflow parent run with one child per trial); Optuna with a seed draws the same configurations twice; a
search whose driver is SIGKILLed continues with --resume without rerunning finished trials; spec errors
and a search that cannot place a trial fail before any trial, naming the field or the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lakeray.errors import ClusterError, ConfigError
from tests.conftest import kill_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tune_table(settings):
    """12k rows, 8 numeric features, a label that depends on four of them."""
    from tests.conftest import write_learnable

    write_learnable(settings.table_path("tune_set"), 12_000, 8, seed=11)
    return "tune_set"


def _spec(table: str, name: str, **overrides) -> dict:
    body = {
        "name": name,
        "train": {"name": f"{name}_base", "model": {"kind": "xgboost", "rounds": 60, "params": {"eta": 0.1}},
                  "training_set": table, "label": "label", "features": {"all_except": []},
                  "split": {"kind": "hash", "column": "row_id"},
                  "scaling": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False},
                  "registry": {"model_name": "tune_test", "alias": "challenger"}},
        "space": {"max_depth": {"int": [1, 8]}, "eta": {"loguniform": [0.005, 0.3]}},
        "scheduler": {"kind": "asha", "grace_period": 10, "reduction_factor": 3},
        "num_samples": 8, "max_concurrent": 2,
    }
    body.update(overrides)
    return body


def _search(settings, body, **kwargs):
    from lakeray.training.tune import TuneSpec, search

    return search(settings, TuneSpec.parse(body, f"{body['name']}.yaml"), f"{body['name']}.yaml", **kwargs)


def test_asha_stops_most_trials_early_and_registers_the_best_as_challenger(settings, ray_handle, tune_table):
    from lakeray.registry import mlflow_client

    report = _search(settings, _spec(tune_table, "asha"))
    trials = report.trials
    assert len(trials) == 8 and all(t.state == "TERMINATED" for t in trials)
    stopped = [t for t in trials if t.rounds < 60]
    assert len(stopped) > len(trials) / 2 and all(t.stopped_early for t in stopped)
    assert report.rounds_run < report.rounds_budget == 8 * 60
    # The best is the best finished trial, and its model is what got registered and scored.
    finished = [t for t in trials if t.final]
    assert report.best.metric == max(t.metric for t in finished) and report.best.rounds == 60
    assert report.model is not None and report.model.alias == "challenger"
    client = mlflow_client(settings)
    version = client.get_model_version_by_alias("tune_test", "challenger")
    assert int(version.version) == report.model.version
    assert abs(report.evaluation.metrics["auc"] - report.best.metric) < 1e-6  # the same held-out rows
    # One parent run; one child per trial (the best trial's child is the registered run).
    parent = client.get_run(report.parent_run_id)
    assert parent.data.tags["lakeray.best_trial"] == report.best.trial_id
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{report.parent_run_id}'")
    assert len(children) == 8 and version.run_id in {c.info.run_id for c in children}
    history = client.get_metric_history(children[0].info.run_id, "valid_auc")
    assert history and all(m.step % 10 == 0 for m in history)
    artifacts = {a.path for a in client.list_artifacts(report.parent_run_id, "plots")}
    assert "plots/trials.png" in artifacts


def test_optuna_with_a_seed_draws_the_same_configurations(settings, ray_handle, tune_table):
    def configs(name: str) -> list[dict]:
        body = _spec(tune_table, name, search={"algorithm": "optuna", "seed": 3}, num_samples=4,
                     scheduler={"kind": "none"})
        body["train"]["model"]["rounds"] = 10
        report = _search(settings, body, register=False)
        return [t.config for t in report.trials]  # in the order the searcher drew them

    first, second = configs("optuna_a"), configs("optuna_b")
    assert first == second and len({json.dumps(c, sort_keys=True) for c in first}) == 4


@pytest.mark.parametrize(("space", "field"), [
    ({"max_dpth": {"int": [2, 6]}}, "space.max_dpth"),
    ({"eta": {"uniform": [0.3, 0.1]}}, "space.eta"),
    ({"eta": {"loguniform": [0.0, 0.3]}}, "space.eta"),
    ({"max_depth": {"choice": []}}, "space.max_depth"),
])
def test_spec_errors_fail_before_any_trial(settings, ray_handle, tune_table, space, field):
    from lakeray.training.tune import search_folder

    with pytest.raises(ConfigError) as err:
        _search(settings, _spec(tune_table, "bad_space", space=space))
    assert f"bad_space.yaml: {field}" in err.value.headline
    assert not os.path.exists(search_folder(settings, "bad_space"))


def test_a_metric_the_trainer_does_not_report_and_a_trial_that_cannot_fit_fail_up_front(settings, ray_handle,
                                                                                        tune_table):
    from lakeray.training.tune import search_folder

    with pytest.raises(ConfigError, match="metric: 'rmse' is not a metric the trials report"):
        _search(settings, _spec(tune_table, "bad_metric", metric={"name": "rmse"}))
    body = _spec(tune_table, "too_big")
    body["train"]["scaling"]["cpus_per_worker"] = 64
    with pytest.raises(ClusterError, match="no trial could ever start"):
        _search(settings, body)
    assert not os.path.exists(search_folder(settings, "bad_metric"))
    assert not os.path.exists(search_folder(settings, "too_big"))


def test_a_search_that_cannot_place_a_trial_says_why_within_the_wait(settings, ray_handle, tune_table):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    # Every free CPU of the cluster held by someone else (in a full test run, Serve replicas of
    # earlier tests hold some already): the trials wait in line, and the search gives up.
    # CPUs that earlier tests' workers are still releasing show up free later: hold each amount that
    # appears, until nothing has been free for 3 s in a row (a CPU freed after the hold let a trial start).
    holds, quiet_since, deadline = [], None, time.monotonic() + 90
    while quiet_since is None or time.monotonic() - quiet_since < 3:
        assert time.monotonic() < deadline, "could not hold the cluster's free CPUs"
        free = ray.available_resources().get("CPU", 0)
        if free < 0.01:
            quiet_since = quiet_since or time.monotonic()
        else:
            quiet_since = None
            group = placement_group([{"CPU": free}])
            if ray.wait([group.ready()], timeout=10)[0]:
                holds.append(group)
            else:
                remove_placement_group(group)
        time.sleep(0.2)
    try:
        started = time.monotonic()
        with pytest.raises(ClusterError, match="no trial started within 5 s"):
            _search(settings, _spec(tune_table, "no_room"), start_timeout_s=5)
        assert time.monotonic() - started < 60
    finally:
        for group in holds:
            remove_placement_group(group)


def _finished_trials(folder: Path) -> dict[str, int]:
    """Trial folder → reported results, for each trial whose last result is its final one."""
    done = {}
    for result in folder.glob("*/result.json"):
        lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        if lines and lines[-1].get("final"):
            done[result.parent.name] = len(lines)
    return done


def test_a_killed_search_resumes_without_rerunning_finished_trials(settings, tune_table, tmp_path):
    import yaml

    # One trial at a time, each long enough (600 rounds) that the kill lands between finished ones.
    body = _spec(tune_table, "killed", num_samples=6, scheduler={"kind": "none"}, max_concurrent=1,
                 report_every=50, checkpoint_every=100, space={"eta": {"loguniform": [0.005, 0.3]}})
    body["train"]["model"]["rounds"] = 600
    body["train"]["model"]["params"]["max_depth"] = 8
    spec_file = tmp_path / "killed.yaml"
    spec_file.write_text(yaml.safe_dump(body))
    env = {**os.environ, "LAKERAY_STORAGE__ROOT": settings.storage_root, "LAKERAY_RAY__OP_TIMEOUT_S": "300"}
    cli = [os.path.join(os.path.dirname(sys.executable), "lakeray"), "--config", str(REPO / "lakeray.yaml")]
    folder = Path(settings.storage_root, "tune_runs", "killed")
    driver = subprocess.Popen([*cli, "tune", str(spec_file), "--json", "--no-register"], env=env,
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            if folder.exists() and len(_finished_trials(folder)) >= 2:
                break
            time.sleep(0.3)
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        time.sleep(2.5)  # Tune saves the experiment's state every 2 s: the finished trials are in it
        before = _finished_trials(folder)
        assert 2 <= len(before) < 6, "the search finished before its driver was killed"
        kill_tree(driver.pid)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    time.sleep(2)
    resumed = subprocess.run([*cli, "tune", str(spec_file), "--resume", "--json", "--no-register"], env=env,
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout[resumed.stdout.index("{"):])
    assert summary["resumed"] and len(summary["trials"]) == 6
    assert all(t["final"] and t["rounds"] == 600 for t in summary["trials"])
    # A finished trial was not trained again: after the results it had before the kill come, at most,
    # re-reports of its final checkpoint (a trial that finished after Tune's last state save), no rounds.
    for name, count in before.items():
        lines = [json.loads(x) for x in (folder / name / "result.json").read_text().splitlines() if x.strip()]
        assert all(line["final"] and line["rounds"] == 600 for line in lines[count - 1:]), name
    # Running the same spec again without --resume is refused rather than mixed into the old search.
    again = subprocess.run([*cli, "tune", str(spec_file), "--json"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr


def _trial_events(folder: Path) -> dict[str, list[dict]]:
    """Trial id → the progress events of its Ray Train run (multi-worker trials only)."""
    runs = folder / "trial_runs"
    found = {}
    for progress in sorted(runs.glob("*/progress.jsonl")) if runs.exists() else []:
        lines = [x for x in progress.read_text().splitlines() if x.strip()]
        found[progress.parent.name] = [json.loads(x) for x in lines[:-1]]  # the last may be half-written
        if lines:
            try:
                found[progress.parent.name].append(json.loads(lines[-1]))
            except json.JSONDecodeError:
                pass
    return found


def test_two_worker_trials_are_stopped_by_asha_and_resume_from_their_ray_train_checkpoint(settings, ray_handle,
                                                                                         tmp_path):
    """Each trial drives a 2-worker Ray Train run. The first trial's rank 0 is SIGKILLed mid-run
    (max_failures 0: the trial errors); ASHA stops the second (worse) trial at its first rung, which
    ends its worker group; --resume restarts the errored trial from its Ray Train checkpoint, leaves the
    stopped one alone, and registers the best as challenger."""
    import threading

    import ray

    from lakeray.registry import mlflow_client
    from lakeray.training.tune import search_folder
    from tests.conftest import write_learnable

    write_learnable(settings.table_path("tune_set4"), 12_000, 8, seed=12, files=4)  # a file shard per worker
    body = _spec("tune_set4", "groups", num_samples=2, max_concurrent=1, search={"algorithm": "random", "seed": 1},
                 space={"eta": {"choice": [0.3, 0.002]}}, metric={"name": "logloss"}, checkpoint_every=20,
                 scheduler={"kind": "asha", "grace_period": 10, "reduction_factor": 2})
    body["train"]["model"]["rounds"] = 200
    body["train"]["scaling"] = {"num_workers": 2, "cpus_per_worker": 1, "use_gpu": False}
    body["train"]["max_failures"] = 0
    body["train"]["registry"]["model_name"] = "tune_groups"
    folder = Path(search_folder(settings, "groups"))
    free_before = ray.available_resources().get("CPU", 0)
    killed: dict[str, int] = {}

    def kill_first_group_mid_run() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for trial_id, events in _trial_events(folder).items():
                done = [e for e in events if e["event"] == "checkpoint" and e["step"] >= 40]
                if done:
                    os.kill(done[0]["pid"], signal.SIGKILL)  # rank 0 of the trial's worker group
                    killed[trial_id] = done[0]["step"]
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_first_group_mid_run, daemon=True)
    killer.start()
    with pytest.raises(ClusterError):  # no trial finished: one errored, the other was stopped early
        _search(settings, body)
    killer.join(5)
    assert len(killed) == 1, "no worker group reached round 40"
    (first,) = killed
    events = _trial_events(folder)
    assert set(events) and len(events) == 2  # a Ray Train run per trial, one after the other
    (second,) = set(events) - {first}
    # ASHA stopped it at its first rung; its group may have run a report or two ahead of the decision.
    assert max(e["step"] for e in events[second] if e["event"] == "step") < 100
    # The stopped trial's worker group is gone: its CPUs are back.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < free_before - 0.01:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= free_before - 0.01

    report = _search(settings, body, resume=True)
    by_id = {t.trial_id: t for t in report.trials}
    assert by_id[first].final and by_id[first].rounds == 200 and by_id[first].config["eta"] == 0.3
    assert by_id[second].stopped_early and by_id[second].rounds == 10  # what Tune saw when it stopped it
    resumed = [e for e in _trial_events(folder)[first] if e["event"] == "resumed"]
    assert resumed and 20 <= resumed[-1]["step"] <= killed[first]  # from its checkpoint, not from round 0
    # The stopped trial was not run again: its run was started once (its group may have written a
    # report or two more while Tune ended it).
    assert [e["attempt"] for e in _trial_events(folder)[second] if e["event"] == "started"] == [0]
    assert report.best.trial_id == first and report.model is not None and report.model.alias == "challenger"
    version = mlflow_client(settings).get_model_version_by_alias("tune_groups", "challenger")
    run = mlflow_client(settings).get_run(version.run_id)
    assert run.data.tags["lakeray.trainer"] == "xgboost/tune-ray-train"
    assert abs(report.evaluation.metrics["logloss"] - report.best.metric) < 1e-5  # the same held-out rows
