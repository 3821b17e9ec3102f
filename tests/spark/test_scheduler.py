"""Feature jobs scheduled on Dagster: scheduled runs through Dagster's execution with the real Spark
runner (Delta version and input versions as materialisation metadata), one run per interval (run keys,
catch-up after downtime), partitions, retries, and the project's daemon + webserver started and stopped."""

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lakeray.config import load_settings
from lakeray.features.runner import read_ledger
from lakeray.lakehouse.delta import read_table, table_history, table_version, write_table

pytestmark = pytest.mark.spark

UTC = dt.timezone.utc

JOBS = '''
from pathlib import Path
from pyspark.sql import functions as F
from lakeray.features import feature_job

@feature_job(name="sc_clean", inputs=["sc_events"], entity_keys=["user_id", "event_time"],
             schedule="*/5 * * * *", catchup="all", retries=1)
def sc_clean(sc_events):
    return sc_events.where(F.col("amount") >= 0)

@feature_job(name="sc_totals", inputs=["sc_clean"], entity_keys=["user_id"])
def sc_totals(sc_clean):
    return sc_clean.groupBy("user_id").agg(F.sum("amount").alias("total"))

@feature_job(name="sc_daily", inputs=["sc_events"], entity_keys=["user_id"], write_mode="partitions",
             partition_by=["day"], partitions_start="2026-03-01", schedule="0 2 * * *", timezone="Europe/Berlin")
def sc_daily(sc_events, start=None, end=None):
    df = sc_events.withColumn("day", F.to_date("event_time"))
    df = df.where((F.col("day") >= start) & (F.col("day") < end))
    return df.groupBy("user_id", "day").agg(F.sum("amount").alias("amount"))

@feature_job(name="sc_flaky", inputs=["sc_events"], retries=1, retry_delay_s=0)
def sc_flaky(sc_events):
    marker = Path(__file__).with_name("flaky.marker")
    if not marker.exists():  # the first attempt fails, as a lost executor would
        marker.write_text("failed once")
        raise RuntimeError("transient failure")
    return sc_events.select("user_id").distinct()

@feature_job(name="sc_broken", inputs=["sc_events"], retries=1, retry_delay_s=0)
def sc_broken(sc_events):
    raise ValueError("bad row in sc_events")
'''


def write_project(folder: Path, jobs: str) -> Path:
    (folder / "jobs" / "features").mkdir(parents=True)
    (folder / "jobs" / "features" / "sc_jobs.py").write_text(textwrap.dedent(jobs))
    (folder / "lakeray.yaml").write_text(textwrap.dedent("""\
        profiles:
          local:
            spark: {master: "local[2]", driver_memory: 1g, shuffle_partitions: 2}
            storage: {root: lakehouse}
        """))
    return folder / "lakeray.yaml"


@pytest.fixture(scope="module")
def project(spark, tmp_path_factory):
    settings = load_settings(write_project(tmp_path_factory.mktemp("sched"), JOBS), "local", environ={})
    rows = [(u, f"2026-03-0{d} 1{u}:00:00", float(d * 10 + u) * (-1 if u == 2 and d == 1 else 1))
            for d in range(1, 4) for u in range(3)]
    events = spark.createDataFrame(rows, "user_id long, event_time string, amount double").selectExpr(
        "user_id", "cast(event_time as timestamp) as event_time", "amount")
    write_table(events, settings.table_path("sc_events"))
    return settings


@pytest.fixture(scope="module")
def dagster_env(project, spark, tmp_path_factory):
    import dagster as dg

    from lakeray.scheduler.assets import build_definitions

    from lakeray.scheduler.service import dagster_home

    home = dagster_home(project)  # the project's own storage, which `lakeray runs list` reads
    home.mkdir(parents=True)
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        yield build_definitions(project, spark=spark), instance


def tick(defs, instance, name, when):
    import dagster as dg

    repository = defs.get_repository_def()
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=when, repository_def=repository)
    return repository.get_schedule_def(name).evaluate_tick(context)


def test_scheduled_run_commits_each_job_once_and_records_delta_versions(spark, project, dagster_env):
    import dagster as dg

    defs, instance = dagster_env
    due = dt.datetime(2026, 11, 28, 10, 5, tzinfo=UTC)
    requests = tick(defs, instance, "sc_clean_schedule", due).run_requests
    assert [r.run_key for r in requests] == ["sc_clean_schedule:2026-11-28T10:05:00+00:00"]
    assert requests[0].tags["lakeray/interval"] == "2026-11-28T10:05:00+00:00"
    result = defs.resolve_job_def("sc_clean_schedule_job").execute_in_process(instance=instance, tags=requests[0].tags)
    assert result.success
    # Dependency order within the run: sc_totals (input sc_clean, no schedule of its own) ran after sc_clean.
    steps = [e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"]
    assert steps == ["sc_clean", "sc_totals"]
    versions = {t: table_version(spark, project.table_path(t)) for t in ("sc_events", "sc_clean", "sc_totals")}
    clean = instance.get_latest_materialization_event(dg.AssetKey("sc_clean")).asset_materialization.metadata
    totals = instance.get_latest_materialization_event(dg.AssetKey("sc_totals")).asset_materialization.metadata
    assert clean["delta_version"].value == versions["sc_clean"]
    assert clean["input_versions"].value == {"sc_events": versions["sc_events"]}
    assert totals["delta_version"].value == versions["sc_totals"]
    assert totals["input_version/sc_clean"].value == versions["sc_clean"]
    assert read_table(spark, project.table_path("sc_clean")).count() == 8  # the negative amount was dropped
    ledger = read_ledger(project)  # lakeray's own runner ran: one ledger entry per job, with the same run id
    assert [(e["table"], e["status"]) for e in ledger if e["table"] in ("sc_clean", "sc_totals")] == [
        ("sc_clean", "committed"), ("sc_totals", "committed")]
    assert clean["lakeray_run_id"].value == next(e["run_id"] for e in ledger if e["table"] == "sc_clean")

    # The same tick evaluated again (a daemon restarted mid-tick): no second run for that interval.
    again = tick(defs, instance, "sc_clean_schedule", due)
    assert again.run_requests == [] and "already has a run" in again.skip_message
    # The daemon was down for three intervals: catch-up "all" asks for each missed one, once, in order.
    later = due + dt.timedelta(minutes=15)
    keys = [r.run_key for r in tick(defs, instance, "sc_clean_schedule", later).run_requests]
    assert keys == [f"sc_clean_schedule:2026-11-28T10:{m}:00+00:00" for m in (10, 15, 20)]
    assert [r.run_key for r in tick(defs, instance, "sc_clean_schedule", later).run_requests] == keys


def test_partitioned_schedule_runs_the_interval_day_and_latest_policy_skips_missed(spark, project, dagster_env):
    import dagster as dg

    defs, instance = dagster_env
    # 02:00 in Berlin on 3 March: the run processes the day before (the previous due time's date).
    due = dt.datetime(2026, 3, 3, 2, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    (request,) = tick(defs, instance, "sc_daily_schedule", due).run_requests
    assert request.partition_key == "2026-03-02" and request.run_key == "sc_daily_schedule:2026-03-03T01:00:00+00:00"
    result = defs.resolve_job_def("sc_daily_schedule_job").execute_in_process(
        instance=instance, tags=request.tags, partition_key=request.partition_key)
    assert result.success
    event = instance.get_latest_materialization_event(dg.AssetKey("sc_daily"))
    assert event.dagster_event.partition == "2026-03-02"
    assert event.asset_materialization.metadata["delta_version"].value == table_version(spark, project.table_path("sc_daily"))
    days = {r["day"].isoformat() for r in read_table(spark, project.table_path("sc_daily")).select("day").collect()}
    assert days == {"2026-03-02"}
    # catchup "latest" (the default): after two missed days only the latest interval runs.
    later = due + dt.timedelta(days=3)
    assert [r.partition_key for r in tick(defs, instance, "sc_daily_schedule", later).run_requests] == ["2026-03-05"]


def test_backfill_through_dagster_skips_days_committed_by_the_same_code(spark, project, dagster_env):
    from lakeray.scheduler.backfill import backfill_days

    _, instance = dagster_env
    # 2026-03-02 was committed by the scheduled run above (same code version): skipped, not rerun.
    seen = []
    first = backfill_days(project, "sc_daily", "2026-03-01", "2026-03-04", spark, instance, on_day=seen.append)
    assert [(d.day, d.status) for d in first] == [("2026-03-01", "committed"), ("2026-03-02", "skipped"),
                                                  ("2026-03-03", "committed")] and seen == first
    table = read_table(spark, project.table_path("sc_daily"))
    assert table.count() == 9 and table.select("day").distinct().count() == 3
    again = backfill_days(project, "sc_daily", "2026-03-01", "2026-03-04", spark, instance)
    assert [d.status for d in again] == ["skipped"] * 3 and again[-1].version == first[-1].version
    runs = instance.get_runs(__import__("dagster").RunsFilter(tags={"lakeray/backfill": instance.get_run_by_id(
        again[0].run_id).tags["lakeray/backfill"]}))
    assert len(runs) == 3  # one Dagster run per day, in its run history


def test_retry_policy_reruns_a_failed_job_through_the_runner(project, dagster_env):
    import dagster as dg

    defs, instance = dagster_env  # the asset comes with the definitions' resource (the session Spark)
    result = dg.materialize([defs.resolve_assets_def("sc_flaky")], instance=instance)
    assert result.success
    assert [e["status"] for e in read_ledger(project, "sc_flaky")] == ["failed", "committed"]


def test_a_run_failing_after_its_last_retry_posts_the_webhook(project, dagster_env):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import dagster as dg

    from lakeray.scheduler.alerts import failure_sensor, send_alert
    from lakeray.scheduler.plan import Alerts

    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        defs, instance = dagster_env
        result = dg.materialize([defs.resolve_assets_def("sc_broken")], instance=instance, raise_on_error=False,
                                tags={"lakeray/schedule": "sc_broken_schedule"})
        assert not result.success
        # Both attempts went through the runner and failed; then the run failed.
        assert [e["status"] for e in read_ledger(project, "sc_broken")] == ["failed", "failed"]
        alerts = Alerts(webhook=f"http://127.0.0.1:{server.server_address[1]}/hook", timeout_s=5)
        sensor = failure_sensor(alerts)
        context = dg.build_run_status_sensor_context(
            sensor_name=sensor.name, dagster_event=result.get_run_failure_event(), dagster_instance=instance,
            dagster_run=result.dagster_run).for_run_failure()
        sensor(context)
        (alert,) = received
        assert alert["event"] == "lakeray.run_failed" and alert["run_id"] == result.run_id
        assert alert["schedule"] == "sc_broken_schedule" and alert["failed"] == ["sc_broken"]
        assert "bad row in sc_events" in alert["error"]
        # A run Dagster will re-execute (its worker crashed) is not reported yet.
        retried = result.dagster_run.with_tags({**result.dagster_run.tags, "dagster/will_retry": "true"})
        assert send_alert(alerts, retried, "worker died") is False and len(received) == 1
    finally:
        server.shutdown()


def test_a_retried_interval_is_not_committed_twice_and_runs_list_merges_the_ledger(spark, project, dagster_env):
    import dagster as dg

    from lakeray.features.runner import run_feature_job
    from lakeray.scheduler.runs import list_runs, show_run

    defs, instance = dagster_env
    job = defs.resolve_job_def("sc_clean_schedule_job")
    tags = {"lakeray/schedule": "sc_clean_schedule", "lakeray/interval": "2026-11-28T11:00:00+00:00"}
    first = job.execute_in_process(instance=instance, tags=tags)
    versions = {t: table_version(spark, project.table_path(t)) for t in ("sc_clean", "sc_totals")}
    # The same interval again, as Dagster's run retry re-executes a run whose worker died after its
    # commits landed but before it reported success: skipped, nothing committed a second time.
    retry = job.execute_in_process(instance=instance, tags={**tags, "dagster/parent_run_id": first.run_id})
    assert retry.success and {t: table_version(spark, project.table_path(t)) for t in versions} == versions
    metadata = instance.get_latest_materialization_event(dg.AssetKey("sc_clean")).asset_materialization.metadata
    assert metadata["skipped"].value is True and metadata["delta_version"].value == versions["sc_clean"]
    history = [c["run"].get("interval") for c in table_history(spark, project.table_path("sc_clean"))]
    assert history.count(tags["lakeray/interval"]) == 1

    # `runs list`: Dagster runs and the feature ledger in one history, newest first.
    # The ledger stamps start times to the second: a run started in the retry's second could sort either way.
    time.sleep(1.1)
    standalone = run_feature_job(spark, project, "sc_totals")  # `lakeray features run`, outside Dagster
    rows = list_runs(project, limit=None)
    assert rows[0].source == "features" and rows[0].run_id == standalone.run_id
    assert rows[0].versions == {"sc_totals": standalone.version} and rows[0].status == "success"
    scheduled = list_runs(project, job="sc_clean_schedule", limit=None)
    assert [r.run_id for r in scheduled[:2]] == [retry.run_id, first.run_id]
    assert scheduled[0].retry_of == first.run_id and scheduled[0].interval == tags["lakeray/interval"]
    assert scheduled[0].versions == scheduled[1].versions == versions
    assert all(r.status == "success" and r.seconds is not None and r.reason is None for r in scheduled[:2])
    # The flaky job's two attempts (failed, committed) belong to its one Dagster run, not listed apart.
    (flaky,) = list_runs(project, job="sc_flaky", limit=None)
    ledger_ids = [e["run_id"] for e in read_ledger(project, "sc_flaky")]
    assert flaky.source == "dagster" and sorted(flaky.feature_runs) == sorted(ledger_ids)
    assert not [r for r in rows if r.source == "features" and r.run_id in ledger_ids]
    (broken,) = list_runs(project, job="sc_broken", status="failure")
    assert "sc_broken" in broken.reason, broken.reason  # Dagster's run failure names the failed step
    shown = show_run(project, broken.run_id[:8])
    assert "bad row in sc_events" in shown["error"] and [e["status"] for e in shown["ledger"]] == ["failed", "failed"]
    assert shown["logs"]["daemon_log"].endswith("lakeray_logs/dagster-daemon.log")
    assert len(list_runs(project, limit=3)) == 3

    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKERAY_")}
    cli = [sys.executable, "-c", "from lakeray.cli.main import main; main()", "--config", project.source, "runs"]
    listed = subprocess.run([*cli, "list", "--job", "sc_clean", "--json"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["run_id"] for line in listed.stdout.splitlines()][:2] == [retry.run_id, first.run_id]
    unknown = subprocess.run([*cli, "show", "no-such-run"], env=env, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "no run with id 'no-such-run'" in unknown.stderr
