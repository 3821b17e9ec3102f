"""Prometheus metrics of an endpoint, by model version, recorded twice from one call:

- to **Ray's metrics** (``ray.serve.metrics``): every node's metrics agent exports them on its metrics
  export port (``ray_`` prefix, Serve's ``deployment``/``replica``/``application`` tags added), with
  every replica of every app on that node: what a Prometheus scraping the cluster should read
  (Ray writes a service-discovery file for it; docs/serving.md, Metrics);
- to a **private prometheus_client registry** per replica, served at ``GET <route>/metrics``: the
  answering replica's own figures at once, without a metrics agent (one replica, a quick look, tests).

The private registry is updated on the request path (a labelled child's ``inc``/``observe``: about a
microsecond, exact at once). Ray's metrics are not: each ``ray.util.metrics`` record merges and checks
tag dicts and calls into Ray's core worker (tens of µs; nine of them per request were a measured part of
the replica's time, docs/serving.md, Performance). Counter increments are summed per label set and
histogram observations queued, and a daemon thread hands them to Ray every ``flush_s`` (Ray itself
exports every few seconds, so a scrape of the export port sees the same figures, ``flush_s`` later).

Names (both): ``lakeray_serve_requests_total{app,model,model_version,code}``,
``lakeray_serve_errors_total{app,model,model_version,kind}`` (kind: client for 4xx, server for 5xx),
``lakeray_serve_request_latency_seconds{app,model,model_version}`` (answered predictions),
``lakeray_serve_batch_size{app,model,model_version}`` (requests per ``@serve.batch`` call),
``lakeray_serve_unknown_entities_total{app,table}`` and ``lakeray_serve_feature_table_version{app,table}``
(online features).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

__all__ = ["EndpointMetrics", "LATENCY_BUCKETS_S", "BATCH_BUCKETS"]

LATENCY_BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]

_MODEL = ("app", "model", "model_version")
FLUSH_S = 1.0  # seconds between hand-offs to Ray's metrics


class _Pair:
    """One metric in both sinks; labelled children are cached (a request pays two dict probes). Ray's
    side is buffered (see the module doc): :meth:`flush` hands what waits to Ray."""

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...], registry: Any,
                 lock: threading.Lock, buckets: list[float] | None = None) -> None:
        import prometheus_client
        from ray.serve import metrics as serve_metrics

        self.labels = labels
        if kind == "counter":
            self._prom = prometheus_client.Counter(name.removesuffix("_total"), doc, labels, registry=registry)
            self._ray = serve_metrics.Counter(name, doc, tag_keys=labels)
        elif kind == "histogram":
            self._prom = prometheus_client.Histogram(name, doc, labels, registry=registry, buckets=buckets)
            self._ray = serve_metrics.Histogram(name, doc, boundaries=buckets, tag_keys=labels)
        else:
            self._prom = prometheus_client.Gauge(name, doc, labels, registry=registry)
            self._ray = serve_metrics.Gauge(name, doc, tag_keys=labels)
        self.kind = kind
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = lock
        # Waiting for Ray: counters summed and gauges' last value per label set; histogram observations.
        self._sums: dict[tuple[str, ...], float] = defaultdict(float)
        self._observed: list[tuple[tuple[str, ...], float]] = []

    def record(self, values: tuple[str, ...], amount: float = 1.0) -> None:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._prom.labels(*values)
        with self._lock:
            if self.kind == "counter":
                child.inc(amount)
                self._sums[values] += amount
            elif self.kind == "histogram":
                child.observe(amount)
                self._observed.append((values, amount))
            else:
                child.set(amount)
                self._sums[values] = amount

    def flush(self) -> None:
        """Hand what waits to Ray's metrics."""
        with self._lock:
            sums, self._sums = self._sums, defaultdict(float)
            observed, self._observed = self._observed, []
        for values, amount in sums.items():
            tags = dict(zip(self.labels, values, strict=True))
            if self.kind == "counter":
                self._ray.inc(amount, tags=tags)
            else:
                self._ray.set(amount, tags=tags)
        tags_of: dict[tuple[str, ...], dict[str, str]] = {}
        for values, amount in observed:
            tags = tags_of.get(values)
            if tags is None:
                tags = tags_of[values] = dict(zip(self.labels, values, strict=True))
            self._ray.observe(amount, tags=tags)


class EndpointMetrics:
    """The metrics of one replica of app ``app`` (create it in the replica: Ray tags it there)."""

    def __init__(self, app: str, flush_s: float = FLUSH_S) -> None:
        import prometheus_client

        self.app = app
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        lock = threading.Lock()
        self.requests = _Pair("counter", "lakeray_serve_requests_total", "Prediction requests answered, by HTTP "
                              "status code.", (*_MODEL, "code"), self.registry, lock)
        self.errors = _Pair("counter", "lakeray_serve_errors_total", "Prediction requests refused (client: 4xx) "
                            "or failed (server: 5xx).", (*_MODEL, "kind"), self.registry, lock)
        self.latency = _Pair("histogram", "lakeray_serve_request_latency_seconds", "Seconds from the request "
                             "reaching the replica to its answer (answered predictions).", _MODEL, self.registry,
                             lock, LATENCY_BUCKETS_S)
        self.batch_size = _Pair("histogram", "lakeray_serve_batch_size", "Requests scored together in one "
                                "batch.", _MODEL, self.registry, lock, BATCH_BUCKETS)
        self.unknown = _Pair("counter", "lakeray_serve_unknown_entities_total", "Instances whose entity was not "
                             "in a feature table (defaults served).", ("app", "table"), self.registry, lock)
        self.table_version = _Pair("gauge", "lakeray_serve_feature_table_version", "Version of a feature table "
                                   "the replica serves from.", ("app", "table"), self.registry, lock)
        self._pairs = (self.requests, self.errors, self.latency, self.batch_size, self.unknown, self.table_version)
        self._stop = threading.Event()
        self._flush_s = flush_s
        self._thread = threading.Thread(target=self._flush_loop, name="lakeray-metrics", daemon=True)
        self._thread.start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._flush_s):
            self.flush()

    def flush(self) -> None:
        """Hand every buffered figure to Ray's metrics now."""
        for pair in self._pairs:
            try:
                pair.flush()
            except Exception:  # noqa: BLE001 - Ray's metrics agent gone (replica stopping): the private registry still counts
                pass

    def close(self) -> None:
        """Stop the flush thread after one last flush."""
        self._stop.set()
        self.flush()

    def answered(self, model: str, version: int, code: int, seconds: float) -> None:
        labels = (self.app, model, str(version))
        self.requests.record((*labels, str(code)))
        if code >= 400:
            self.errors.record((*labels, "server" if code >= 500 else "client"))
        elif seconds >= 0:
            self.latency.record(labels, seconds)

    def batch(self, model: str, version: int, size: int) -> None:
        self.batch_size.record((self.app, model, str(version)), size)

    def unknown_entities(self, table: str, count: int) -> None:
        if count:
            self.unknown.record((self.app, table), count)

    def feature_versions(self, versions: dict[str, int]) -> None:
        for table, version in versions.items():
            self.table_version.record((self.app, table), version)

    def exposition(self) -> tuple[bytes, str]:
        """The private registry in Prometheus' text format, and its content type."""
        import prometheus_client

        return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_LATEST
