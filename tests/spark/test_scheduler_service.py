"""The project's scheduler as a user runs it: `lakeray scheduler start|status|stop` (the daemon and the
webserver, started once for this module), its UI opened in headless Chromium (the asset graph read from
the rendered page, and a screenshot), and a run cancelled by its timeout through Dagster's run monitoring.

Set LAKERAY_UI_SCREENSHOT=PATH to keep the browser test's screenshot (docs/images/scheduler-asset-graph.png
is made that way)."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from lakeray.cluster.processes import group_members
from lakeray.config import load_settings
from lakeray.lakehouse.delta import table_exists, write_table
from tests.conftest import descendants

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[2]
SLOW_TIMEOUT_S = 12  # long enough for the run's Spark driver to be up when the cancel lands
POLL_S = 15  # run_monitoring.poll_interval_seconds in the generated dagster.yaml (scheduler/service.py)

# Far-apart schedules, so the daemon launches nothing of its own while the tests look at it.
JOBS = '''
import os
import time
from pathlib import Path
from pyspark.sql import functions as F
from lakeray.features import feature_job

@feature_job(name="sc_clean", inputs=["sc_events"], entity_keys=["user_id", "event_time"],
             schedule="0 0 1 1 *", catchup="all", retries=1)
def sc_clean(sc_events):
    return sc_events.where(F.col("amount") >= 0)

@feature_job(name="sc_totals", inputs=["sc_clean"], entity_keys=["user_id"])
def sc_totals(sc_clean):
    return sc_clean.groupBy("user_id").agg(F.sum("amount").alias("total"))

@feature_job(name="sc_daily", inputs=["sc_events"], entity_keys=["user_id"], write_mode="partitions",
             partition_by=["day"], partitions_start="2026-03-01", schedule="0 0 1 1 *")
def sc_daily(sc_events, start=None, end=None):
    df = sc_events.withColumn("day", F.to_date("event_time"))
    return df.where((F.col("day") >= start) & (F.col("day") < end)).groupBy("user_id", "day").count()

@feature_job(name="sc_slow", inputs=["sc_events"], schedule="0 0 1 1 *", timeout_s=TIMEOUT, retries=1,
             retry_delay_s=0)
def sc_slow(sc_events):
    Path(__file__).with_name("slow.pid").write_text(str(os.getpid()))  # the run got this far
    time.sleep(600)
    return sc_events
'''.replace("TIMEOUT", str(SLOW_TIMEOUT_S))

GRAPH = {"sc_events": [], "sc_clean": ["sc_events"], "sc_totals": ["sc_clean"], "sc_daily": ["sc_events"],
         "sc_slow": ["sc_events"]}


@dataclass
class Service:
    folder: Path
    home: Path
    started: subprocess.CompletedProcess
    orphan: str
    env: dict

    def lakeray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from lakeray.cli.main import main; main()", *args],
                              cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict:
        return json.loads(self.lakeray("scheduler", "status", "--json").stdout)


def _post(url: str, body: dict | None = None) -> dict | int:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read()) if body is not None else response.status


def graphql(url: str, query: str, **variables) -> dict:
    answer = _post(url + "/graphql", {"query": query, "variables": variables})
    assert "errors" not in answer, answer["errors"]
    return answer["data"]


@pytest.fixture(scope="module")
def service(spark, tmp_path_factory):
    import dagster as dg
    from dagster._core.test_utils import create_run_for_test

    folder = tmp_path_factory.mktemp("service")
    (folder / "jobs" / "features").mkdir(parents=True)
    (folder / "jobs" / "features" / "sc_jobs.py").write_text(textwrap.dedent(JOBS))
    (folder / "lakeray.yaml").write_text(textwrap.dedent("""\
        profiles:
          local:
            spark: {master: "local[2]", driver_memory: 1g, shuffle_partitions: 2}
            storage: {root: lakehouse}
        """))
    settings = load_settings(folder / "lakeray.yaml", "local", environ={})
    events = spark.createDataFrame([(1, "2026-03-01 10:00:00", 5.0)], "user_id long, event_time string, amount double")
    write_table(events.selectExpr("user_id", "cast(event_time as timestamp) as event_time", "amount"),
                settings.table_path("sc_events"))
    # A run a crashed scheduler left "in progress" in the project's storage: `start` must fail it.
    home = folder / "lakehouse" / "_dagster"
    home.mkdir(parents=True)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        orphan = create_run_for_test(instance, job_name="sc_clean_schedule_job", status=dg.DagsterRunStatus.STARTED,
                                     tags={"lakeray/schedule": "sc_clean_schedule"}).run_id
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKERAY_")}
    service = Service(folder, home, subprocess.CompletedProcess([], 0), orphan, env)
    service.started = service.lakeray("scheduler", "start")
    try:
        yield service
    finally:
        service.lakeray("scheduler", "stop")  # a no-op when the last test stopped it


def test_scheduler_start_status_and_the_asset_graph_over_graphql(service):
    import dagster as dg

    assert service.started.returncode == 0, service.started.stderr
    with dg.DagsterInstance.from_config(str(service.home)) as instance:  # failed, so run retries re-execute it
        assert instance.get_run_by_id(service.orphan).status == dg.DagsterRunStatus.FAILURE
    info = service.status()
    assert info["running"] and info["ui_answers"] and info["url"].startswith("http://127.0.0.1:")
    assert info["dagster_home"] == str(service.home)
    assert _post(info["url"] + "/server_info") == 200
    nodes = graphql(info["url"], "{ assetNodes { assetKey { path } dependencyKeys { path } } }")["assetNodes"]
    assert {n["assetKey"]["path"][0]: sorted(d["path"][0] for d in n["dependencyKeys"]) for n in nodes} == GRAPH
    # The daemon is up: its scheduler heartbeats into the project's SQLite storage.
    health = '{ instance { daemonHealth { daemonStatus(daemonType: "SCHEDULER") { healthy } } } }'
    deadline = time.monotonic() + 90
    while not graphql(info["url"], health)["instance"]["daemonHealth"]["daemonStatus"]["healthy"]:
        assert time.monotonic() < deadline, "the daemon's scheduler never reported healthy"
        time.sleep(2)
    again = service.lakeray("scheduler", "start")
    assert again.returncode == 1 and "already runs for this project" in again.stderr


def test_the_ui_shows_the_asset_graph_in_headless_chromium(service, tmp_path):
    from PIL import Image

    from tests.spark.chromium import Chromium, chromium_binary

    url = service.status()["url"]
    width, height = 1600, 900
    with Chromium(chromium_binary(REPO), tmp_path / "profile", width, height) as browser:
        # The global lineage view with both asset groups expanded (the UI writes this URL itself when
        # one expands them: "⌥E - Expand all groups").
        browser.open(f"{url}/asset-groups?expanded=global%40global%3Afeatures%2Cglobal%40global%3Ainputs")
        graph = browser.wait_for(_RENDERED_GRAPH, lambda g: g and len(g["nodes"]) == len(GRAPH)
                                 and len(g["edges"]) == sum(map(len, GRAPH.values())), timeout_s=120)
        # A first visit shows Dagster's "join the community" dialog over the graph, a moment after the
        # graph: skip it, as a user does, and let the nodes' live data ("Loading...") arrive.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "Join the Dagster community" not in browser.evaluate(_TEXT):
            time.sleep(0.5)
        browser.wait_for(_SKIP_DIALOG, lambda settled: settled, timeout_s=60)
        time.sleep(1)  # the dialog's fade-out
        png = browser.screenshot()
    # Every table is a node, named by its asset key, and every edge joins the right pair: an edge's path
    # starts on its source node's right side and ends (at its arrow) on its target's left side.
    boxes = {n["name"]: n for n in graph["nodes"]}
    assert set(boxes) == set(GRAPH)

    def at(x: float, y: float, side: str) -> list[str]:
        return [name for name, b in boxes.items() if b["y"] <= y <= b["y"] + b["h"]
                and abs((b["x"] + b["w"] if side == "right" else b["x"]) - x) <= 12]

    edges = sorted((at(e["x1"], e["y1"], "right"), at(e["x2"], e["y2"], "left")) for e in graph["edges"])
    assert edges == sorted(([up], [name]) for name, ups in GRAPH.items() for up in ups)
    assert "features" in graph["text"] and "inputs" in graph["text"]  # the two groups' titles

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "graph.png").write_bytes(png)
    with Image.open(tmp_path / "graph.png") as image:
        assert image.size == (width, height)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        graph_area = image.convert("L").crop((width // 3, 150, width - 100, height - 100)).getextrema()
    assert len(colours) > 200 and graph_area[1] - graph_area[0] > 100  # text, edges, boxes: not blank
    if os.environ.get("LAKERAY_UI_SCREENSHOT"):
        shutil.copyfile(tmp_path / "graph.png", os.environ["LAKERAY_UI_SCREENSHOT"])


RUN = """query($id: ID!) { runOrError(runId: $id) { ... on Run { runId status startTime endTime
  tags { key value } eventConnection { events { __typename ... on MessageEvent { message } } } } } }"""
LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId tags { key value } } } ... on PythonError { message } } }"""
DONE = {"SUCCESS", "FAILURE", "CANCELED"}


def _wait_run(url: str, run_id: str, timeout_s: float, watch: Callable[[dict], None] = lambda run: None) -> dict:
    deadline = time.monotonic() + timeout_s
    while (run := graphql(url, RUN, id=run_id)["runOrError"])["status"] not in DONE:
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']} after {timeout_s} s"
        watch(run)
        time.sleep(0.5)
    return run


def test_a_run_over_its_timeout_is_cancelled_by_run_monitoring_and_not_reexecuted(spark, service):
    info = service.status()
    url, daemon = info["url"], info["daemon_pid"]
    # Launched through the webserver, as the job's launchpad in the UI does, with the tags a scheduled
    # tick adds (dagster/max_retries: a run whose worker died is re-executed). The limit comes from the
    # job itself: timeout_s in the declaration → dagster/max_runtime on sc_slow_schedule_job.
    tags = {"lakeray/schedule": "sc_slow_schedule", "lakeray/interval": "2026-11-28T10:00:00+00:00",
            "dagster/max_retries": "5"}
    launched = graphql(url, LAUNCH, params={
        "selector": {"repositoryLocationName": "lakeray", "repositoryName": "__repository__",
                     "jobName": "sc_slow_schedule_job"}, "runConfigData": {},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    assert {"key": "dagster/max_runtime", "value": str(SLOW_TIMEOUT_S)} in launched["run"]["tags"]

    # The run's processes: its worker (the pid in the run's events) and everything below it, the Spark
    # driver JVM included. Collected while the run lasts, checked gone after it.
    seen: dict[int, str] = {}

    def watch(run: dict) -> None:
        pids = [int(m.group(1)) for e in run["eventConnection"]["events"]
                if (m := re.search(r"\(pid: (\d+)\)", e.get("message") or ""))]
        for pid in pids[:1] + (descendants(pids[0]) if pids else []):
            try:
                seen.setdefault(pid, Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
            except OSError:
                pass

    # Queued and started by the daemon (a loaded machine takes its time), then cancelled.
    run = _wait_run(url, run_id, 240 + SLOW_TIMEOUT_S + POLL_S, watch)
    messages = [e.get("message") or "" for e in run["eventConnection"]["events"]]
    assert run["status"] == "FAILURE", (run["status"], messages[-5:])
    assert f"Canceling due to exceeding maximum runtime of {SLOW_TIMEOUT_S} seconds." in messages
    assert f"Exceeded maximum runtime of {SLOW_TIMEOUT_S} seconds." in messages
    ran = run["endTime"] - run["startTime"]
    assert SLOW_TIMEOUT_S <= ran <= SLOW_TIMEOUT_S + POLL_S + 30, ran  # the limit, one monitoring poll, slack
    # Nothing committed, and no process of the run outlives it: not the worker, not its Spark JVM.
    assert not table_exists(spark, str(service.folder / "lakehouse" / "sc_slow"))
    assert any("java" in cmd and "pyspark" in cmd for cmd in seen.values()), seen  # Spark had started
    reached = service.folder / "jobs" / "features" / "slow.pid"
    deadline = time.monotonic() + 60
    while left := [pid for pid in seen if pid in group_members(daemon)]:  # alive (not a zombie), not reused
        assert time.monotonic() < deadline, {pid: seen[pid][:200] for pid in left}
        time.sleep(0.5)
    # The interrupted attempt may fail like any error (an interrupt inside Spark's start-up does); the
    # step's RetryPolicy then retries it, and that attempt must stop at once, not run the job.
    events = graphql(url, RUN, id=run_id)["runOrError"]["eventConnection"]["events"]  # the worker's last ones too
    retried_step = any(e["__typename"] == "ExecutionStepRestartEvent" for e in events)
    if retried_step:  # `lakeray runs show` gives that attempt's error: the cancel's reason
        shown = json.loads(service.lakeray("runs", "show", run_id, "--json").stdout)
        assert (f"not retried: this run was stopped (Canceling due to exceeding maximum runtime of "
                f"{SLOW_TIMEOUT_S} seconds.)") in shown["error"], shown["error"]
    print(f"cancelled {ran:.1f} s after the run started; the job function was "
          f"{'reached' if reached.exists() else 'not reached (Spark still starting)'}; the step was "
          f"{'retried and refused' if retried_step else 'not retried'}")

    # To Dagster's run retries the cancel looks like a crash. The worker's own failure, when its step
    # retry was refused, ends the retries (a step failure); if the retry daemon saw the run before that,
    # it re-executes it once, and the re-execution ends at once instead of exceeding the limit again.
    children_query = ('{ runsOrError(filter: {tags: [{key: "dagster/parent_run_id", value: "%s"}]})'
                      ' { ... on Runs { results { runId } } } }' % run_id)
    settled, deadline = None, time.monotonic() + 180
    while not (children := graphql(url, children_query)["runsOrError"]["results"]):
        tags_now = {t["key"]: t["value"] for t in graphql(url, RUN, id=run_id)["runOrError"]["tags"]}
        if tags_now.get("dagster/will_retry") == "false":
            settled = settled or time.monotonic()
            if time.monotonic() - settled > 20:  # the retry daemon's iterations have passed it by
                break
        assert time.monotonic() < deadline, f"the run's retries never settled: {tags_now}"
        time.sleep(1)
    assert len(children) <= 1, children
    for child in children:
        retried = _wait_run(url, child["runId"], 240)
        assert retried["status"] == "FAILURE"
        assert {"key": "dagster/will_retry", "value": "false"} in retried["tags"]
        shown = json.loads(service.lakeray("runs", "show", child["runId"], "--json").stdout)
        assert "not re-executed" in shown["error"] and "Exceeded maximum runtime" in shown["error"]
    assert not table_exists(spark, str(service.folder / "lakehouse" / "sc_slow"))
    print(f"re-executions by the run retries: {len(children)}")

    listed = service.lakeray("runs", "list", "--job", "sc_slow_schedule_job", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["run_id"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert set(rows) == {run_id} | {child["runId"] for child in children}
    assert all(row["status"] == "failure" and row["interval"] == tags["lakeray/interval"] for row in rows.values())
    assert all(rows[child["runId"]]["retry_of"] == run_id for child in children)
    assert rows[run_id]["reason"] == f"Exceeded maximum runtime of {SLOW_TIMEOUT_S} seconds.", rows[run_id]


def test_scheduler_stop_stops_everything_it_started(service):
    info = service.status()
    stopped = service.lakeray("scheduler", "stop")
    assert stopped.returncode == 0 and f"{info['daemon_pid']}" in stopped.stdout
    for pid in (info["daemon_pid"], info["webserver_pid"]):
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
        assert group_members(pid) == []  # code servers, run workers, their JVMs: the whole groups
    assert service.lakeray("scheduler", "status").returncode == 1


# Asset nodes are SVG foreignObjects (overflow visible) whose text starts with the asset key; group frames
# are foreignObjects too (class "group"); edges are SVG paths with an arrow marker.
_RENDERED_GRAPH = """(() => {
  const nodes = [...document.querySelectorAll('foreignObject')]
    .filter(f => !f.classList.contains('group') && (f.getAttribute('style') || '').includes('overflow'))
    .map(f => ({name: (f.firstElementChild ? f.firstElementChild.innerText : '').trim().split('\\n')[0].trim(),
                x: +f.getAttribute('x'),
                y: +f.getAttribute('y'), w: +f.getAttribute('width'), h: +f.getAttribute('height')}));
  const edges = [...document.querySelectorAll('path[marker-end]')].map(p => {
    const a = p.getPointAtLength(0), b = p.getPointAtLength(p.getTotalLength());
    return {x1: a.x, y1: a.y, x2: b.x, y2: b.y};
  });
  return {nodes, edges, text: document.body ? document.body.innerText : ''};
})()"""

_TEXT = "document.body ? document.body.innerText : ''"

_SKIP_DIALOG = """(() => {
  const skip = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Skip');
  if (skip) { skip.click(); return false; }
  const text = document.body ? document.body.innerText : '';
  return !text.includes('Join the Dagster community') && !text.includes('Loading...');
})()"""
