"""The e2e tests' one first-time `lakeray demo`: `lakeray init` in a new folder, then `lakeray demo --json`
there, as a new user runs it (no --config, no LAKERAY_* of the caller).

test_readme_walkthrough checks what `init` made and what the demo wrote in the folder; test_demo checks
the summary and re-runs the demo in the same folder (interrupted, then serving) against it. One first
run serves both: each `lakeray demo` costs a Spark and a Ray start-up plus the whole pipeline (~1 min).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

LAKERAY = str(Path(sys.executable).parent / "lakeray")
ROWS = 20_000


def user_env(**overrides: str) -> dict[str, str]:
    """What a user's shell would pass: not the HAProxy ports and paths that this test process's own Ray
    (tests/ray) put in os.environ, nor any LAKERAY_* of the caller."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_SERVE_HAPROXY_") and not (k.startswith("LAKERAY_") and k != "LAKERAY_CACHE")}
    return dict(env, LAKERAY_SPARK__DRIVER_MEMORY="2g", LAKERAY_SPARK__SHUFFLE_PARTITIONS="4", **overrides)


@dataclass
class InitProject:
    path: Path  # the folder `lakeray init` made; every later demo runs there
    env: dict[str, str]
    init_stdout: str
    summary: dict  # the first demo's JSON summary


@pytest.fixture(scope="session")
def init_project(tmp_path_factory) -> InitProject:
    base = tmp_path_factory.mktemp("init-demo")
    project = base / "proj"
    env = user_env(LAKERAY_SERVE__PORT=str(free_port()))
    created = subprocess.run([LAKERAY, "init", str(project)], cwd=base, env=env, capture_output=True, text=True,
                             timeout=120)
    assert created.returncode == 0, created.stderr
    demo = subprocess.run([LAKERAY, "demo", "--json", "--rows", str(ROWS)], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-4000:]
    return InitProject(project, env, created.stdout, json.loads(demo.stdout))
