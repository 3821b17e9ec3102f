"""`lakeray features ...` and `lakeray tables ...` through the CLI itself, with their exit codes.

The commands run in this process (``lakeray.cli.main.main(argv)``) against the test session's Spark:
``spark_session`` returns the running session and leaves it running, so no JVM starts per command.
The CLI resolves the same settings as the ``settings`` fixture (same config file, same overrides).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from lakeray.cli.main import main
from lakeray.lakehouse.delta import read_table, table_version
from tests.conftest import REPO
from tests.flights_data import flights_frames, write_flights_sources

pytestmark = pytest.mark.spark

JOBS = '''
from pyspark.sql import functions as F
from lakeray.features import feature_job

@feature_job(name="cli_user_totals", inputs=["cli_events"], entity_keys=["user_id"], event_time="event_time")
def cli_user_totals(cli_events):
    return cli_events.groupBy("user_id").agg(F.max("event_time").alias("event_time"), F.sum("amount").alias("total"))

@feature_job(name="cli_daily", inputs=["cli_events"], entity_keys=["user_id"], event_time="event_time",
             write_mode="partitions", partition_by=["day"])
def cli_daily(cli_events, start=None, end=None):
    df = cli_events.withColumn("day", F.to_date("event_time"))
    df = df.where((F.col("day") >= start) & (F.col("day") < end))
    return df.groupBy("user_id", "day").agg(F.max("event_time").alias("event_time"), F.sum("amount").alias("amount"))
'''


@pytest.fixture(scope="module")
def jobs_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_jobs")
    (folder / "cli_jobs.py").write_text(textwrap.dedent(JOBS))
    return folder


@pytest.fixture
def cli(spark, settings, jobs_folder, monkeypatch, capsys):
    """Run `lakeray --config lakeray.yaml ARGS...` in-process; returns (exit code, stdout, stderr)."""
    env = {"LAKERAY_STORAGE__ROOT": settings.profile.storage.root,
           "LAKERAY_SERVE__PORT": str(settings.profile.serve.port),
           "LAKERAY_SPARK__DRIVER_MEMORY": settings.profile.spark.driver_memory,
           "LAKERAY_SPARK__SHUFFLE_PARTITIONS": str(settings.profile.spark.shuffle_partitions),
           "LAKERAY_RAY__OP_TIMEOUT_S": str(settings.profile.ray.op_timeout_s),
           "LAKERAY_FEATURE_PATHS": str(jobs_folder),
           "COLUMNS": "300"}  # rich tables as wide as they need, not 80 columns
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("LAKERAY_DEBUG", "LAKERAY_PROFILE", "LAKERAY_CONFIG"):
        monkeypatch.delenv(key, raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(["--config", str(REPO / "lakeray.yaml"), *map(str, args)])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    assert spark.range(3).count() == 3, "a CLI command stopped the shared Spark session"


def _local(settings, name: str) -> Path:
    return Path(settings.table_path(name))


def _sample(n: int = 40, seed: int = 1) -> pd.DataFrame:
    import numpy as np

    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "id": np.arange(n, dtype="int64"),
        "name": [f"item {i}" for i in range(n)],
        "price": rng.uniform(1, 100, n).round(2),
        "qty": rng.integers(1, 9, n).astype("int64"),
        "seen_at": pd.Timestamp("2026-02-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 10_000, n), unit="min"),
    })


def _as_frame(spark_df, columns) -> pd.DataFrame:
    frame = spark_df.toPandas()[columns].sort_values("id").reset_index(drop=True)
    return frame


# ------------------------------------------------------------------ tables import


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_import_each_format_keeps_the_values_and_records_lineage(cli, spark, settings, tmp_path, fmt):
    data = _sample()
    src = tmp_path / f"src_{fmt}"
    src.mkdir()
    halves = [data.iloc[:25], data.iloc[25:]]
    for i, part in enumerate(halves):  # a folder of two files, plus a marker file readers skip
        target = src / f"part-{i}.{fmt}"
        if fmt == "parquet":
            part.to_parquet(target, index=False, coerce_timestamps="us")
        elif fmt == "csv":
            part.to_csv(target, index=False)
        else:
            part.to_json(target, orient="records", lines=True, date_format="iso", date_unit="s")
    (src / "_SUCCESS").write_text("")
    name = f"cli_imp_{fmt}"

    code, out, err = cli("tables", "import", name, src, "--json")  # format inferred from the extensions
    assert code == 0, err
    result = json.loads(out)
    expected_bytes = sum(p.stat().st_size for p in src.glob(f"*.{fmt}"))
    assert result["rows"] == 40 and result["files"] == 2 and result["bytes"] == expected_bytes
    assert result["format"] == fmt and result["source"] == src.as_uri() and result["version"] == 0

    table = read_table(spark, settings.table_path(name))
    types = dict(table.dtypes)
    assert types["seen_at"] == "timestamp" and types["price"] == "double" and types["name"] == "string"
    got = _as_frame(table, list(data.columns))
    want = data.assign(seen_at=data["seen_at"].dt.tz_convert(None).astype("datetime64[us]"))
    got["seen_at"] = got["seen_at"].astype("datetime64[us]")
    pd.testing.assert_frame_equal(got, want, check_dtype=False)

    code, out, err = cli("tables", "history", name, "--json")
    assert code == 0, err
    [commit] = json.loads(out)
    lineage = commit["lineage"]
    assert commit["kind"] == "import" and commit["rows"] == 40
    assert lineage["source"] == src.as_uri() and lineage["format"] == fmt and lineage["files"] == 2
    assert lineage["bytes"] == expected_bytes and lineage["schema"] == result["schema"]
    assert lineage["lakeray_import_id"] == result["import_id"]


def test_import_append_widens_numbers_and_refuses_a_conflicting_schema(cli, spark, settings, tmp_path):
    first = pd.DataFrame({"id": [1, 2], "amount": [1.5, 2.25], "tag": ["a", "b"]})
    more = pd.DataFrame({"tag": ["c"], "id": [3], "amount": [4]})  # other column order; amount inferred int
    conflict = pd.DataFrame({"id": [4], "amount": ["lots"], "extra": [1]})
    for frame, file in [(first, "first.csv"), (more, "more.csv"), (conflict, "conflict.csv")]:
        frame.to_csv(tmp_path / file, index=False)
    path = settings.table_path("cli_append")

    assert cli("tables", "import", "cli_append", tmp_path / "first.csv")[0] == 0
    code, out, err = cli("tables", "import", "cli_append", tmp_path / "more.csv", "--mode", "append")
    assert code == 0, err
    assert "cli_append@1: 1 rows (append)" in out
    rows = sorted((r["id"], r["amount"], r["tag"]) for r in read_table(spark, path).collect())
    assert rows == [(1, 1.5, "a"), (2, 2.25, "b"), (3, 4.0, "c")]

    code, out, err = cli("tables", "import", "cli_append", tmp_path / "conflict.csv", "--mode", "append")
    assert code == 1
    assert "missing column(s) ['tag']" in err and "new column(s) ['extra']" in err
    assert "amount (string, table has double)" in err and "Traceback" not in err
    assert table_version(spark, path) == 1  # nothing was written

    # overwrite replaces rows and schema in one commit
    code, out, err = cli("tables", "import", "cli_append", tmp_path / "conflict.csv", "--mode", "overwrite")
    assert code == 0, err
    assert read_table(spark, path).columns == ["id", "amount", "extra"] and table_version(spark, path) == 2


def test_bad_imports_are_refused_with_the_fix_and_leave_no_table(cli, spark, settings, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    (tmp_path / "mixed").mkdir()
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "mixed" / "a.csv", index=False)
    pd.DataFrame({"a": [1]}).to_json(tmp_path / "mixed" / "b.json", orient="records", lines=True)
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "data.parquet")
    (tmp_path / "not.json").write_text("a,b\n1,2\n")
    (tmp_path / "ragged.csv").write_text("a,b\n1,2\n3,4,5\n6,7\n")  # fails while Delta writes, not at read
    (tmp_path / "blank.csv").write_text("")
    cases = [  # (args, exit code, words in the error)
        (["cli_bad", tmp_path / "nope"], 2, "does not exist"),
        (["cli_bad", tmp_path / "empty"], 2, "holds no data files"),
        (["cli_bad", tmp_path / "mixed"], 2, "cannot infer the format"),
        (["cli_bad", tmp_path / "data.parquet", "--format", "csv"], 1, "does not match"),
        (["cli_bad", tmp_path / "not.json"], 1, "as json: Unrecognized token"),
        (["cli_bad", tmp_path / "ragged.csv"], 1, "Malformed CSV record"),
        (["cli_bad", tmp_path / "blank.csv"], 1, "no columns"),
        (["cli_bad", tmp_path / "data.parquet", "--option", "novalue"], 2, "KEY=VALUE"),
        (["cli_bad", "jdbc:derby:memory:nothing"], 2, "--option dbtable"),
        (["1bad-name", tmp_path / "data.parquet"], 2, "table name '1bad-name' is not valid"),
        (["cli_user_totals", tmp_path / "data.parquet"], 2, "output of feature job"),
    ]
    for args, want_code, words in cases:
        code, out, err = cli("tables", "import", *args)
        assert (code, words in err) == (want_code, True), (args, code, err)
        assert "Traceback" not in err
    assert not _local(settings, "cli_bad").exists()


def test_import_from_jdbc(cli, spark, settings):
    url = "jdbc:derby:memory:lakeray_cli;create=true"  # Derby ships with Spark: a real JDBC source
    spark.range(5).selectExpr("id", "concat('n', id) as label").write.jdbc(url, "APP.ITEMS", mode="overwrite")
    code, out, err = cli("tables", "import", "cli_jdbc", url, "--option", "dbtable=APP.ITEMS", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["format"] == "jdbc" and result["rows"] == 5 and result["files"] == 0
    assert sorted(r["label"] for r in read_table(spark, settings.table_path("cli_jdbc")).collect()) == \
        [f"n{i}" for i in range(5)]


def test_flights_style_sources_import_with_typed_times(cli, spark, settings, tmp_path):
    sources = write_flights_sources(tmp_path, seed=3, n_flights=600)
    flights, weather, carrier_daily = flights_frames(seed=3, n_flights=600)
    for name, key, files in [("cli_flights", "flights", 2), ("cli_weather", "weather", 1),
                             ("cli_carrier_daily", "carrier_daily", 1)]:
        code, out, err = cli("tables", "import", name, sources[key], "--json")
        assert code == 0, err
        assert json.loads(out)["files"] == files

    imported = read_table(spark, settings.table_path("cli_flights"))
    assert dict(imported.dtypes) == {"flight_id": "int", "origin": "string", "carrier": "string",
                                     "dep_time": "timestamp", "delay": "double"}
    got = imported.toPandas().sort_values("flight_id").reset_index(drop=True)
    assert got["flight_id"].tolist() == flights["flight_id"].tolist()
    assert got["origin"].tolist() == flights["origin"].tolist()
    assert got["delay"].tolist() == flights["delay"].tolist()
    assert (got["dep_time"].astype("datetime64[us]") ==
            flights["dep_time"].dt.tz_convert(None).astype("datetime64[us]")).all()

    w = read_table(spark, settings.table_path("cli_weather"))
    assert dict(w.dtypes)["obs_time"] == "timestamp" and w.count() == len(weather)
    got_w = w.toPandas().sort_values(["airport", "obs_time"]).reset_index(drop=True)
    want_w = weather.sort_values(["airport", "obs_time"]).reset_index(drop=True)
    assert got_w["wind"].tolist() == want_w["wind"].tolist() and got_w["temp"].tolist() == want_w["temp"].tolist()

    c = read_table(spark, settings.table_path("cli_carrier_daily"))
    assert dict(c.dtypes) == {"carrier": "string", "day": "timestamp", "delay_avg": "double"}
    assert sorted(r["delay_avg"] for r in c.collect()) == sorted(carrier_daily["delay_avg"].tolist())


# ------------------------------------------------------------------ features through the CLI


def _events_csv(folder: Path) -> Path:
    rows = [(u, f"2026-03-0{d} 1{u}:00:00", float(d * 10 + u)) for d in range(1, 5) for u in range(3)]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["user_id", "event_time", "amount"]).to_csv(folder / "events.csv", index=False)
    labels = [(u, "2026-03-05 00:00:00", u % 2) for u in range(3)]
    pd.DataFrame(labels, columns=["user_id", "event_time", "label"]).to_csv(folder / "labels.csv", index=False)
    return folder


def test_features_commands_and_tables_list(cli, spark, settings, tmp_path, jobs_folder, monkeypatch):
    src = _events_csv(tmp_path / "src")
    assert cli("tables", "import", "cli_events", src / "events.csv")[0] == 0
    assert cli("tables", "import", "cli_labels", src / "labels.csv")[0] == 0

    code, out, err = cli("features", "list")
    assert code == 0, err
    assert "cli_user_totals" in out and "cli_daily" in out
    monkeypatch.setenv("LAKERAY_FEATURE_PATHS", str(tmp_path / "no_such_folder"))
    code, out, err = cli("features", "list")
    assert code == 2 and "is not a folder" in err
    monkeypatch.setenv("LAKERAY_FEATURE_PATHS", str(jobs_folder))

    code, out, err = cli("features", "describe", "cli_user_totals")
    assert code == 0 and "entity_keys:\n- user_id" in out and "code_version:" in out
    code, out, err = cli("features", "describe", "nope")
    assert code == 2 and "no feature job named 'nope'" in err

    code, out, err = cli("features", "run", "cli_user_totals")
    assert code == 0, err
    assert out.startswith("cli_user_totals@0: 3 rows from cli_events@0")
    code, out, err = cli("features", "run", "nope")
    assert code == 2 and "no feature job named 'nope'" in err
    code, out, err = cli("features", "run", "cli_user_totals", "--start", "2026-03-01")
    assert code == 2 and "--start and --end go together" in err

    code, out, err = cli("features", "history", "cli_user_totals", "--json")
    assert code == 0, err
    [commit] = json.loads(out)
    assert commit["kind"] == "feature run" and commit["lineage"]["inputs"] == {"cli_events": 0}
    code, out, err = cli("features", "history", "cli_user_totals")
    assert code == 0 and "cli_events@0" in out and commit["lineage"]["lakeray_run_id"] in out
    code, out, err = cli("features", "history", "cli_missing")
    assert code == 1 and "no Delta table" in err

    code, out, err = cli("features", "show", "cli_user_totals", "--limit", "2")
    assert code == 0 and "cli_user_totals" in out and "total" in out
    code, out, err = cli("features", "show", "cli_user_totals", "--version", "7")
    assert code == 1 and "version 7" in err
    code, out, err = cli("features", "show", "cli_missing")
    assert code == 1 and "no Delta table" in err

    spec = tmp_path / "ts.yaml"
    spec.write_text(textwrap.dedent("""\
        name: cli_ts
        labels: cli_labels
        entity_keys: [user_id]
        event_time: event_time
        features:
          - table: cli_user_totals
            columns: [total]
        """))
    code, out, err = cli("features", "training-set", spec)
    assert code == 0, err
    assert out.startswith("cli_ts@0: 3 rows from cli_labels@0, cli_user_totals@0")
    totals = {r["user_id"]: r["total"] for r in read_table(spark, settings.table_path("cli_ts")).collect()}
    assert totals == {0: 100.0, 1: 104.0, 2: 108.0}
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("name: cli_ts2\nlabels: cli_labels\nfeatures: []\n")
    code, out, err = cli("features", "training-set", bad_spec)
    assert code == 2 and "entity_keys" in err
    missing_spec = tmp_path / "missing.yaml"
    missing_spec.write_text(spec.read_text().replace("cli_user_totals", "cli_missing"))
    code, out, err = cli("features", "training-set", missing_spec)
    assert code == 1 and "no Delta table" in err
    assert not _local(settings, "cli_ts2").exists()

    code, out, err = cli("features", "rebuild", "cli_ts", "--into", "cli_ts_copy")
    assert code == 0, err
    assert "identical to cli_ts@0" in out
    # A manifest whose hash no longer matches (as if an input had been rewritten): exit 1, nothing committed.
    manifest_file = Path(settings.storage_root, "_manifests", "cli_ts", "v0.json")
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "content_hash": "3-" + "0" * 64}))
    try:
        code, out, err = cli("features", "rebuild", "cli_ts")
    finally:
        manifest_file.write_text(json.dumps(manifest))
    assert code == 1 and "differs" in err and "nothing was written" in err
    assert sorted(p.name for p in (_local(settings, "cli_ts") / "_delta_log").glob("*.json")) == [
        "00000000000000000000.json"]

    code, out, err = cli("tables", "list", "--json")
    assert code == 0, err
    listed = {t["name"]: t for t in json.loads(out)}
    assert listed["cli_events"]["kind"] == "input" and listed["cli_events"]["rows"] == 12
    assert listed["cli_user_totals"]["kind"] == "feature" and listed["cli_user_totals"]["version"] == 0
    assert listed["cli_ts"]["kind"] == "training set" and listed["cli_ts"]["rows"] == 3
    assert listed["cli_events"]["last_commit"].endswith("+00:00")
    code, out, err = cli("tables", "list")
    assert code == 0 and "cli_user_totals" in out and "training set" in out
    monkeypatch.setenv("LAKERAY_STORAGE__ROOT", "s3a://bucket/lakehouse")
    code, out, err = cli("tables", "list")
    assert code == 2 and "not supported yet" in err
    monkeypatch.setenv("LAKERAY_STORAGE__ROOT", settings.profile.storage.root)

    code, out, err = cli("tables", "history", "cli_ts", "--json")
    assert code == 0, err
    [commit] = json.loads(out)
    assert commit["kind"] == "training set"
    assert commit["lineage"]["inputs"] == {"cli_labels": 0, "cli_user_totals": 0}
    code, out, err = cli("tables", "history", "cli_events", "--limit", "1")
    assert code == 0 and (src / "events.csv").as_uri() in out and "csv, 1 file(s)" in out
    code, out, err = cli("tables", "history", "cli_missing")
    assert code == 1 and "no Delta table" in err

    code, out, err = cli("features", "vacuum", "cli_user_totals", "cli_ts", "--dry-run", "--retain-hours", "0")
    assert code == 0, err
    assert "cli_user_totals@0: would delete 0 file(s)" in out
    assert "kept v0: " in out and "training-set manifest cli_ts@0" in out
    code, out, err = cli("features", "vacuum", "cli_events", "--retain-hours", "0")
    assert code == 0 and "cli_events@0: deleted 0 file(s)" in out
    code, out, err = cli("features", "vacuum", "cli_nope")
    assert code == 1 and "no Delta table 'cli_nope'" in err


def test_features_backfill_through_the_cli(cli, spark, settings, tmp_path):
    src = _events_csv(tmp_path / "src")
    if not _local(settings, "cli_events").exists():
        assert cli("tables", "import", "cli_events", src / "events.csv")[0] == 0

    code, out, err = cli("features", "backfill", "cli_daily", "--start", "2026-03-01", "--end", "2026-03-03", "--json")
    assert code == 0, err
    chunks = [json.loads(line) for line in out.splitlines()]
    assert [(c["start"], c["status"]) for c in chunks] == [("2026-03-01", "committed"), ("2026-03-02", "committed")]
    code, out, err = cli("features", "backfill", "cli_daily", "--start", "2026-03-01", "--end", "2026-03-04")
    assert code == 0, err
    assert "cli_daily: 1 chunk(s) committed, 2 skipped" in out
    assert read_table(spark, settings.table_path("cli_daily")).count() == 9

    code, out, err = cli("features", "backfill", "cli_daily", "--start", "2026-03-04", "--end", "2026-03-01")
    assert code == 2 and "not after" in err
    code, out, err = cli("features", "backfill", "nope", "--start", "2026-03-01", "--end", "2026-03-02")
    assert code == 2 and "no feature job named 'nope'" in err
