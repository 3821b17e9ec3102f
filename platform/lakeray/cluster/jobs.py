"""``lakeray jobs``: lakeray commands and scripts as Ray jobs, over the Ray Jobs API (``JobSubmissionClient``).

The cluster is the profile's: ``--address``, else ``RAY_API_SERVER_ADDRESS`` (what ``ray job`` reads),
else ``ray.dashboard_address``, else the ``lakeray cluster up`` cluster of this storage root. Its
dashboard is probed with a bounded request before anything else, so a cluster that does not answer is
one clear error, not a hang. Ray 2.60's token auth: the token (``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``, where ``ray start`` writes it) goes in the
``Authorization`` header of every request, so the client does not depend on RAY_AUTH_MODE having been
set before ``import ray``.

A job runs in the project: the working dir is the project folder without what git ignores, ``.git``, the
local lakehouse and files over a size limit, checked against Ray's upload cap before the upload. Its
environment carries the profile, the absolute storage root and the submitter's ``LAKERAY_*`` overrides,
so the job reads the same config and tables as the command line that submitted it. Jobs submitted with
``ray job submit`` are ordinary jobs here: ``list``/``status``/``logs``/``stop`` work on them too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lakeray.cluster.job_env import UploadPlan, entrypoint, job_metadata, plan_upload, runtime_env
from lakeray.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["JobTarget", "Submitted", "TERMINAL", "resolve_target", "submit", "info", "list_jobs", "logs", "follow",
           "stop", "wait", "exit_code"]

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_SDK_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir")


@dataclass(frozen=True)
class JobTarget:
    """The Jobs API of one cluster, as resolved for this command."""

    address: str  # http(s)://host:port of the dashboard
    source: str  # where the address came from (shown in errors)
    local_cluster: bool  # a `lakeray cluster up` cluster: the same machine and venv
    headers: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class Submitted:
    job_id: str
    target: JobTarget
    entrypoint: str
    metadata: dict[str, str]
    upload: UploadPlan
    submit_s: float  # the submit request, upload included


def _token(cluster_token_file: str | None = None) -> str | None:
    """Ray's own order (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), with the token a
    `lakeray cluster up` head shared under the storage root before the per-user file."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = (os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (cluster_token_file if cluster_token_file and os.path.isfile(cluster_token_file) else None)
            or os.path.join(os.path.expanduser("~"), ".ray", "auth_token"))
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def resolve_target(settings: Settings, address: str | None = None, timeout_s: float = 10.0) -> JobTarget:
    """The cluster to talk to, probed with one bounded request; ClusterError naming the setting otherwise."""
    local, token_file = False, None
    if address:
        source = "--address"
    elif os.environ.get("RAY_API_SERVER_ADDRESS"):
        address, source = os.environ["RAY_API_SERVER_ADDRESS"], "RAY_API_SERVER_ADDRESS"
    elif settings.profile.ray.dashboard_address:
        address, source = settings.profile.ray.dashboard_address, "ray.dashboard_address"
    else:
        from lakeray.cluster.local_cluster import running

        cluster = running(settings)
        if cluster is None:
            raise ClusterError(f"no Ray cluster to run jobs on: no `lakeray cluster up` cluster for "
                               f"{settings.storage_root} and no ray.dashboard_address",
                               "start one with `lakeray cluster up`, or set ray.dashboard_address "
                               "(LAKERAY_RAY__DASHBOARD_ADDRESS=http://head:8265) or pass --address")
        address, source, local = cluster.dashboard_url, "lakeray cluster up", True
        token_file = getattr(cluster, "token_file", None)
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: {address} is not the Ray dashboard's http(s)://host:port",
                          "use the dashboard address (default port 8265), not the GCS or ray:// address")
    token = _token(token_file)
    target = JobTarget(address.rstrip("/"), source, local, {"Authorization": f"Bearer {token}"} if token else {})
    _probe(target, timeout_s)
    return target


def _probe(target: JobTarget, timeout_s: float) -> None:
    import httpx

    try:
        answer = httpx.get(f"{target.address}/api/version", headers=target.headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ClusterError(f"the Ray Jobs API at {target.address} ({target.source}) does not answer within "
                           f"{timeout_s:g} s: {type(exc).__name__}",
                           "check that the cluster is up (`lakeray cluster status`) and the address") from None
    if answer.status_code in (401, 403) and "Authorization" not in target.headers:
        raise ClusterError(f"the Ray cluster at {target.address} asks for a token ({answer.status_code}) and this "
                           "machine has none (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
                           "copy the cluster's token (`ray get-auth-token` on the head prints it) into a file "
                           "named by RAY_AUTH_TOKEN_PATH, or into ~/.ray/auth_token")
    if answer.status_code in (401, 403):
        raise ClusterError(f"the Ray cluster at {target.address} refused the token ({answer.status_code})",
                           "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token "
                           "(`ray get-auth-token` on the head)")


@contextmanager
def _client(target: JobTarget) -> Iterator[Any]:
    from ray.job_submission import JobSubmissionClient

    if os.environ.get("LAKERAY_DEBUG") != "1":
        # The SDK logs every upload step and websocket close at INFO on the terminal, between the
        # command's own lines; lakeray prints what matters (the upload's size, the final state).
        import logging

        for name in _SDK_LOGGERS:
            # ERROR: its one WARNING says that .git is not uploaded, which lakeray excludes anyway.
            logging.getLogger(name).setLevel(logging.ERROR if name.endswith("working_dir") else logging.WARNING)
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given
    # (inside a Ray job RAY_ADDRESS is the GCS): the resolved target wins, for this constructor only.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        client = JobSubmissionClient(target.address, headers=dict(target.headers))
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"the Ray Jobs API at {target.address} failed: {exc}",
                           "check the cluster (`lakeray cluster status`)") from None
    finally:
        os.environ.update(saved)
    yield client


def submit(settings: Settings, command: list[str], *, address: str | None = None, submission_id: str | None = None,
           pip: bool = False, max_file_mb: float = 10.0, agent_wait_s: float = 60.0) -> Submitted:
    """Upload the project and start ``command`` as a Ray job; returns at once (see :func:`wait`)."""
    point = entrypoint(command)
    metadata = job_metadata(settings, command)
    target = resolve_target(settings, address)
    upload = plan_upload(settings, int(max_file_mb * 2**20))
    renv = runtime_env(settings, upload, target.local_cluster, pip)
    started = time.perf_counter()
    deadline = time.monotonic() + agent_wait_s
    with _client(target) as client:
        while True:
            try:
                job_id = client.submit_job(entrypoint=point, runtime_env=renv, metadata=metadata,
                                           submission_id=submission_id)
                break
            except RuntimeError as exc:
                # A head that has just started answers before its job agent registers (seconds on a
                # loaded machine): `cluster up` then `jobs submit` must not fail on that.
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                if "No available agent" in str(exc):
                    raise ClusterError(f"the cluster at {target.address} has no job agent after {agent_wait_s:g} s",
                                       "the head's dashboard agent did not start: see dashboard_agent.log in its "
                                       "session logs (a port it needs, 52365 by default, may be taken by another "
                                       "Ray on the machine)") from None
                taken = "already exists" in str(exc)
                raise ClusterError(f"the cluster at {target.address} refused the job: {exc}",
                                   "a --id must be new on the cluster; see `lakeray jobs list`" if taken else
                                   "check the cluster (`lakeray cluster status`) and its dashboard logs") from None
    return Submitted(job_id, target, point, metadata, upload, time.perf_counter() - started)


def _details(job: Any) -> dict[str, Any]:
    data = {k: getattr(job, k, None) for k in ("submission_id", "job_id", "type", "status", "entrypoint", "message",
                                               "start_time", "end_time", "driver_exit_code", "metadata")}
    for key in ("status", "type"):  # enums → their names, for JSON and comparisons
        data[key] = str(getattr(data[key], "value", data[key])) if data[key] is not None else None
    return data


def info(settings: Settings, job_id: str, address: str | None = None,
         target: JobTarget | None = None) -> dict[str, Any]:
    """The job's state and metadata; ClusterError for an id the cluster does not know."""
    target = target or resolve_target(settings, address)
    with _client(target) as client:
        return _job_info(client, target, job_id)


def _job_info(client: Any, target: JobTarget, job_id: str) -> dict[str, Any]:
    try:
        return _details(client.get_job_info(job_id))
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise ClusterError(f"no job {job_id!r} on the cluster at {target.address}",
                               "`lakeray jobs list` shows its jobs") from None
        raise ClusterError(f"the Ray Jobs API at {target.address} failed: {exc}", None) from None


def list_jobs(settings: Settings, address: str | None = None) -> list[dict[str, Any]]:
    """Every job the cluster knows (whoever submitted it), oldest first."""
    target = resolve_target(settings, address)
    with _client(target) as client:
        jobs = [_details(job) for job in client.list_jobs()]
    return sorted(jobs, key=lambda job: job.get("start_time") or 0)


def logs(settings: Settings, job_id: str, address: str | None = None) -> str:
    target = resolve_target(settings, address)
    info(settings, job_id, target=target)  # an unknown id is an error, not an empty log
    with _client(target) as client:
        return client.get_job_logs(job_id)


def follow(settings: Settings, job_id: str, write: Callable[[str], None], address: str | None = None,
           target: JobTarget | None = None) -> dict[str, Any]:
    """Stream the job's logs (``tail_job_logs``) to ``write`` until it ends; its final state."""
    import asyncio

    target = target or resolve_target(settings, address)
    info(settings, job_id, target=target)

    async def tail() -> None:
        with _client(target) as client:
            async for chunk in client.tail_job_logs(job_id):
                write(chunk)

    asyncio.run(tail())
    # The stream closes when the job ends; its state may trail the last line by a poll.
    return wait(settings, job_id, timeout_s=30, target=target)


def wait(settings: Settings, job_id: str, timeout_s: float | None = None, address: str | None = None,
         target: JobTarget | None = None, poll_s: float = 0.5) -> dict[str, Any]:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; ClusterError after ``timeout_s``."""
    target = target or resolve_target(settings, address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _client(target) as client:  # one client for the whole wait: each new one checks the version first
        while True:
            state = _job_info(client, target, job_id)
            if state["status"] in TERMINAL:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} is still {state['status']} after {timeout_s:g} s",
                                   f"`lakeray jobs status {job_id}`; `lakeray jobs stop {job_id}` ends it")
            time.sleep(poll_s)


def stop(settings: Settings, job_id: str, timeout_s: float = 60.0, address: str | None = None) -> dict[str, Any]:
    """Stop the job (SIGTERM to its driver and the driver's processes, SIGKILL after Ray's grace period;
    Ray then ends the job's tasks and actors) and wait, bounded, until Ray reports it ended."""
    target = resolve_target(settings, address)
    state = info(settings, job_id, target=target)
    if state["status"] in TERMINAL:
        return state
    with _client(target) as client:
        client.stop_job(job_id)
    return wait(settings, job_id, timeout_s=timeout_s, target=target)


def exit_code(state: dict[str, Any]) -> int:
    """The job's exit status: 0 SUCCEEDED; FAILED: the driver's exit code (1 if unknown); STOPPED: 143."""
    if state["status"] == "SUCCEEDED":
        return 0
    if state["status"] == "STOPPED":
        return 143  # 128 + SIGTERM, what Ray sends the driver
    code = state.get("driver_exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1
