"""Prometheus metrics of an endpoint, by model version, recorded twice from one call:

- to **Ray's metrics** (``ray.serve.metrics``): every node's metrics agent exports them on its metrics
  export port (``ray_`` prefix, Serve's ``deployment``/``replica``/``application`` tags added), with
  every replica of every app on that node: what a Prometheus scraping the cluster should read
  (Ray writes a service-discovery file for it; docs/serving.md, Metrics);
- to a **private prometheus_client registry** per replica, served at ``GET <route>/metrics``: the
  answering replica's own figures at once, without a metrics agent (one replica, a quick look, tests).

Names (both): ``lakeray_serve_requests_total{app,model,model_version,code}``,
``lakeray_serve_errors_total{app,model,model_version,kind}`` (kind: client for 4xx, server for 5xx),
``lakeray_serve_request_latency_seconds{app,model,model_version}`` (answered predictions),
``lakeray_serve_batch_size{app,model,model_version}`` (requests per ``@serve.batch`` call),
``lakeray_serve_unknown_entities_total{app,table}`` and ``lakeray_serve_feature_table_version{app,table}``
(online features).
"""

from __future__ import annotations

from typing import Any

__all__ = ["EndpointMetrics", "LATENCY_BUCKETS_S", "BATCH_BUCKETS"]

LATENCY_BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]

_MODEL = ("app", "model", "model_version")


class _Pair:
    """One metric in both sinks; labelled children are cached (a request pays two dict probes)."""

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...], registry: Any,
                 buckets: list[float] | None = None) -> None:
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

    def record(self, values: tuple[str, ...], amount: float = 1.0) -> None:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._prom.labels(*values)
        tags = dict(zip(self.labels, values, strict=True))
        if self.kind == "counter":
            child.inc(amount)
            self._ray.inc(amount, tags=tags)
        elif self.kind == "histogram":
            child.observe(amount)
            self._ray.observe(amount, tags=tags)
        else:
            child.set(amount)
            self._ray.set(amount, tags=tags)


class EndpointMetrics:
    """The metrics of one replica of app ``app`` (create it in the replica: Ray tags it there)."""

    def __init__(self, app: str) -> None:
        import prometheus_client

        self.app = app
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.requests = _Pair("counter", "lakeray_serve_requests_total", "Prediction requests answered, by HTTP "
                              "status code.", (*_MODEL, "code"), self.registry)
        self.errors = _Pair("counter", "lakeray_serve_errors_total", "Prediction requests refused (client: 4xx) "
                            "or failed (server: 5xx).", (*_MODEL, "kind"), self.registry)
        self.latency = _Pair("histogram", "lakeray_serve_request_latency_seconds", "Seconds from the request "
                             "reaching the replica to its answer (answered predictions).", _MODEL, self.registry,
                             LATENCY_BUCKETS_S)
        self.batch_size = _Pair("histogram", "lakeray_serve_batch_size", "Requests scored together in one "
                                "batch.", _MODEL, self.registry, BATCH_BUCKETS)
        self.unknown = _Pair("counter", "lakeray_serve_unknown_entities_total", "Instances whose entity was not "
                             "in a feature table (defaults served).", ("app", "table"), self.registry)
        self.table_version = _Pair("gauge", "lakeray_serve_feature_table_version", "Version of a feature table "
                                   "the replica serves from.", ("app", "table"), self.registry)

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
