"""What the scheduler runs and when: the feature-job declarations plus ``jobs/schedules.yaml``, validated
into one plan (tasks in dependency order, schedules) before anything is scheduled.

A task is one asset: a feature job (its table), or a training / serve spec scheduled in the YAML. A task
depends on the tables its job reads (declared ``inputs``) and on whatever its ``after:`` names.
Declarations with the same cron, time zone, catch-up policy and partitioning form one schedule: one run
per interval materialises them together, in dependency order, plus every unscheduled feature job
downstream of them (so a job whose input is another job's table runs after it, for the same interval).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lakeray.errors import ConfigError
from lakeray.features.spec import check_cron, check_timezone

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["Task", "Schedule", "Plan", "ScheduleEntry", "Alerts", "load_plan", "next_runs", "schedules_file"]

SCHEDULES_FILE = "jobs/schedules.yaml"


class ScheduleEntry(BaseModel):
    """One item of ``schedules:`` in jobs/schedules.yaml: what to run (exactly one of feature, train,
    serve) and when."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Name of the schedule (and of the "
                      "asset for train/serve entries): letters, digits, underscores.")
    feature: str | None = Field(None, description="A declared feature job to run.")
    train: str | None = Field(None, description="A training spec (project-relative path) run with `lakeray train`.")
    serve: str | None = Field(None, description="A serve spec run with `lakeray serve deploy`.")
    cron: str = Field(description="Cron expression (5 fields, or @hourly/@daily/@weekly/@monthly).")
    timezone: str = Field("UTC", description="IANA time zone the cron expression is read in.")
    retries: int = Field(0, ge=0, le=20, description="Retries of a failed run (exponential backoff).")
    retry_delay_s: float = Field(30.0, ge=0, description="Wait before the first retry; doubles each retry.")
    timeout_s: float | None = Field(None, gt=0, description="Longest a run may take before it is cancelled.")
    catchup: Literal["all", "latest"] = Field("latest", description="Intervals missed while the scheduler was "
                                              "down: run all of them, or only the latest.")
    after: list[str] = Field(default_factory=list, description="Tasks (feature tables, other entries) this "
                             "one runs after, besides a feature job's declared inputs.")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        return check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        return check_timezone(value)

    @model_validator(mode="after")
    def _one_target(self) -> "ScheduleEntry":
        if sum(x is not None for x in (self.feature, self.train, self.serve)) != 1:
            raise ValueError("give exactly one of feature, train, serve")
        return self


class Alerts(BaseModel):
    """``alerts:`` in jobs/schedules.yaml: where a run that failed after its last retry is reported."""

    model_config = ConfigDict(extra="forbid")

    webhook: str = Field(pattern=r"^https?://\S+$", description="URL that gets a JSON POST per failed run.")
    timeout_s: float = Field(10.0, gt=0, le=120, description="Timeout of one webhook call.")


class _SchedulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schedules: list[ScheduleEntry] = Field(default_factory=list, description="The schedules.")
    alerts: Alerts | None = Field(None, description="Failure alerts (a webhook).")


@dataclass(frozen=True)
class Task:
    """One asset the scheduler can materialise."""

    name: str  # asset key: the feature table, or the entry name of a train/serve spec
    kind: Literal["feature", "train", "serve"]
    target: str  # feature job name, or the spec file (absolute)
    deps: tuple[str, ...] = ()  # upstream assets: tables (written by tasks or not) and `after` names
    retries: int = 0
    retry_delay_s: float = 30.0
    timeout_s: float | None = None
    partitions_start: str | None = None  # daily-partitioned asset from this day (partitions jobs)
    description: str = ""
    owner: str = ""


@dataclass(frozen=True)
class Schedule:
    """One Dagster schedule: one run per interval materialising ``tasks`` in order."""

    name: str
    cron: str
    timezone: str
    catchup: Literal["all", "latest"]
    tasks: tuple[str, ...]  # dependency order; declared ones first, then unscheduled downstream ones
    declared: tuple[str, ...]  # the tasks that carry this schedule in their declaration
    partitioned: bool = False


@dataclass(frozen=True)
class Plan:
    tasks: dict[str, Task]  # in dependency order
    schedules: list[Schedule]
    external: tuple[str, ...] = ()  # input tables no task writes (source assets)
    sources: dict[str, str] = field(default_factory=dict)  # task → where its schedule is declared
    alerts: Alerts | None = None

    def run_timeout(self, schedule: Schedule) -> float | None:
        """A run's limit: the sum of its tasks' timeouts, when every task declares one."""
        limits = [self.tasks[t].timeout_s for t in schedule.tasks]
        return None if any(x is None for x in limits) else float(sum(limits))  # type: ignore[arg-type]

    def run_retries(self, schedule: Schedule) -> int:
        return max(self.tasks[t].retries for t in schedule.tasks)

    def schedule_of(self, task: str) -> Schedule | None:
        return next((s for s in self.schedules if task in s.declared), None)


def schedules_file(settings: Settings) -> Path:
    return settings.project_dir / SCHEDULES_FILE


def _read_file(settings: Settings) -> _SchedulesFile:
    from lakeray.config import parse_spec, read_spec_file

    path = schedules_file(settings)
    if not path.is_file():
        return _SchedulesFile()
    data = read_spec_file(path, "schedules file", SCHEDULES_FILE)
    parsed = parse_spec(_SchedulesFile, data if data is not None else {}, SCHEDULES_FILE, SCHEDULES_FILE,
                        "fix the schedule entry (docs/scheduling.md lists the keys)", "docs/scheduling.md")
    names = [e.name for e in parsed.schedules]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{SCHEDULES_FILE}: schedule name(s) {twice} used twice", "give each entry its own name")
    return parsed


def _order(deps: dict[str, tuple[str, ...]]) -> list[str]:
    """Task names in dependency order; ConfigError naming a cycle."""
    done: list[str] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2 or name not in deps:
            return
        if state.get(name) == 1:
            cycle = " → ".join([*path[path.index(name):], name])
            raise ConfigError(f"dependency cycle between scheduled tasks: {cycle}",
                              "remove one of the inputs or `after:` entries that close the cycle")
        state[name] = 1
        for dep in deps[name]:
            visit(dep, [*path, name])
        state[name] = 2
        done.append(name)

    for name in sorted(deps):
        visit(name, [])
    return done


def load_plan(settings: Settings) -> Plan:
    """The validated plan of the project; ConfigError naming the job/entry and field on bad input
    (bad cron or zone, an unknown job, a job scheduled twice, a dependency cycle)."""
    from lakeray.features.runner import discover_jobs

    try:
        jobs = discover_jobs(settings)
    except ConfigError:
        if Path(settings.resolve(settings.profile.feature_paths[0])).is_dir():
            raise
        jobs = {}  # a project without feature folder can still schedule specs
    tasks: dict[str, Task] = {}
    declared: dict[str, tuple[str, str, str, str, str]] = {}  # task → (cron, tz, catchup, where, schedule name)
    for job in jobs.values():
        tasks[job.name] = Task(job.name, "feature", job.name, tuple(job.inputs), job.retries, job.retry_delay_s,
                               job.timeout_s, job.partitions_start if job.write_mode == "partitions" else None,
                               job.description, job.owner)
        if job.schedule is not None:
            declared[job.name] = (job.schedule, job.timezone, job.catchup, job.source, f"{job.name}_schedule")
    spec_file = _read_file(settings)
    for entry in spec_file.schedules:
        where = f"{SCHEDULES_FILE}: {entry.name}"
        extra = dict(retries=entry.retries, retry_delay_s=entry.retry_delay_s, timeout_s=entry.timeout_s)
        if entry.feature is not None:
            if entry.feature not in jobs:
                raise ConfigError(f"{where}: feature: no feature job named {entry.feature!r} (known: "
                                  f"{', '.join(sorted(jobs)) or 'none'})", "check the name (`lakeray features list`)")
            if entry.feature in declared:
                raise ConfigError(f"{where}: feature job {entry.feature!r} is already scheduled in "
                                  f"{declared[entry.feature][3]}", "schedule it in one place only")
            task = tasks[entry.feature]
            tasks[task.name] = Task(task.name, "feature", task.target, (*task.deps, *entry.after), **extra,
                                    partitions_start=task.partitions_start, description=task.description,
                                    owner=task.owner)
            declared[task.name] = (entry.cron, entry.timezone, entry.catchup, where, entry.name)
            continue
        kind = "train" if entry.train is not None else "serve"
        spec = settings.resolve(entry.train or entry.serve or "")
        if not Path(spec).is_file():
            raise ConfigError(f"{where}: {kind}: spec file {spec} does not exist", "give a project-relative path")
        if entry.name in tasks:
            raise ConfigError(f"{where}: name {entry.name!r} is already a feature table", "rename the entry")
        tasks[entry.name] = Task(entry.name, kind, spec, tuple(entry.after), **extra,
                                 description=f"lakeray {kind} {entry.train or entry.serve}")
        declared[entry.name] = (entry.cron, entry.timezone, entry.catchup, where, entry.name)
    for task in tasks.values():
        if task.kind != "feature":
            for dep in task.deps:
                if dep not in tasks:
                    raise ConfigError(f"{declared[task.name][3]}: after: no task named {dep!r}",
                                      "name a feature table or another schedule entry")
    order = _order({name: task.deps for name, task in tasks.items()})
    tasks = {name: tasks[name] for name in order}
    external = tuple(sorted({d for t in tasks.values() for d in t.deps if d not in tasks}))
    return Plan(tasks, _group(tasks, declared), external, {t: d[3] for t, d in declared.items()}, spec_file.alerts)


def _group(tasks: dict[str, Task], declared: dict[str, tuple[str, str, str, str, str]]) -> list[Schedule]:
    downstream: dict[str, list[str]] = {name: [] for name in tasks}
    for task in tasks.values():
        for dep in task.deps:
            if dep in downstream:
                downstream[dep].append(task.name)
    # One run materialises one partitions definition: daily-partitioned tasks group by their first day.
    groups: dict[tuple[str, str, str, str | None], list[str]] = {}
    for name in tasks:  # dependency order, so each group's members stay in it
        if name in declared:
            cron, zone, catchup = declared[name][:3]
            groups.setdefault((cron, zone, catchup, tasks[name].partitions_start), []).append(name)
    schedules = []
    for (cron, zone, catchup, first_day), members in groups.items():
        included = set(members)
        pending = list(members)
        while pending:  # unscheduled feature jobs downstream, through unscheduled ones only
            for child in downstream[pending.pop()]:
                task = tasks[child]
                if child not in included and child not in declared and task.kind == "feature" \
                        and task.partitions_start == first_day:
                    included.add(child)
                    pending.append(child)
        ordered = tuple(name for name in tasks if name in included)
        label = "__".join(sorted(declared[m][4] for m in members))  # `<job>_schedule`, or the YAML entry's name
        schedules.append(Schedule(label, cron, zone, catchup,  # type: ignore[arg-type]
                                  ordered, tuple(members), first_day is not None))
    return sorted(schedules, key=lambda s: s.name)


def next_runs(schedule: Schedule, count: int, after: dt.datetime | None = None) -> list[dt.datetime]:
    """The next ``count`` due times of ``schedule`` after ``after`` (default: now), in its time zone.

    Uses Dagster's own cron iterator, so the times are the ones the daemon will use (DST included).
    """
    from dagster._utils.schedules import cron_string_iterator

    start = (after or dt.datetime.now(dt.timezone.utc)).timestamp()
    times = cron_string_iterator(start, schedule.cron, schedule.timezone)
    out: list[dt.datetime] = []
    for when in times:
        if when.timestamp() > start:
            out.append(when)
        if len(out) == count:
            break
    return out
