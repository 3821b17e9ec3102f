"""Schedules from the declarations: validation before anything is scheduled, the plan (dependency order,
grouping), next due times, and the Dagster definitions generated from it (no Spark session needed)."""

import datetime as dt
import textwrap
from pathlib import Path

import pytest

from lakeray.cli.main import main
from lakeray.config import load_settings
from lakeray.errors import ConfigError
from lakeray.scheduler.plan import load_plan, next_runs

JOBS = '''
from lakeray.features import feature_job

@feature_job(name="p_clean", inputs=["p_events"], schedule="*/5 * * * *", retries=2, timeout_s=60, catchup="all")
def p_clean(p_events):
    return p_events

@feature_job(name="p_totals", inputs=["p_clean"], timeout_s=30)
def p_totals(p_clean):
    return p_clean

@feature_job(name="p_daily", inputs=["p_events"], write_mode="partitions", partition_by=["day"],
             partitions_start="2026-03-01", schedule="0 2 * * *", timezone="Europe/Berlin")
def p_daily(p_events, start=None, end=None):
    return p_events
'''


def project(tmp_path: Path, jobs: str = JOBS, schedules: str | None = None):
    (tmp_path / "jobs" / "features").mkdir(parents=True)
    (tmp_path / "jobs" / "features" / "p_jobs.py").write_text(textwrap.dedent(jobs))
    (tmp_path / "lakeray.yaml").write_text("profiles:\n  local:\n    storage: {root: lakehouse}\n")
    if schedules is not None:
        (tmp_path / "jobs" / "schedules.yaml").write_text(textwrap.dedent(schedules))
    return load_settings(tmp_path / "lakeray.yaml", "local", environ={})


def test_plan_orders_by_inputs_and_runs_unscheduled_downstream_jobs_in_the_same_run(tmp_path):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "train.yaml").write_text("model: {kind: xgboost}\n")
    settings = project(tmp_path, schedules="""
        schedules:
          - {name: retrain, train: specs/train.yaml, cron: "0 3 * * 1", after: [p_totals], timeout_s: 900}
        alerts: {webhook: "http://127.0.0.1:9/hook"}
    """)
    plan = load_plan(settings)
    assert plan.external == ("p_events",)
    order = list(plan.tasks)
    assert order.index("p_clean") < order.index("p_totals") < order.index("retrain")
    by_name = {s.name: s for s in plan.schedules}
    clean = by_name["p_clean_schedule"]
    # p_totals declares no schedule: it runs after p_clean in p_clean's run, for the same interval.
    assert clean.tasks == ("p_clean", "p_totals") and clean.catchup == "all" and not clean.partitioned
    assert plan.run_timeout(clean) == 90 and plan.run_retries(clean) == 2
    assert by_name["p_daily_schedule"].partitioned and by_name["p_daily_schedule"].tasks == ("p_daily",)
    assert plan.tasks["retrain"].kind == "train" and plan.tasks["retrain"].deps == ("p_totals",)
    assert plan.alerts is not None and plan.alerts.webhook == "http://127.0.0.1:9/hook"
    import dagster as dg

    from lakeray.scheduler.assets import build_definitions

    defs = build_definitions(settings, plan)
    dg.Definitions.validate_loadable(defs)
    assert [s.name for s in defs.sensors] == ["lakeray_failure_webhook"]
    assert defs.resolve_assets_def("retrain").group_names_by_key[dg.AssetKey("retrain")] == "train"
    # Next runs come in the schedule's zone, across the DST change (Berlin: 02:00 +01:00 → +02:00).
    runs = next_runs(by_name["p_daily_schedule"], 2, dt.datetime(2026, 3, 28, 12, tzinfo=dt.timezone.utc))
    assert [r.isoformat() for r in runs] == ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"]


def test_definitions_load_with_deps_partitions_retries_and_schedules(tmp_path):
    import dagster as dg

    from lakeray.scheduler.assets import build_definitions

    defs = build_definitions(project(tmp_path))
    dg.Definitions.validate_loadable(defs)
    graph = defs.get_repository_def().asset_graph
    parents = {k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys)
               for k in graph.get_all_asset_keys()}
    assert parents == {"p_events": [], "p_clean": ["p_events"], "p_totals": ["p_clean"], "p_daily": ["p_events"]}
    daily = defs.resolve_assets_def("p_daily")
    assert isinstance(daily.partitions_def, dg.DailyPartitionsDefinition)
    assert daily.partitions_def.start.date() == dt.date(2026, 3, 1)
    policy = defs.resolve_assets_def("p_clean").op.retry_policy
    assert policy.max_retries == 2 and policy.backoff == dg.Backoff.EXPONENTIAL
    assert {s.name: (s.cron_schedule, s.execution_timezone) for s in defs.schedules} == {
        "p_clean_schedule": ("*/5 * * * *", "UTC"), "p_daily_schedule": ("0 2 * * *", "Europe/Berlin")}
    # A run's limits travel as tags: max_runtime = the tasks' timeouts summed (run monitoring cancels
    # the run after it), max_retries = re-executions of a run whose worker died (at least 5: a
    # re-execution can be hit by the next crash).
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def(),
                                            scheduled_execution_time=dt.datetime(2026, 3, 2, 10, 5, tzinfo=dt.timezone.utc))
        (request,) = defs.get_repository_def().get_schedule_def("p_clean_schedule").evaluate_tick(context).run_requests
    assert request.tags["dagster/max_runtime"] == "90" and request.tags["dagster/max_retries"] == "5"


@pytest.mark.parametrize("declaration, message", [
    ('schedule="61 * * * *"', r"p_jobs.py: feature job 'p_bad': schedule: cron '61 \* \* \* \*': minute field '61'"),
    ('schedule="@daily", timezone="Mars/Olympus"', r"feature job 'p_bad': timezone: unknown time zone 'Mars/Olympus'"),
    ('schedule="0 0 * *"', r"feature job 'p_bad': schedule: cron '0 0 \* \*' must have 5 fields"),
    ('retries=-1', r"feature job 'p_bad': retries: Input should be greater than or equal to 0"),
])
def test_bad_declarations_fail_naming_job_and_field(tmp_path, declaration, message):
    settings = project(tmp_path, JOBS + f'''
@feature_job(name="p_bad", inputs=["p_events"], {declaration})
def p_bad(p_events):
    return p_events
''')
    with pytest.raises(ConfigError, match=message):
        load_plan(settings)


@pytest.mark.parametrize("entry, message", [
    ('{name: s1, feature: nope, cron: "@hourly"}', r"schedules.yaml: s1: feature: no feature job named 'nope'"),
    ('{name: s1, feature: p_clean, cron: "@hourly"}', r"s1: feature job 'p_clean' is already scheduled in .*p_jobs.py"),
    ('{name: s1, feature: p_totals, cron: "0 25 * * *"}', r"schedules.yaml: schedules.0.cron: cron '0 25 \* \* \*': hour"),
    ('{name: s1, feature: p_totals, cron: "@hourly", timezone: Nowhere}', r"schedules.0.timezone: unknown time zone"),
    ('{name: s1, feature: p_totals, train: x.yaml, cron: "@hourly"}', r"exactly one of feature, train, serve"),
    ('{name: s1, train: missing.yaml, cron: "@hourly"}', r"s1: train: spec file .*missing.yaml does not exist"),
    ('{name: s1, feature: p_totals, cron: "@hourly", every: 2}', r"schedules.0.every: unknown key"),
    ('{name: s1, feature: p_totals, cron: "@hourly"}\nalerts: {webhook: "ftp://x"}', r"alerts.webhook: String should match"),
    ('{name: s1, feature: p_clean_x, cron: "@hourly"}', r"no feature job named 'p_clean_x' \(known: p_clean, p_daily"),
])
def test_bad_schedule_entries_fail_naming_entry_and_field(tmp_path, entry, message):
    settings = project(tmp_path, schedules=f"schedules:\n  - {entry}\n")
    with pytest.raises(ConfigError, match=message):
        load_plan(settings)


def test_dependency_cycle_is_refused(tmp_path):
    settings = project(tmp_path, schedules="""
        schedules:
          - {name: s_totals, feature: p_totals, cron: "@hourly", after: [p_loop]}
    """, jobs=JOBS + '''
@feature_job(name="p_loop", inputs=["p_totals"])
def p_loop(p_totals):
    return p_totals
''')
    with pytest.raises(ConfigError, match="dependency cycle between scheduled tasks: p_loop → p_totals → p_loop"):
        load_plan(settings)


def lakeray(capsys, *args: str) -> tuple[int, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_list_show_next_start_nothing(tmp_path, monkeypatch, capsys):
    settings = project(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out = lakeray(capsys, "schedule", "list", "--json")
    assert code == 0 and '"tasks": ["p_clean", "p_totals"]' in out, out
    code, out = lakeray(capsys, "schedule", "next", "p_totals", "-n", "3", "--after", "2026-12-01T00:03:00Z")
    assert code == 0, out
    assert out.split("\n")[:3] == [f"2026-12-01T00:{m}:00+00:00  p_clean_schedule  p_clean → p_totals"
                                   for m in ("05", "10", "15")]
    code, out = lakeray(capsys, "schedule", "show", "p_daily")
    assert code == 0 and "daily_partitions_from: '2026-03-01'" in out and "timezone: Europe/Berlin" in out, out
    assert not Path(settings.storage_root).exists()  # nothing was started or written
    code, out = lakeray(capsys, "schedule", "next", "--after", "yesterday")
    assert code == 2 and "--after 'yesterday' is not an ISO time" in out


@pytest.mark.parametrize("job, first, stop, message", [
    ("p_daily", "2026-03-05", "2026-03-02", r"schedule backfill p_daily: --to 2026-03-02 is not after --from 2026-03-05"),
    ("p_daily", "2026-02-01", "2026-03-02", r"p_daily: --from 2026-02-01 is before partitions_start 2026-03-01"),
    ("p_daily", "March", "2026-03-02", r"p_daily: --from 'March' is not an ISO date"),
    ("p_clean", "2026-03-01", "2026-03-02", r"p_clean: partitions_start: the job is not daily-partitioned"),
    ("p_nope", "2026-03-01", "2026-03-02", r"no feature job named 'p_nope'"),
])
def test_backfill_range_errors_name_job_and_field(tmp_path, job, first, stop, message):
    from lakeray.scheduler.backfill import check_range

    settings = project(tmp_path)
    with pytest.raises(ConfigError, match=message):
        check_range(settings, job, first, stop)
    assert check_range(settings, "p_daily", "2026-03-01", "2026-03-03") == ["2026-03-01", "2026-03-02"]


def test_train_and_serve_runs_go_to_the_ray_cluster_on_a_cluster_profile_else_run_in_process(tmp_path):
    import socket

    from lakeray.errors import ClusterError
    from lakeray.scheduler.spec_runs import run_spec, spec_command, spec_route

    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "train.yaml").write_text("model: {kind: xgboost}\n")  # invalid: no training_set
    settings = project(tmp_path, schedules="""
        schedules:
          - {name: retrain, train: specs/train.yaml, cron: "0 3 * * 1", timeout_s: 120}
    """)
    task = load_plan(settings).tasks["retrain"]
    assert spec_route(settings) == "process"
    command = spec_command(settings, task, "process")
    assert command[-2:] == ["train", str(tmp_path / "specs" / "train.yaml")] and "--profile" in command
    # In process: the real `lakeray train` ran and refused the spec; its output is the run's.
    done = run_spec(settings, task, "lakeray-retrain-test-0", log=lambda _: None)
    assert not done.ok and done.route == "process" and "exited 2" in done.message and "training_set" in done.output

    # A cluster profile (a Ray dashboard address): the same command, relative to the uploaded project,
    # submitted as a Ray job; a cluster that does not answer is one clear error, nothing run locally.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    cluster = load_settings(tmp_path / "lakeray.yaml", "local",
                            environ={"LAKERAY_RAY__DASHBOARD_ADDRESS": f"http://127.0.0.1:{port}"})
    assert spec_route(cluster) == "ray-job"
    assert spec_command(cluster, task, "ray-job") == ["lakeray", "train", "specs/train.yaml"]
    with pytest.raises(ClusterError, match=f"127.0.0.1:{port}.*ray.dashboard_address"):
        run_spec(cluster, task, "lakeray-retrain-test-1", log=lambda _: None)
