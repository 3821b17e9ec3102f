"""The plan as Dagster definitions: one asset per task, one asset job and schedule per schedule.

A feature asset calls lakeray's own runner (``run_feature_job``), so quality gates, lineage and the run
ledger are the ones ``lakeray features run`` uses; its materialisation records the committed Delta
version and the input versions. Train and serve assets run ``lakeray train|serve deploy SPEC`` (the
same command a user types) in a child process, or as a Ray job on a cluster profile (spec_runs.py).

Exactly once per interval: each run request carries the run key ``<schedule>:<interval>`` and the
tags ``lakeray/schedule`` and ``lakeray/interval``. Dagster refuses a second run for the same key in
the same tick (a daemon killed mid-tick re-does the tick); the evaluation below also skips every
interval that already has a run, whichever tick asks, which is what makes catch-up safe to repeat.
A run re-executed after its worker died finds the commits it already made (the interval is in each
commit's metadata) and skips them, so a crash between commit and success never commits twice.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import dagster as dg

from lakeray.scheduler.plan import Plan, Schedule, Task, load_plan

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lakeray.config import Settings

__all__ = ["build_definitions", "evaluate_tick", "run_key", "SCHEDULE_TAG", "INTERVAL_TAG", "BACKFILL_TAG",
           "MAX_CATCHUP", "CRASH_RETRIES"]

SCHEDULE_TAG = "lakeray/schedule"
INTERVAL_TAG = "lakeray/interval"
BACKFILL_TAG = "lakeray/backfill"
MAX_CATCHUP = 100  # intervals one tick may catch up; beyond, the oldest are left to a backfill
CRASH_RETRIES = 5  # re-executions of one interval's run whose worker died (never of a job's own failure)


class Runtime:
    """What a run needs: the settings and a Spark session, started on first use (train/serve runs never
    start one) and stopped at the end of the run unless it was handed in."""

    def __init__(self, settings: Settings, spark: SparkSession | None = None):
        self.settings = settings
        self._spark = spark
        self._owned = False

    def spark(self) -> SparkSession:
        if self._spark is None:
            from lakeray.lakehouse.spark import create_spark_session

            self._spark = create_spark_session(self.settings)
            self._owned = True
        return self._spark

    def close(self) -> None:
        if self._owned and self._spark is not None:
            self._spark.stop()
            self._spark = None


def run_key(schedule: Schedule, interval: dt.datetime) -> str:
    return f"{schedule.name}:{_utc(interval)}"


def _utc(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat()


def _partition_key(schedule: Schedule, interval: dt.datetime) -> str:
    """The day an interval's data belongs to: the date (in the schedule's zone) of the previous due time,
    so a daily 02:00 run processes yesterday and an hourly run today."""
    from dagster._utils.schedules import reverse_cron_string_iterator

    previous = next(reverse_cron_string_iterator(interval.timestamp() - 1, schedule.cron, schedule.timezone))
    return previous.date().isoformat()


def _intervals(context: dg.ScheduleEvaluationContext, schedule: Schedule) -> list[dt.datetime]:
    tick = context.scheduled_execution_time
    if tick is None:  # evaluated by hand (the UI's "test schedule"): the latest due time
        from dagster._utils.schedules import reverse_cron_string_iterator

        tick = next(reverse_cron_string_iterator(dt.datetime.now(dt.timezone.utc).timestamp(), schedule.cron,
                                                 schedule.timezone))
    if schedule.catchup == "latest":
        return [tick]
    last = context.instance.get_runs(dg.RunsFilter(tags={SCHEDULE_TAG: schedule.name}), limit=1)
    if not last or INTERVAL_TAG not in last[0].tags:
        return [tick]  # the first run: nothing before it was ever due to this schedule
    from dagster._utils.schedules import cron_string_iterator

    since = dt.datetime.fromisoformat(last[0].tags[INTERVAL_TAG])
    missed: list[dt.datetime] = []
    for when in cron_string_iterator(since.timestamp(), schedule.cron, schedule.timezone):
        if when.timestamp() > tick.timestamp():
            break
        if when.timestamp() > since.timestamp():
            missed.append(when)
    return missed[-MAX_CATCHUP:] or [tick]


def evaluate_tick(context: dg.ScheduleEvaluationContext, plan: Plan, schedule: Schedule) -> list[dg.RunRequest] | dg.SkipReason:
    """Run requests for the intervals due at this tick that have no run yet (catch-up: all missed ones)."""
    requests = []
    timeout, retries = plan.run_timeout(schedule), plan.run_retries(schedule)
    for interval in _intervals(context, schedule):
        tags = {SCHEDULE_TAG: schedule.name, INTERVAL_TAG: _utc(interval),
                # A run whose worker died (daemon or host crash) is re-executed from the failed step,
                # up to CRASH_RETRIES times: the re-execution itself can be hit by the next crash (seen in
                # the soak test: two kills within a minute lost an interval with one). Failures of the
                # job itself are retried per step by the asset's RetryPolicy instead, never by these.
                "dagster/max_retries": str(max(CRASH_RETRIES, retries))}
        if timeout is not None:
            tags["dagster/max_runtime"] = str(int(timeout))
        if context.instance.get_runs(dg.RunsFilter(tags={SCHEDULE_TAG: schedule.name, INTERVAL_TAG: _utc(interval)}),
                                     limit=1):
            continue
        partition = None
        if schedule.partitioned:
            partition = _partition_key(schedule, interval)
            start = min(plan.tasks[t].partitions_start or partition for t in schedule.tasks)
            if partition < start:
                continue
        requests.append(dg.RunRequest(run_key=run_key(schedule, interval), tags=tags, partition_key=partition))
    return requests or dg.SkipReason("every due interval already has a run")


def _retry_policy(task: Task) -> dg.RetryPolicy | None:
    if task.retries == 0:
        return None
    return dg.RetryPolicy(max_retries=task.retries, delay=task.retry_delay_s, backoff=dg.Backoff.EXPONENTIAL)


def _partitions(task: Task) -> dg.DailyPartitionsDefinition | None:
    # end_offset=1: today's partition exists already, so an hourly schedule can refresh it.
    return None if task.partitions_start is None else dg.DailyPartitionsDefinition(task.partitions_start, end_offset=1)


def _feature_asset(task: Task) -> dg.AssetsDefinition:
    @dg.asset(name=task.name, deps=[dg.AssetKey(d) for d in task.deps], partitions_def=_partitions(task),
              retry_policy=_retry_policy(task), required_resource_keys={"lakeray"}, group_name="features",
              kinds={"spark", "delta"}, description=task.description or None,
              metadata={"owner": task.owner} if task.owner else None)
    def _materialise(context):  # no annotations: Dagster inspects them, and these are strings here
        from lakeray.features.runner import run_feature_job

        _refuse_timed_out_reexecution(context)
        runtime: Runtime = context.resources.lakeray
        start = end = None
        interval = context.run.tags.get(INTERVAL_TAG)
        # A re-executed run (its worker died) or a retried step may find its interval committed already;
        # a first attempt cannot, and skips the history read.
        if interval is not None and ("dagster/parent_run_id" in context.run.tags or context.retry_number > 0):
            done = _committed_interval(runtime, task.target, interval)
            if done is not None:
                context.log.info("%s %s: skipped, committed at version %s by the same code version",
                                 task.name, interval, done["version"])
                return dg.MaterializeResult(metadata={"delta_version": done["version"], "skipped": True,
                                                      "lakeray_run_id": done["run"].get("lakeray_run_id", "")})
        if context.has_partition_key:
            day = dt.date.fromisoformat(context.partition_key)
            start, end = day.isoformat(), (day + dt.timedelta(days=1)).isoformat()
            tags = context.run.tags
            if BACKFILL_TAG in tags or "dagster/backfill" in tags:  # the backfill rule of `features backfill`
                skipped = _committed_by_same_code(runtime, task.target, start, end)
                if skipped is not None:
                    context.log.info("%s %s: skipped, committed at version %s by the same code version",
                                     task.name, start, skipped["version"])
                    return dg.MaterializeResult(metadata={"delta_version": skipped["version"], "skipped": True})
        result = run_feature_job(runtime.spark(), runtime.settings, task.target, start=start, end=end,
                                 interval=interval, orchestrator_run=context.run_id)
        return dg.MaterializeResult(metadata={
            "delta_version": result.version,
            "input_versions": dg.MetadataValue.json(result.input_versions),
            **{f"input_version/{table}": version for table, version in result.input_versions.items()},
            "rows": result.rows,
            "lakeray_run_id": result.run_id,
            "code_version": result.code_version,
            "path": result.path,
            "seconds": round(result.seconds, 3),
            "skipped": False,
        })

    return _materialise


def _refuse_timed_out_reexecution(context: Any) -> None:
    """Fail, without retries, a step attempt that would carry on a run stopped by its timeout.

    Two of Dagster's retries cannot tell run monitoring's ``dagster/max_runtime`` cancel from a crash:
    - the step's RetryPolicy: the interrupted attempt can fail like any error (seen: an interrupt during
      Spark's start-up), and its retry would run the job, and commit, in a run already marked failed;
    - the run retries: scheduled runs carry ``dagster/max_retries`` so that a run whose worker died is
      re-executed, and the cancel is also a run failure without a step failure. The re-execution would
      only exceed the limit again, up to CRASH_RETRIES more times.
    The step failure raised here ends both, before Spark starts.
    """
    if context.retry_number > 0:
        run = context.instance.get_run_by_id(context.run_id)
        if run is not None and run.status in (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED,
                                              dg.DagsterRunStatus.FAILURE):
            cancels = context.instance.all_logs(context.run_id, of_type=dg.DagsterEventType.RUN_CANCELING)
            reason = cancels[0].dagster_event.message if cancels else f"status {run.status.value}"
            raise dg.Failure(f"not retried: this run was stopped ({reason})", allow_retries=False)
    parent = context.run.tags.get("dagster/parent_run_id")
    if parent is None:
        return
    failures = context.instance.all_logs(parent, of_type=dg.DagsterEventType.RUN_FAILURE)
    reason = next((e.dagster_event.message for e in failures
                   if (e.dagster_event.message or "").startswith("Exceeded maximum runtime")), None)
    if reason is not None:
        raise dg.Failure(f"not re-executed: run {parent} was cancelled by its timeout ({reason})",
                         allow_retries=False)


def _committed_by_same_code(runtime: Runtime, name: str, start: str, end: str) -> dict[str, Any] | None:
    from lakeray.features.backfill import committed_by_same_code
    from lakeray.features.runner import find_job
    from lakeray.lakehouse.delta import table_exists, table_history

    spark, path = runtime.spark(), runtime.settings.table_path(name)
    if not table_exists(spark, path):
        return None
    return committed_by_same_code(table_history(spark, path), find_job(runtime.settings, name).code_version, start, end)


def _committed_interval(runtime: Runtime, name: str, interval: str) -> dict[str, Any] | None:
    """The commit that already holds scheduled ``interval`` of table ``name`` from the job's current code
    version, or None: the per-interval marker that keeps a retried run from committing twice. Same rule
    as backfills (committed by the same code version → skipped); new code reruns the interval."""
    from lakeray.features.runner import find_job
    from lakeray.lakehouse.delta import table_exists, table_history

    spark, path = runtime.spark(), runtime.settings.table_path(name)
    if not table_exists(spark, path):
        return None
    code_version = find_job(runtime.settings, name).code_version
    # A retry runs soon after its interval: at most a catch-up's worth of newer commits lies above it.
    for commit in table_history(spark, path, limit=2 * MAX_CATCHUP):
        run = commit["run"]
        if run.get("interval") == interval and run.get("code_version") == code_version:
            return commit
    return None


def _spec_asset(task: Task) -> dg.AssetsDefinition:
    @dg.asset(name=task.name, deps=[dg.AssetKey(d) for d in task.deps], retry_policy=_retry_policy(task),
              required_resource_keys={"lakeray"}, group_name=task.kind, kinds={"ray"},
              description=task.description)
    def _run_spec(context):
        from lakeray.scheduler.spec_runs import run_spec

        _refuse_timed_out_reexecution(context)

        done = run_spec(context.resources.lakeray.settings, task,
                        f"lakeray-{task.name}-{context.run_id[:8]}-{context.retry_number}", context.log.info)
        metadata = {"spec": task.target, "route": done.route, "output": dg.MetadataValue.text(done.output)}
        if done.ray_job_id is not None:
            metadata.update(ray_job_id=done.ray_job_id, ray_address=done.ray_address)
        if not done.ok:
            raise dg.Failure(done.message, metadata=metadata)
        return dg.MaterializeResult(metadata=metadata)

    return _run_spec


def _schedule_def(plan: Plan, schedule: Schedule) -> dg.ScheduleDefinition:
    tasks = [plan.tasks[name] for name in schedule.tasks]
    timeout = plan.run_timeout(schedule)
    # The limit is on the job as well as on each run request: a run launched from the UI's launchpad
    # (or GraphQL's launchRun) of this job gets it too, not only the scheduled ones.
    job = dg.define_asset_job(f"{schedule.name}_job", selection=dg.AssetSelection.assets(*schedule.tasks),
                              partitions_def=_partitions(tasks[0]) if schedule.partitioned else None,
                              tags=None if timeout is None else {"dagster/max_runtime": str(int(timeout))})

    @dg.schedule(name=schedule.name, cron_schedule=schedule.cron, execution_timezone=schedule.timezone, job=job,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description=f"{', '.join(schedule.tasks)} at '{schedule.cron}' ({schedule.timezone}), "
                 f"catch-up: {schedule.catchup}")
    def _evaluate(context):
        return evaluate_tick(context, plan, schedule)

    return _evaluate


def _runtime_resource(settings: Settings) -> dg.ResourceDefinition:
    @dg.resource(description="lakeray settings and a Spark session started on first use")
    def _runtime(_: Any):
        runtime = Runtime(settings)
        try:
            yield runtime
        finally:
            runtime.close()

    return _runtime


def build_definitions(settings: Settings, plan: Plan | None = None, spark: SparkSession | None = None) -> dg.Definitions:
    """The project's code location: assets, asset jobs, schedules, and the ``lakeray`` resource.

    ``spark``: a session to run feature assets in (tests, notebooks); without one each run starts its
    own and stops it at the end. Runs execute in one process (``in_process_executor``) so every asset
    of a run shares that session instead of paying a Spark start-up per asset.
    """
    plan = plan or load_plan(settings)
    assets: list[Any] = [dg.AssetSpec(name, group_name="inputs", kinds={"delta"},
                                      description="An input table no feature job writes.") for name in plan.external]
    assets += [_feature_asset(t) if t.kind == "feature" else _spec_asset(t) for t in plan.tasks.values()]
    resource = dg.ResourceDefinition.hardcoded_resource(Runtime(settings, spark)) if spark is not None \
        else _runtime_resource(settings)
    sensors = []
    if plan.alerts is not None:
        from lakeray.scheduler.alerts import failure_sensor

        sensors.append(failure_sensor(plan.alerts))
    return dg.Definitions(assets=assets, schedules=[_schedule_def(plan, s) for s in plan.schedules], sensors=sensors,
                          resources={"lakeray": resource}, executor=dg.in_process_executor)
