"""The prediction log: every prediction appended to a Delta table, in batches, off the request path.

A request only appends a reference to its rows to an in-memory buffer (no serialisation, no I/O). A
background thread flushes the buffer with delta-rs every ``flush_rows`` rows or ``flush_seconds``,
one ``write_deltalake(mode="append")`` — one Delta commit — per flush. A replica killed between two
flushes loses at most the rows in memory; a commit is atomic, so a half-written flush never shows
(its data files stay unreferenced, VACUUM removes them). A flush that fails (storage down) keeps its
rows and retries at the next interval; past ``max_buffer_rows`` the oldest rows are dropped and
counted in :meth:`PredictionLog.stats`, never the request.

Columns: ``request_id``, ``ts`` (UTC), ``app``, ``model``, ``model_version``, ``row`` (index in the
request), ``inputs`` (the row as received, JSON), ``prediction``, ``latency_ms`` (the whole request).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["PredictionLog", "SCHEMA_FIELDS"]

SCHEMA_FIELDS = ["request_id", "ts", "app", "model", "model_version", "row", "inputs", "prediction", "latency_ms"]


@dataclass
class _Entry:
    request_id: str
    ts_us: int
    rows: list[dict[str, Any]]
    predictions: list[Any]
    latency_ms: float
    model: str
    model_version: int


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _inputs_json(row: dict[str, Any]) -> str:
    """The row as JSON, a non-finite number as null. Checking every value first cost as much as the
    encoding (the flush thread shares the replica's core): only a row the encoder refuses is rebuilt."""
    try:
        return json.dumps(row, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps({k: _finite(v) for k, v in row.items()}, separators=(",", ":"))


class PredictionLog:
    """Buffer predictions and flush them to ``table_uri`` from one background thread."""

    def __init__(self, table_uri: str, app: str, model: str, model_version: int, flush_rows: int = 1000,
                 flush_seconds: float = 5.0, max_buffer_rows: int = 100_000) -> None:
        self.table_uri = table_uri
        self.app, self.model, self.model_version = app, model, model_version
        self.flush_rows, self.flush_seconds, self.max_buffer_rows = flush_rows, flush_seconds, max_buffer_rows
        self._pending: deque[_Entry] = deque()
        self._pending_rows = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time (the thread, or close)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.rows_written = self.commits = self.rows_dropped = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="lakeray-prediction-log", daemon=True)
        self._thread.start()

    def append(self, request_id: str, rows: list[dict[str, Any]], predictions: list[Any], latency_ms: float,
               model: str | None = None, model_version: int | None = None) -> None:
        """Queue one request's rows (cheap: the request path does no I/O here). ``model``/``model_version``:
        the model that answered, when not the log's own (a canary)."""
        entry = _Entry(request_id, time.time_ns() // 1000, rows, predictions, latency_ms,
                       model or self.model, self.model_version if model_version is None else model_version)
        with self._lock:
            self._pending.append(entry)
            self._pending_rows += len(rows)
            self._drop_overflow()
            full = self._pending_rows >= self.flush_rows
        if full:
            self._wake.set()

    def _drop_overflow(self) -> None:
        while self._pending_rows > self.max_buffer_rows and len(self._pending) > 1:
            dropped = self._pending.popleft()
            self._pending_rows -= len(dropped.rows)
            self.rows_dropped += len(dropped.rows)

    def flush(self) -> int:
        """Write what waits now as one Delta commit; the rows written (0 when none waited or it failed)."""
        with self._flush_lock:
            with self._lock:
                entries = list(self._pending)
                self._pending.clear()
                self._pending_rows = 0
            if not entries:
                return 0
            try:
                table = self._arrow(entries)
                from deltalake import write_deltalake

                write_deltalake(self.table_uri, table, mode="append")
            except Exception as exc:  # storage down, a concurrent first commit: keep the rows, retry later
                self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                with self._lock:
                    self._pending.extendleft(reversed(entries))
                    self._pending_rows += sum(len(e.rows) for e in entries)
                    self._drop_overflow()
                return 0
            self.rows_written += table.num_rows
            self.commits += 1
            self.last_error = None
            return table.num_rows

    def _arrow(self, entries: list[_Entry]):
        import pyarrow as pa

        cols: dict[str, list[Any]] = {name: [] for name in SCHEMA_FIELDS}
        for entry in entries:
            for index, (row, prediction) in enumerate(zip(entry.rows, entry.predictions, strict=True)):
                cols["request_id"].append(entry.request_id)
                cols["model"].append(entry.model)
                cols["model_version"].append(entry.model_version)
                cols["ts"].append(entry.ts_us)
                cols["row"].append(index)
                cols["inputs"].append(_inputs_json(row))
                cols["prediction"].append(float(prediction) if not isinstance(prediction, list) else
                                          float(prediction[-1]))
                cols["latency_ms"].append(entry.latency_ms)
        return pa.table({
            "request_id": pa.array(cols["request_id"], pa.string()),
            "ts": pa.array(cols["ts"], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "app": pa.array([self.app] * len(cols["request_id"]), pa.string()),
            "model": pa.array(cols["model"], pa.string()),
            "model_version": pa.array(cols["model_version"], pa.int64()),
            "row": pa.array(cols["row"], pa.int32()),
            "inputs": pa.array(cols["inputs"], pa.string()),
            "prediction": pa.array(cols["prediction"], pa.float64()),
            "latency_ms": pa.array(cols["latency_ms"], pa.float64()),
        })

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.flush()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and flush what is left (a graceful replica shutdown loses nothing)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self.flush()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pending = self._pending_rows
        return {"table": self.table_uri, "rows_written": self.rows_written, "commits": self.commits,
                "rows_pending": pending, "rows_dropped": self.rows_dropped, "last_error": self.last_error}
