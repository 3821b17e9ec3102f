"""``lakeray runs list|show``: one run history for the project, newest first.

Two sources, merged: the Dagster runs in the project's storage (scheduled runs, their retries,
`schedule backfill` days, runs launched from the UI) and lakeray's feature run ledger
(``<root>/_runs/feature_runs.jsonl``: every ``features run``/``backfill`` attempt). A ledger entry made
inside a Dagster run (the runner records the run's id in the entry) belongs to that run and is shown
with it, not twice; the others are runs of their own. Reading starts nothing: no
daemon, no Spark; Dagster's SQLite storage is opened read-only in spirit (no write is made).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lakeray.errors import ConfigError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["RunRow", "STATUSES", "list_runs", "show_run"]

# One vocabulary for both sources; Dagster's own status stays in RunRow.detail.
STATUSES = ("queued", "running", "success", "failure", "canceled")
_DAGSTER_STATUS = {"QUEUED": "queued", "NOT_STARTED": "queued", "MANAGED": "running", "STARTING": "running",
                   "STARTED": "running", "SUCCESS": "success", "FAILURE": "failure", "CANCELING": "running",
                   "CANCELED": "canceled"}
_LEDGER_STATUS = {"committed": "success", "running": "running"}  # failed, refused, interrupted → failure


@dataclass
class RunRow:
    """One run in the merged history."""

    run_id: str
    source: str  # dagster | features
    job: str  # the Dagster job (<schedule>_job), the assets of an ad-hoc run, or the feature table
    interval: str | None  # scheduled interval (UTC) or the partition/range it ran for
    status: str  # one of STATUSES
    detail: str  # the source's own status (Dagster's SUCCESS/FAILURE/…, the ledger's committed/refused/…)
    started_at: float | None  # epoch seconds
    seconds: float | None
    versions: dict[str, int] = field(default_factory=dict)  # table → Delta version committed by this run
    schedule: str | None = None
    retry_of: str | None = None  # the run this one re-executes
    feature_runs: list[str] = field(default_factory=list)  # ledger run ids made inside this run
    assets: list[str] = field(default_factory=list)  # the assets a Dagster run was launched for or ran
    # Why a run failed or was cancelled, one line: its timeout ("Exceeded maximum runtime of N seconds."),
    # Dagster's run failure message, or the ledger's error. None for the others.
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _instance(settings: Settings):
    """The project's Dagster instance (SQLite or the profile's Postgres), or None when nothing was ever
    scheduled here."""
    from lakeray.scheduler.service import open_instance

    return open_instance(settings, existing_only=True)


def _epoch(stamp: str | None) -> float | None:
    if not stamp:
        return None
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()


def _dagster_row(instance: Any, record: Any) -> RunRow:
    from dagster import DagsterEventType

    run = record.dagster_run
    tags = run.tags
    versions: dict[str, int] = {}
    ledger_ids: list[str] = []
    started: set[str] = set()  # a lakeray asset's step key is its table (failed steps materialise nothing)
    stops: list[str] = []  # run canceling/failure messages, oldest first
    for entry in instance.all_logs(run.run_id, of_type={DagsterEventType.ASSET_MATERIALIZATION,
                                                         DagsterEventType.STEP_START, DagsterEventType.RUN_CANCELING,
                                                         DagsterEventType.RUN_FAILURE}):
        kind = entry.dagster_event.event_type if entry.dagster_event is not None else None
        if kind == DagsterEventType.STEP_START:
            started.add(entry.step_key or "")
            continue
        if kind in (DagsterEventType.RUN_CANCELING, DagsterEventType.RUN_FAILURE):
            stops.append(" ".join((entry.message or "").split()))
            continue
        materialization = entry.asset_materialization
        if materialization is None:
            continue
        metadata = materialization.metadata
        table = materialization.asset_key.to_user_string()
        if "delta_version" in metadata:
            versions[table] = int(metadata["delta_version"].value)
        if "lakeray_run_id" in metadata and metadata["lakeray_run_id"].value and not (
                "skipped" in metadata and metadata["skipped"].value):
            ledger_ids.append(str(metadata["lakeray_run_id"].value))
    assets = sorted({key.to_user_string() for key in run.asset_selection or ()} | started - {""})
    # `materialize()` and the UI's "materialize selected" run Dagster's hidden asset job: name the assets.
    job = ", ".join(assets) if run.job_name.startswith("__") and assets else run.job_name
    start, end = record.start_time, record.end_time
    interval = tags.get("lakeray/interval") or tags.get("dagster/partition")
    status = _DAGSTER_STATUS.get(run.status.value, "running")
    return RunRow(run.run_id, "dagster", job, interval, status, run.status.value,
                  start or record.create_timestamp.timestamp(),
                  None if start is None or end is None else round(end - start, 2), versions,
                  tags.get("lakeray/schedule"), tags.get("dagster/parent_run_id"), ledger_ids, assets,
                  _stop_reason(stops) if status in ("failure", "canceled") else None)


def _stop_reason(messages: list[str]) -> str | None:
    """The run's timeout when run monitoring stopped it (the worker's own failure message, written a moment
    later, only says its step was interrupted), else its last failure/cancel message."""
    timeout = [m for m in messages if "maximum runtime" in m]
    exceeded = [m for m in timeout if m.startswith("Exceeded")]
    return (exceeded or timeout or messages or [None])[-1]


def _ledger_row(entry: dict[str, Any]) -> RunRow:
    status = entry.get("status", "running")
    rng = entry.get("range")
    interval = entry.get("interval") or (f"{rng[0]}..{rng[1]}" if rng else None)
    error = entry.get("error")
    return RunRow(entry["run_id"], "features", entry["table"], interval, _LEDGER_STATUS.get(status, "failure"),
                  status, _epoch(entry.get("started_at")), entry.get("seconds"),
                  {entry["table"]: entry["version"]} if status == "committed" and "version" in entry else {},
                  reason=str(error).strip().splitlines()[0] if error else None)


def _collect(settings: Settings) -> tuple[list[RunRow], list[dict[str, Any]]]:
    from lakeray.features.runner import read_ledger

    ledger = read_ledger(settings)
    rows: list[RunRow] = []
    instance = _instance(settings)
    if instance is not None:
        with instance:
            rows = [_dagster_row(instance, record) for record in instance.get_run_records()]
    # A ledger entry made inside a Dagster run names it (`orchestrator_run`); older entries are named by
    # the run's materialisation (`lakeray_run_id`), which failed attempts do not have.
    by_run = {row.run_id: row for row in rows}
    claimed = {rid for row in rows for rid in row.feature_runs}
    for entry in ledger:
        owner = by_run.get(entry.get("orchestrator_run", ""))
        if owner is not None and entry["run_id"] not in claimed:
            owner.feature_runs.append(entry["run_id"])
            claimed.add(entry["run_id"])
    rows += [_ledger_row(e) for e in ledger if e["run_id"] not in claimed]
    return sorted(rows, key=lambda r: r.started_at or 0, reverse=True), ledger


def _tasks_by_job(settings: Settings) -> dict[str, set[str]]:
    """Dagster job name → the tables its runs write, from the current plan (empty when it does not load)."""
    from lakeray.scheduler.plan import load_plan

    try:
        plan = load_plan(settings)
    except ConfigError:
        return {}
    return {f"{s.name}_job": set(s.tasks) for s in plan.schedules}


def _assets_of(row: RunRow, tasks_by_job: dict[str, set[str]]) -> set[str]:
    """The tables a Dagster run writes: what it materialised and was launched for, else its job's tasks."""
    return set(row.versions) | set(row.assets or tasks_by_job.get(row.job, set()))


def list_runs(settings: Settings, job: str | None = None, status: str | None = None,
              limit: int | None = 20) -> list[RunRow]:
    """The project's runs, newest first. ``job`` matches the Dagster job, its schedule, or a table the
    run wrote; ``status`` one of :data:`STATUSES`."""
    if status is not None and status not in STATUSES:
        raise ConfigError(f"runs list: --status {status!r} is not one of {', '.join(STATUSES)}", "pick one of them")
    tasks_by_job = _tasks_by_job(settings)
    rows, _ = _collect(settings)
    if job is not None:
        rows = [r for r in rows if job in (r.job, r.schedule, f"{job}_job")
                or (r.source == "dagster" and job in _assets_of(r, tasks_by_job))]
    if status is not None:
        rows = [r for r in rows if r.status == status]
    return rows if limit is None else rows[:limit]


def show_run(settings: Settings, run_id: str) -> dict[str, Any]:
    """One run (a Dagster run id, a unique prefix of one, or a ledger run id): its row, its feature runs
    from the ledger, its error, and where its logs are."""
    from lakeray.scheduler.service import _LOGS, dagster_home

    rows, ledger = _collect(settings)
    found = [r for r in rows if r.run_id == run_id] or [r for r in rows if r.run_id.startswith(run_id)]
    if len(found) != 1:
        raise ConfigError(f"runs show: {'no run' if not found else f'{len(found)} runs'} with id {run_id!r}",
                          "`lakeray runs list` shows the run ids")
    row = found[0]
    by_id = {e["run_id"]: e for e in ledger}
    data: dict[str, Any] = {**row.as_dict(), "ledger": [by_id[i] for i in row.feature_runs if i in by_id]}
    if row.source == "features":
        data["ledger"] = [by_id[row.run_id]]
        data["error"] = by_id[row.run_id].get("error")
        data["logs"] = {"ledger": str(Path(settings.storage_root, "_runs", "feature_runs.jsonl").resolve())}
        return data
    home = dagster_home(settings)
    instance = _instance(settings)
    assert instance is not None  # the row came from it
    with instance:
        from dagster import DagsterEventType

        failures = instance.all_logs(row.run_id, of_type={DagsterEventType.RUN_FAILURE, DagsterEventType.STEP_FAILURE})
        errors = [e.dagster_event.event_specific_data.error for e in failures
                  if e.dagster_event is not None and getattr(e.dagster_event.event_specific_data, "error", None)]
        data["error"] = _error_text(errors[0]) if errors else (failures[-1].message if failures else None)
        data["tags"] = dict(instance.get_run_by_id(row.run_id).tags)  # type: ignore[union-attr]
    compute = home / "storage" / row.run_id / "compute_logs"
    data["logs"] = {"compute_logs": str(compute) if compute.is_dir() else None,
                    "daemon_log": str(home / _LOGS / "dagster-daemon.log"),
                    "ui": _ui_url(settings, row.run_id)}
    return data


def _error_text(error: Any) -> str:
    """Dagster's error and, past wrappers such as "Exceeded max_retries", the job's own exception."""
    root = error
    while root.cause is not None:
        root = root.cause
    top = error.message.strip()
    return top if root is error else f"{top} (cause: {root.message.strip()})"


def _ui_url(settings: Settings, run_id: str) -> str | None:
    from lakeray.scheduler.service import status

    info = status(settings)
    return f"{info['url']}/runs/{run_id}" if info.get("running") else None
