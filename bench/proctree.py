"""Readings of this benchmark's process tree from /proc (Linux), shared by the benchmarks.

The tree is this process and its descendants: the Spark JVM and its Python workers, or the local Ray
cluster's processes. CPU time includes children the tree has already reaped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

BUSY_SHARE = 0.10  # other processes above 10% of the machine's CPU: the figures are not to be trusted


def stat_fields(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces): fields[0] is the state, [1] the
    parent pid, [11:15] utime stime cutime cstime, [21] rss in pages."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def tree_usage(root: int | None = None) -> tuple[float, int]:
    """(CPU seconds, resident bytes) of ``root`` (default: this process) and all its descendants."""
    root = os.getpid() if root is None else root
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    parents: dict[int, int] = {}
    usage: dict[int, tuple[float, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(entry.name)
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            usage[pid] = (sum(int(v) for v in fields[11:15]) / tick, int(fields[21]) * page)
        except (OSError, ValueError, IndexError):  # exited meanwhile, or an unreadable entry
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    cpu = sum(usage[pid][0] for pid in tree if pid in usage)
    rss = sum(usage[pid][1] for pid in tree if pid in usage)
    return cpu, rss


def _machine_busy_s() -> float:
    # /proc/stat "cpu": user nice system idle iowait irq softirq steal ... (clock ticks)
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """The share of the machine's CPU that processes outside this process tree used (steal time
    included) since it was made. The load average cannot tell: a benchmark's own JVM or Ray workers
    keep every core busy, so it read "busy" on nearly every run."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._machine, self._tree = _machine_busy_s(), tree_usage()[0]

    def share(self) -> float:
        capacity = (time.perf_counter() - self._started) * (os.cpu_count() or 1)
        others = (_machine_busy_s() - self._machine) - (tree_usage()[0] - self._tree)
        return round(max(others, 0.0) / capacity, 3) if capacity > 0 else 0.0
