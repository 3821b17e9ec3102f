"""Where a scheduled train or serve spec runs: the same command a user types (``lakeray train SPEC``,
``lakeray serve deploy SPEC``), either as a child process of the Dagster run (the embedded default; Ray
stays out of the run process) or, when the profile names a Ray cluster's dashboard
(``ray.dashboard_address``: a cluster profile), as a Ray job on that cluster through ``lakeray jobs``'
submission path, so training uses the cluster's workers and not the scheduler's host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lakeray.config import Settings
    from lakeray.scheduler.plan import Task

__all__ = ["SpecRun", "spec_route", "spec_command", "run_spec"]

Route = Literal["ray-job", "process"]


@dataclass(frozen=True)
class SpecRun:
    ok: bool
    route: Route
    message: str  # what failed, or empty
    output: str  # the last lines of the command's output
    ray_job_id: str | None = None
    ray_address: str | None = None


def spec_route(settings: Settings) -> Route:
    """A profile with ``ray.dashboard_address`` runs specs on that cluster as Ray jobs; else in process."""
    return "ray-job" if settings.profile.ray.dashboard_address else "process"


def spec_command(settings: Settings, task: Task, route: Route) -> list[str]:
    """The command line of ``task``. A Ray job runs in the uploaded project folder with the profile in its
    environment, so it names the spec relative to the project; a child process gets the full command."""
    verb = ["train"] if task.kind == "train" else ["serve", "deploy"]
    if route == "ray-job":
        return ["lakeray", *verb, os.path.relpath(task.target, settings.project_dir)]
    config = [] if settings.source.startswith("<") else ["--config", settings.source]
    return [*_lakeray_command(), *config, "--profile", settings.profile_name, *verb, task.target]


def _lakeray_command() -> list[str]:
    script = Path(sys.executable).with_name("lakeray")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from lakeray.cli.main import main; main()"]


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_spec(settings: Settings, task: Task, submission_id: str, log=print) -> SpecRun:
    """Run ``task`` where :func:`spec_route` says; bounded by ``task.timeout_s``. ``submission_id``
    names the Ray job (unique per run attempt, so a retried step never collides with its first try)."""
    route = spec_route(settings)
    command = spec_command(settings, task, route)
    verb = " ".join(command[command.index("train" if task.kind == "train" else "serve"):][:-1])
    if route == "process":
        log(f"running {' '.join(command)}")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=task.timeout_s,
                                  cwd=settings.project_dir)
        except subprocess.TimeoutExpired:
            return SpecRun(False, route, f"{task.name}: `{verb}` ran past timeout_s={task.timeout_s}", "")
        output = _tail(done.stdout + done.stderr)
        failed = f"{task.name}: `lakeray {verb}` exited {done.returncode}" if done.returncode else ""
        return SpecRun(not failed, route, failed, output)
    from lakeray.cluster import jobs
    from lakeray.errors import ClusterError

    submitted = jobs.submit(settings, command, submission_id=submission_id)
    address = submitted.target.address
    log(f"submitted {' '.join(command)} as Ray job {submitted.job_id} to {address}")
    try:
        state = jobs.wait(settings, submitted.job_id, timeout_s=task.timeout_s, target=submitted.target)
    except ClusterError:  # past timeout_s: the job is stopped, not left running on the cluster
        jobs.stop(settings, submitted.job_id, address=address)
        return SpecRun(False, "ray-job", f"{task.name}: Ray job {submitted.job_id} ran past timeout_s={task.timeout_s} "
                       "and was stopped", "", submitted.job_id, address)
    output = _tail(jobs.logs(settings, submitted.job_id, address=address))
    failed = "" if state["status"] == "SUCCEEDED" else (
        f"{task.name}: Ray job {submitted.job_id} {state['status']} (exit {jobs.exit_code(state)}): "
        f"{state.get('message') or ''}".strip())
    return SpecRun(not failed, "ray-job", failed, output, submitted.job_id, address)
