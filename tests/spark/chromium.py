"""Headless Chromium (Debian's package) driven over the DevTools protocol, for tests of web UIs.

The browser runs in its own process group with a throwaway profile; every wait is bounded, and leaving
the context kills the whole group (the renderer and GPU helpers included)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

__all__ = ["Chromium", "chromium_binary"]


def chromium_binary(repo: Path) -> str:
    """The `chromium` on PATH; `make scheduler-tools` installs it when it is missing."""
    if shutil.which("chromium") is None:
        subprocess.run(["make", "-C", str(repo), "scheduler-tools"], capture_output=True, timeout=900)
    found = shutil.which("chromium")
    assert found, "`make scheduler-tools` did not install Debian's chromium"
    return found


class Chromium:
    def __init__(self, binary: str, profile: Path, width: int, height: int, start_timeout_s: float = 60):
        self.binary, self.profile, self.width, self.height = binary, profile, width, height
        self.start_timeout_s = start_timeout_s
        self._ids = 0

    def __enter__(self) -> Chromium:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
        self.process = subprocess.Popen(
            [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            page = self._first_page(port)
            from websockets.sync.client import connect

            self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
            # The screenshot is exactly width × height CSS pixels, whatever the window decorations take.
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                      deviceScaleFactor=1, mobile=False)
            self.call("Page.enable")
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.ws.close()
        finally:
            self._kill()

    def _kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def _first_page(self, port: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            assert self.process.poll() is None, f"chromium exited with {self.process.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as answer:
                    pages = [p for p in json.load(answer) if p["type"] == "page"]
                if pages:
                    return pages[0]
            except OSError:
                pass
            assert time.monotonic() < deadline, f"chromium's DevTools did not answer within {self.start_timeout_s} s"
            time.sleep(0.5)

    def call(self, method: str, timeout_s: float = 60, **params: Any) -> dict[str, Any]:
        self._ids += 1
        self.ws.send(json.dumps({"id": self._ids, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:  # events (Page.*) arrive in between; the answer carries our id
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self._ids:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, done: Callable[[Any], bool], timeout_s: float) -> Any:
        """Evaluate ``expression`` in the page every half second until ``done(value)``; its last value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if done(value):
                return value
            assert time.monotonic() < deadline, f"the page did not get there within {timeout_s} s: {value!r:.300}"
            time.sleep(0.5)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
