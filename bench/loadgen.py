"""HTTP load on loopback for the serve_* benchmarks: wrk when installed, else a small asyncio client.

Both are closed loops: each of ``concurrency`` keep-alive connections sends its next POST when the
previous answer has arrived. Every run is bounded twice: by ``duration_s`` and by ``max_requests``
(wrk: per thread, through its Lua ``response`` hook). Only loopback addresses are accepted, so a
benchmark can never load anything but this machine.

wrk (``make bench-tools`` installs Debian's package) is a C program: it takes far less of the two
cores than the servers it measures. The fallback client is pure Python (one asyncio loop in a child
process): at 64 connections it needs a good share of a core itself, so results name the tool used.

As a script (the fallback's child process): ``python bench/loadgen.py URL BODY_FILE C DURATION MAX``
prints one JSON line with the figures.

bench/ is not a package: import as ``from loadgen import run_load``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

__all__ = ["LoadResult", "run_load", "wrk_path", "check_loopback"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# A request that takes this long counts as an error (both tools): the loop must end on a stuck server.
REQUEST_TIMEOUT_S = 10.0


@dataclass
class LoadResult:
    tool: str  # "wrk" or "asyncio"
    concurrency: int
    duration_s: float  # measured wall time of the run
    requests: int  # answered requests (any status)
    errors: int  # non-2xx answers plus connect/read/write errors and timeouts
    rps: float  # answered 2xx requests per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    # Share of the machine's CPU that processes outside the benchmark's tree used during the run (set by
    # the caller: bench/servelib.py's measure), None when not read.
    other_cpu_share: float | None = None

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def check_loopback(url: str) -> tuple[str, int, str]:
    """(host, port, path) of a loopback http URL; ValueError for any other."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in _LOOPBACK or parts.port is None:
        raise ValueError(f"load generator: {url!r} is not an http://<loopback>:<port> URL; it only loads this machine")
    return parts.hostname, parts.port, parts.path or "/"


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_load(url: str, body: bytes, concurrency: int, duration_s: float, max_requests: int,
             tool: str = "auto") -> LoadResult:
    """POST ``body`` (JSON) to ``url`` from ``concurrency`` connections for ``duration_s`` or
    ``max_requests``, whichever ends first. ``tool``: auto (wrk if installed), wrk or asyncio."""
    check_loopback(url)
    if tool == "auto":
        tool = "wrk" if wrk_path() else "asyncio"
    if tool == "wrk":
        return _run_wrk(url, body, concurrency, duration_s, max_requests)
    return _run_child(url, body, concurrency, duration_s, max_requests)


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("%(body)s", "rb"); wrk.body = f:read("*all"); f:close()
local limit, count = %(limit)d, 0
function response(status, headers, body)
  count = count + 1
  if count >= limit then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LOADGEN {"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%f, "p90_us": %%f, "p99_us": %%f, "max_us": %%f}\\n',
    summary.requests, summary.duration, e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _run_wrk(url: str, body: bytes, concurrency: int, duration_s: float, max_requests: int) -> LoadResult:
    threads = max(1, min(concurrency, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="lakeray-wrk-") as tmp:
        body_file = os.path.join(tmp, "body.json")
        with open(body_file, "wb") as fh:
            fh.write(body)
        script = os.path.join(tmp, "post.lua")
        with open(script, "w", encoding="utf-8") as fh:
            fh.write(_WRK_SCRIPT % {"body": body_file, "limit": max(1, -(-max_requests // threads))})
        # wrk's -d takes whole seconds (s, m and h are its only units).
        cmd = [wrk_path() or "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s",
               f"--timeout={int(REQUEST_TIMEOUT_S)}s", "-s", script, url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + REQUEST_TIMEOUT_S + 30)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("LOADGEN ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    got = json.loads(line.removeprefix("LOADGEN "))
    wall = got["duration_us"] / 1e6
    ok = max(0, got["requests"] - got["errors"])
    return LoadResult("wrk", concurrency, wall, got["requests"], got["errors"], ok / wall if wall else 0.0,
                      got["p50_us"] / 1e3, got["p90_us"] / 1e3, got["p99_us"] / 1e3, got["max_us"] / 1e3)


def _run_child(url: str, body: bytes, concurrency: int, duration_s: float, max_requests: int) -> LoadResult:
    """The asyncio client in its own process: it must not share a GIL with the benchmark's driver."""
    with tempfile.NamedTemporaryFile(prefix="lakeray-load-", suffix=".json") as fh:
        fh.write(body)
        fh.flush()
        done = subprocess.run([sys.executable, __file__, url, fh.name, str(concurrency), str(duration_s),
                               str(max_requests)], capture_output=True, text=True,
                              timeout=duration_s + REQUEST_TIMEOUT_S + 30)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-500:]}")
    return LoadResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]


async def _read_response(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 answer; returns its status (the body is read and dropped)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    headers = head.decode("latin-1").lower()
    if "transfer-encoding: chunked" in headers:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return status
    start = headers.find("content-length:")
    if start >= 0:
        length = int(headers[start + 15:headers.index("\r\n", start)])
        await reader.readexactly(length)
    return status


async def _async_load(url: str, body: bytes, concurrency: int, duration_s: float, max_requests: int) -> dict:
    host, port, path = check_loopback(url)
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors = 0
    budget = max_requests
    started = time.perf_counter()
    deadline = started + duration_s

    async def connection() -> None:
        nonlocal errors, budget
        reader = writer = None
        while time.perf_counter() < deadline and budget > 0:
            budget -= 1
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), REQUEST_TIMEOUT_S)
                sent = time.perf_counter()
                writer.write(request)
                status = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT_S)
                latencies.append(time.perf_counter() - sent)
                if not 200 <= status < 300:
                    errors += 1
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    ms = [_percentile(ordered, q) * 1e3 for q in (50, 90, 99)]
    answered = len(latencies)
    return asdict(LoadResult("asyncio", concurrency, wall, answered, errors,
                             max(0, answered - errors) / wall if wall else 0.0, *ms,
                             (ordered[-1] * 1e3) if ordered else float("nan")))


def _main(argv: list[str]) -> int:
    url, body_file, concurrency, duration_s, max_requests = argv
    with open(body_file, "rb") as fh:
        body = fh.read()
    print(json.dumps(asyncio.run(_async_load(url, body, int(concurrency), float(duration_s), int(max_requests)))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
