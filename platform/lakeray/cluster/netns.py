"""Two hosts on one machine: Linux network namespaces joined by a veth pair, each with one address.

`make demo-cluster` (cluster/scripts/demo_cluster.py) and the multi-host tests run a real head and worker
this way. Everything here needs root and iproute2's `ip`, and acts only on the namespaces it names: what
runs inside them is found through /proc by network namespace, so stopping a host never touches a process
of the machine outside it. Nothing runs at import.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["HostPair", "commands_of", "make_pair", "net_of", "pids_in", "sh", "wait_until"]

T = TypeVar("T")


def sh(*cmd: str, timeout: float = 30) -> None:
    """Run one setup command (``ip ...``); CalledProcessError with its stderr when it fails."""
    subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)


def net_of(namespace: str) -> str:
    """The namespace's identity as /proc shows it for its processes (``net:[4026532…]``)."""
    return subprocess.run(["ip", "netns", "exec", namespace, "readlink", "/proc/self/ns/net"], capture_output=True,
                          text=True, timeout=30, check=True).stdout.strip()


def pids_in(net: str) -> list[int]:
    """Live processes (zombies left out) in the network namespace ``net`` (from :func:`net_of`)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == net:
                    with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                        if fh.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(entry))
            except OSError:  # gone meanwhile, or a kernel thread
                continue
    return found


def commands_of(pids: list[int]) -> dict[int, str]:
    """Each still running pid's command line (NULs as spaces); pids gone meanwhile are left out."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                found[pid] = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return found


def wait_until(check: Callable[[], T], timeout_s: float, interval_s: float = 0.5) -> T:
    """Call ``check`` until it returns something true or ``timeout_s`` has passed; its last answer.

    Polling instead of a fixed sleep: a check that is true at once costs nothing, and a slow machine gets
    the whole window."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = check()
        if answer or time.monotonic() >= deadline:
            return answer
        time.sleep(interval_s)


@dataclass
class HostPair:
    """A head and a worker host: namespaces ``<tag>h`` / ``<tag>w``, veth ends ``<tag>h0`` / ``<tag>w0``."""

    tag: str
    head_ip: str
    worker_ip: str
    made: list[str] = field(default_factory=list)  # namespaces created so far, removed by :meth:`remove`
    nets: list[str] = field(default_factory=list)  # their /proc identities, head first

    @property
    def head_ns(self) -> str:
        return f"{self.tag}h"

    @property
    def worker_ns(self) -> str:
        return f"{self.tag}w"

    @property
    def head_link(self) -> str:
        return f"{self.tag}h0"

    @property
    def worker_link(self) -> str:
        return f"{self.tag}w0"

    def pids(self) -> list[int]:
        """Every live process on either host."""
        return [pid for net in self.nets for pid in pids_in(net)]

    def stop_leftovers(self, grace_s: float = 0.0) -> list[int]:
        """Give the hosts' processes ``grace_s`` to end by themselves, SIGKILL the rest, and return any
        still there 10 s later (SIGKILLed processes need a moment to leave /proc)."""
        wait_until(lambda: not self.pids(), grace_s)
        for pid in self.pids():  # whatever runs in a host's namespace belongs to that host
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not self.pids(), 10, interval_s=0.3)
        return self.pids()

    def remove(self) -> None:
        """Delete the namespaces (the veth pair goes with them); stop their processes first."""
        for namespace in self.made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        self.made.clear()


def make_pair(tag: str, head_ip: str, worker_ip: str, *, default_route: bool = False) -> HostPair:
    """Create both hosts, addresses ``/24``, links and loopback up. ``default_route`` routes everything
    through the veth (Ray finds its node address from the route to a public address). When a step fails,
    what was made is removed and the error raised."""
    pair = HostPair(tag, head_ip, worker_ip)
    try:
        for namespace in (pair.head_ns, pair.worker_ns):
            sh("ip", "netns", "add", namespace)
            pair.made.append(namespace)
        sh("ip", "link", "add", pair.head_link, "type", "veth", "peer", "name", pair.worker_link)
        for namespace, link, ip in ((pair.head_ns, pair.head_link, head_ip),
                                    (pair.worker_ns, pair.worker_link, worker_ip)):
            sh("ip", "link", "set", link, "netns", namespace)
            sh("ip", "-n", namespace, "addr", "add", f"{ip}/24", "dev", link)
            sh("ip", "-n", namespace, "link", "set", link, "up")
            sh("ip", "-n", namespace, "link", "set", "lo", "up")
            if default_route:
                sh("ip", "-n", namespace, "route", "add", "default", "dev", link)
            pair.nets.append(net_of(namespace))
    except BaseException:
        # A veth end not yet moved into a namespace stays in the machine's own: delete it too.
        subprocess.run(["ip", "link", "del", pair.head_link], capture_output=True, timeout=30)
        pair.remove()
        raise
    return pair
