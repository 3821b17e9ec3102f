"""Failure alerts: a run that failed after its last retry is POSTed as JSON to the configured webhook.

A Dagster run-failure sensor (evaluated by the daemon) calls :func:`send_alert`. A failed run that
Dagster will re-execute (a crashed worker, tag ``dagster/will_retry``) is not reported: its retry may
still succeed. Step retries happen inside the run, so a failed run has used all of them.
"""

from __future__ import annotations

import json
import urllib.request
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dagster as dg

    from lakeray.scheduler.plan import Alerts

__all__ = ["alert_payload", "send_alert", "failure_sensor"]


def alert_payload(run: Any, message: str, failed: list[str]) -> dict[str, Any]:
    tags = run.tags
    return {"event": "lakeray.run_failed", "run_id": run.run_id, "job": run.job_name,
            "schedule": tags.get("lakeray/schedule"), "interval": tags.get("lakeray/interval"),
            "partition": tags.get("dagster/partition"), "backfill": tags.get("lakeray/backfill"),
            "failed": failed, "error": message}


def send_alert(alerts: Alerts, run: Any, message: str, failed: list[str] | None = None) -> bool:
    """POST the alert unless Dagster will retry the run; True when one was sent. A refused or
    unreachable webhook raises, so the sensor tick fails and is shown (and retried) in the UI."""
    if run.tags.get("dagster/will_retry") == "true":
        return False
    body = json.dumps(alert_payload(run, message, failed or [])).encode()
    request = urllib.request.Request(alerts.webhook, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "lakeray-scheduler"})
    with urllib.request.urlopen(request, timeout=alerts.timeout_s) as response:
        response.read()
    return True


def failure_sensor(alerts: Alerts) -> dg.SensorDefinition:
    import dagster as dg

    @dg.run_failure_sensor(name="lakeray_failure_webhook", default_status=dg.DefaultSensorStatus.RUNNING,
                           description=f"POST failed runs to {alerts.webhook}")
    def _alert(context):
        steps = context.get_step_failure_events()
        error = steps[0].event_specific_data.error if steps and steps[0].event_specific_data else None
        while error is not None and error.cause is not None:  # past "Exceeded max_retries" to the job's own error
            error = error.cause
        message = context.failure_event.message or "run failed"
        send_alert(alerts, context.dagster_run, f"{message} {error.message.strip()}" if error else message,
                   [step.step_key for step in steps if step.step_key])  # a feature asset's step is its table

    return _alert
