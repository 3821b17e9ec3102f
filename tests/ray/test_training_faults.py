"""Training survives real failures: a worker process SIGKILLed mid-run restarts from its last checkpoint
(Ray Train's FailureConfig for a worker group, Ray's task retry for one worker) and finishes the same
number of rounds; a driver SIGKILLed mid-run is continued by `lakeray train --resume RUN`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import kill_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def learnable(settings):
    """40k rows, 10 numeric features, a label that depends on three of them, in four files (so two
    workers each read their own pair)."""
    from tests.conftest import write_learnable

    write_learnable(settings.table_path("faults_set"), 40_000, 10, seed=5, files=4)
    return "faults_set"


def _spec(table: str, workers: int, rounds: int, every: int, name: str, placement: str = "PACK"):
    from lakeray.training.spec import TrainSpec

    return TrainSpec.parse({
        "name": name, "model": {"kind": "xgboost", "rounds": rounds, "params": {"max_depth": 8, "eta": 0.05}},
        "training_set": table, "label": "label", "features": {"all_except": []},
        "split": {"kind": "hash", "column": "row_id"},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1, "placement_strategy": placement},
        "checkpoint_every": every, "max_failures": 2, "registry": {"alias": None}})


def _kill_after_first_checkpoint(spec, settings, min_step: int):
    """Train ``spec``; SIGKILL the worker that reports the first checkpoint at or after ``min_step``."""
    from lakeray.training.api import train

    killed: dict[str, int] = {}
    lock = threading.Lock()

    def on_event(event: dict) -> None:
        with lock:
            if event["event"] == "checkpoint" and event["step"] >= min_step and not killed:
                os.kill(event["pid"], signal.SIGKILL)
                killed.update(pid=event["pid"], step=event["step"])

    report = train(settings, spec, register=False, on_event=on_event)
    return report, killed


def test_a_killed_worker_group_restarts_from_its_checkpoint(settings, ray_handle, learnable):
    # Killed at the third checkpoint: Ray Train registers a reported checkpoint asynchronously, so the
    # newest one may not have been registered yet; the ones before it have. The kill lands a moment
    # after the driver saw that checkpoint, so the group may have reported a few more meanwhile.
    # SPREAD, as on several hosts: on this one node Ray places the group anyway (best effort).
    report, killed = _kill_after_first_checkpoint(_spec(learnable, 2, 300, 10, "kill_group", "SPREAD"), settings, 30)
    outcome = report.outcome
    assert killed and outcome.path == "ray-train"
    assert outcome.restarts >= 1
    assert outcome.steps == 300 and outcome.model.num_boosted_rounds() == 300  # the same number of rounds
    events = outcome_events(outcome)
    resumed = [e for e in events if e["event"] == "resumed"]
    reached = max(e["step"] for e in events if e["attempt"] == 0)
    assert resumed and 10 <= resumed[0]["step"] <= reached  # from a checkpoint, not from round 0
    assert outcome.redone_steps == reached - resumed[0]["step"] >= 0
    assert report.evaluation.metrics["auc"] > 0.75


def test_a_strict_placement_the_cluster_cannot_give_is_refused_before_any_worker_starts(settings, ray_handle,
                                                                                       learnable):
    """A strict placement group that cannot be placed waits forever in Ray: lakeray refuses it first."""
    import ray

    from lakeray.errors import ClusterError
    from lakeray.training.api import train

    nodes = [n for n in ray.nodes() if n["Alive"]]
    with pytest.raises(ClusterError, match=rf"STRICT_SPREAD needs {len(nodes) + 1} nodes .* has {len(nodes)}"):
        train(settings, _spec(learnable, len(nodes) + 1, 10, 5, "strict_spread", "STRICT_SPREAD"), register=False)


def test_a_killed_single_worker_task_is_retried_from_its_checkpoint(settings, ray_handle, learnable):
    report, killed = _kill_after_first_checkpoint(_spec(learnable, 1, 120, 20, "kill_task"), settings, 20)
    outcome = report.outcome
    assert killed and outcome.path == "task"
    assert outcome.restarts == 1 and outcome.steps == 120
    resumed = [e for e in outcome_events(outcome) if e["event"] == "resumed"]
    # The kill lands a moment after the driver saw that checkpoint: the worker may have saved later ones.
    assert len(resumed) == 1 and killed["step"] <= resumed[0]["step"] < 120
    assert outcome.redone_steps >= 0 and report.evaluation.metrics["auc"] > 0.75
    # The history carries one entry per reported step, without duplicates from the redone stretch.
    steps = [h["step"] for h in outcome.history]
    assert steps == sorted(set(steps)) and steps[-1] == 120


def test_streamed_ingest_trains_the_same_model_from_one_file_at_a_time(settings, ray_handle, learnable):
    """ingest: stream builds XGBoost's quantised matrix from the shard file by file; it sees the same
    rows and reaches the same held-out AUC as the in-memory path (the quantile sketch of batches may
    place a bin edge differently, so the models need not be bit-identical)."""
    from lakeray.training.api import train

    base = _spec(learnable, 1, 40, 20, "ingest_memory")
    memory = train(settings, base, register=False)
    streamed = train(settings, base.model_copy(update={"ingest": "stream", "name": "ingest_stream"}),
                     register=False)
    assert memory.summary()["ingest"] == "memory" and streamed.summary()["ingest"] == "stream"
    assert streamed.outcome.train_rows == memory.outcome.train_rows
    assert streamed.outcome.valid_rows == memory.outcome.valid_rows
    assert streamed.outcome.steps == 40
    assert streamed.evaluation.metrics["auc"] == pytest.approx(memory.evaluation.metrics["auc"], abs=0.01)


def outcome_events(outcome) -> list[dict]:
    with open(os.path.join(outcome.run_dir, "progress.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_a_killed_driver_is_resumed_with_resume_run(settings, learnable, tmp_path):
    import yaml

    spec = _spec(learnable, 1, 300, 20, "driver_kill").model_dump(mode="json")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "LAKERAY_STORAGE__ROOT": settings.storage_root, "LAKERAY_RAY__OP_TIMEOUT_S": "300"}
    cli = [os.path.join(os.path.dirname(sys.executable), "lakeray"), "--config", str(REPO / "lakeray.yaml")]
    runs = Path(settings.storage_root, "train_runs")
    before = set(runs.glob("driver_kill-*")) if runs.exists() else set()
    driver = subprocess.Popen([*cli, "train", str(spec_file), "--json"], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        run_dir = None
        while time.monotonic() < deadline and driver.poll() is None:
            found = set(runs.glob("driver_kill-*")) - before if runs.exists() else set()
            if found:
                run_dir = found.pop()
                progress = run_dir / "progress.jsonl"
                steps = [json.loads(x)["step"] for x in progress.read_text().splitlines()
                         if '"checkpoint"' in x] if progress.exists() else []
                if steps and max(steps) >= 40:
                    break
            time.sleep(0.2)
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert run_dir is not None, "the run never checkpointed"
        # The driver and every process of the local Ray it started (raylet, GCS, the training worker,
        # which Ray started in sessions of their own): a crashed session, not a polite exit.
        kill_tree(driver.pid)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    # Ray stops the dead driver's worker a few seconds later (it may save more checkpoints meanwhile):
    # wait until the run folder is quiet before resuming.
    progress = run_dir / "progress.jsonl"
    quiet_since, last = time.monotonic(), progress.stat().st_mtime
    while time.monotonic() - quiet_since < 5 and time.monotonic() < deadline + 60:
        time.sleep(0.5)
        if progress.stat().st_mtime != last:
            quiet_since, last = time.monotonic(), progress.stat().st_mtime
    checkpointed = max(int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_*") if "." not in p.name)
    assert 40 <= checkpointed < 300, "the run finished before the driver was killed"
    resumed = subprocess.run([*cli, "train", "--resume", run_dir.name, "--json", "--no-register"], env=env,
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout[resumed.stdout.index("{"):])
    assert summary["steps"] == 300 and summary["run_id"] == run_dir.name
    events = [json.loads(x) for x in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [checkpointed]
    assert summary["redone_steps"] >= 0 and summary["metrics"]["auc"] > 0.75
