"""Training sets whose label rows carry several entities, and the review defects of the join: keys
matched by name (never by position), refusals before anything is written, null-aware hashes,
rebuilds that compare before they commit, one very frequent key."""

import datetime as dt
import json
import os

import pytest

from lakeray.errors import ConfigError, DataQualityError, TableNotFoundError
from lakeray.features.training_sets import TrainingSetSpec, build_training_set, load_manifest, rebuild_training_set
from lakeray.lakehouse.delta import read_table, table_exists, table_version, write_table
from lakeray.lakehouse.pit import content_hash

pytestmark = pytest.mark.spark

T0 = dt.datetime(2026, 3, 1)


def at(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


@pytest.fixture(scope="module")
def flights(spark, settings):
    """Flights keyed by id, each with an origin airport and a carrier; weather per airport; delays per carrier."""
    write_table(spark.createDataFrame(
        [(1, "JFK", "AA", at(10), 0), (2, "JFK", "DL", at(13.5), 1), (3, "LAX", "AA", at(10), 0),
         (4, "SFO", "DL", at(200), 1)],
        "flight_id int, origin string, carrier string, dep_time timestamp, delayed int"),
        settings.table_path("ent_flights"))
    write_table(spark.createDataFrame(
        [("JFK", at(9), 20.0), ("JFK", at(10.5), 21.0), ("LAX", at(5), 30.0), ("SFO", at(199), 15.0)],
        "airport string, obs_time timestamp, temp double"), settings.table_path("ent_weather"))
    write_table(spark.createDataFrame(
        [("AA", at(0), 0.1), ("DL", at(0), 0.3), ("DL", at(12), 0.4)],
        "carrier string, day timestamp, delay_avg double"), settings.table_path("ent_carrier"))
    return settings


@pytest.fixture(params=["spark", "duckdb"])
def engine(request):
    return request.param


def flight_spec(name, engine=None, **weather):
    return TrainingSetSpec.parse({
        "name": name, "engine": engine, "labels": "ent_flights", "entity_keys": ["flight_id"], "event_time": "dep_time",
        "features": [
            {"table": "ent_weather", "columns": ["temp"], "event_time": "obs_time", "max_age_s": 3 * 3600,
             "join_keys": {"airport": "origin"}, **weather},
            {"table": "ent_carrier", "columns": ["delay_avg"], "event_time": "day", "max_age_s": 7 * 86400,
             "entity_keys": ["carrier"]},
        ]})


def by_id(spark, settings, name):
    return {r.flight_id: (r["temp"] if "temp" in r else None, r.delay_avg)
            for r in read_table(spark, settings.table_path(name)).collect()}


def test_each_feature_table_joins_on_its_own_entity(spark, flights, engine):
    built = build_training_set(spark, flights, flight_spec(f"ent_ts_{engine}", engine))
    assert by_id(spark, flights, f"ent_ts_{engine}") == {
        1: (20.0, 0.1),    # JFK weather at 9h (the 10.5h row is after departure); AA's delays
        2: (21.0, 0.4),    # JFK at 10.5h is 3 h old: within the max age; DL's newest row
        3: (None, 0.1),    # LAX's only row is 5 h old: older than 3 h
        4: (15.0, None),   # DL's rows are > 7 days old at 200 h
    }
    manifest = load_manifest(flights, f"ent_ts_{engine}", built.version)
    refs = manifest["spec"]["features"]
    assert refs[0]["join_keys"] == {"airport": "origin"} and refs[1]["join_keys"] == {"carrier": "carrier"}
    assert manifest["hash_version"] == 2


def test_a_feature_table_keyed_by_another_entity_is_never_matched_by_position(spark, flights, engine):
    """Before per-table join keys, `entity_keys: [carrier]` was compared with the labels' first key
    (flight_id here) by position: 100% null features, no error."""
    spec = TrainingSetSpec.parse({
        "name": f"ent_positional_{engine}", "engine": engine, "labels": "ent_flights", "entity_keys": ["origin"], "event_time": "dep_time",
        "features": [{"table": "ent_carrier", "columns": ["delay_avg"], "event_time": "day",
                      "entity_keys": ["carrier"]}]})
    build_training_set(spark, flights, spec)
    assert by_id(spark, flights, f"ent_positional_{engine}") == {1: (None, 0.1), 2: (None, 0.4), 3: (None, 0.1),
                                                       4: (None, 0.4)}


@pytest.mark.parametrize(("weather", "message"), [
    ({"join_keys": {"airport": "airport"}}, "joins on label column(s) ['airport'], which the labels"),
    ({"join_keys": {"airport": "flight_id"}},
     "key 'airport' is string but the label column 'flight_id' it joins on is int"),
])
def test_joins_that_can_never_match_are_refused_before_anything_is_written(spark, flights, weather, message, engine):
    with pytest.raises(DataQualityError) as err:
        build_training_set(spark, flights, flight_spec("ent_refused", engine, **weather))
    assert message in err.value.headline and "ent_weather" in err.value.headline
    assert not os.path.exists(flights.table_path("ent_refused"))


def test_a_build_that_fails_while_writing_leaves_no_trace(spark, flights):
    """An event time that cannot be cast fails inside the Spark job, after Delta made the folder: the
    folder must go, so the name reads as missing, not as a broken table."""
    write_table(spark.createDataFrame([("JFK", "not a time", 1.0)], "airport string, obs_time string, temp double"),
                flights.table_path("ent_bad_time"))
    spec = TrainingSetSpec.parse({
        "name": "ent_failed", "engine": "spark", "labels": "ent_flights", "entity_keys": ["flight_id"], "event_time": "dep_time",
        "features": [{"table": "ent_bad_time", "columns": ["temp"], "event_time": "obs_time",
                      "join_keys": {"airport": "origin"}}]})
    with pytest.raises(Exception, match="(?i)cast"):
        build_training_set(spark, flights, spec)
    assert not os.path.exists(flights.table_path("ent_failed"))
    with pytest.raises(TableNotFoundError):
        read_table(spark, flights.table_path("ent_failed"))
    # The name is free: the corrected spec builds into it.
    assert build_training_set(spark, flights, flight_spec("ent_failed")).version == 0
    # The duckdb engine joins on timestamps and dates only: forcing it is refused up front, naming the setting.
    with pytest.raises(ConfigError, match=r"engine duckdb cannot build it: ent_bad_time.obs_time is string"):
        build_training_set(spark, flights, spec.model_copy(update={"name": "ent_failed_duckdb", "engine": "duckdb"}))
    assert not os.path.exists(flights.table_path("ent_failed_duckdb"))


def test_content_hash_tells_where_the_nulls_are(spark):
    left = spark.createDataFrame([("x", None)], "a string, b string")
    right = spark.createDataFrame([(None, "x")], "a string, b string")
    assert content_hash(left, hash_version=1) == content_hash(right, hash_version=1)  # the old defect
    assert content_hash(left) != content_hash(right)
    assert content_hash(left) == content_hash(spark.createDataFrame([("x", None)], "a string, b string"))


def test_ties_between_rows_that_differ_only_in_null_positions_are_broken_by_content(spark, settings, engine):
    """Two feature rows at the same key and time, (x, NULL) and (NULL, x): the old tie hash skipped
    nulls, so both hashed alike and the winner depended on arrival order."""
    write_table(spark.createDataFrame([(1, at(1))], "k long, t timestamp"), settings.table_path("tie_labels"))
    spec = TrainingSetSpec.parse({"name": f"tie_ts_{engine}", "engine": engine, "labels": "tie_labels", "entity_keys": ["k"], "event_time": "t",
                                  "features": [{"table": "tie_feats", "columns": ["a", "b"]}]})
    winners = set()
    for rows in ([(1, at(0), "x", None), (1, at(0), None, "x")], [(1, at(0), None, "x"), (1, at(0), "x", None)]):
        write_table(spark.createDataFrame(rows, "k long, t timestamp, a string, b string").coalesce(1),
                    settings.table_path("tie_feats"))
        build_training_set(spark, settings, spec)
        row = read_table(spark, settings.table_path(f"tie_ts_{engine}")).first()
        winners.add((row.a, row.b))
    assert len(winners) == 1


def test_rebuild_compares_before_it_commits(spark, flights, engine):
    built = build_training_set(spark, flights, flight_spec(f"ent_rebuild_{engine}", engine))
    manifest = load_manifest(flights, f"ent_rebuild_{engine}", built.version)
    same = rebuild_training_set(spark, flights, manifest)
    assert same.content_hash == built.content_hash and same.version == built.version + 1

    tampered = {**manifest, "content_hash": "4-" + "0" * 64}  # as if an input had been rewritten
    with pytest.raises(DataQualityError, match="nothing was written"):
        rebuild_training_set(spark, flights, tampered)
    assert table_version(spark, flights.table_path(f"ent_rebuild_{engine}")) == same.version  # untouched

    with pytest.raises(DataQualityError, match=rf"rebuilt rows are in ent_rebuild_check_{engine}@0"):
        rebuild_training_set(spark, flights, tampered, name=f"ent_rebuild_check_{engine}")
    assert content_hash(read_table(spark, flights.table_path(f"ent_rebuild_check_{engine}"))) == built.content_hash


def test_manifests_from_before_join_keys_still_rebuild(spark, settings):
    """Old manifests: feature keys matched to the labels' keys by position, and hashes skipped nulls."""
    write_table(spark.createDataFrame([(1, at(5), 1), (2, at(5), 0)], "user_id long, t timestamp, y int"),
                settings.table_path("old_labels"))
    write_table(spark.createDataFrame([(1, at(1), None), (2, at(2), 3.0)], "user long, t timestamp, score double"),
                settings.table_path("old_feats"))
    built = build_training_set(spark, settings, TrainingSetSpec.parse({
        "name": "old_ts", "labels": "old_labels", "entity_keys": ["user_id"], "event_time": "t",
        "features": [{"table": "old_feats", "columns": ["score"], "join_keys": {"user": "user_id"}}]}))
    manifest = load_manifest(settings, "old_ts", built.version)
    # The same manifest as the code before 2026-11-28 wrote it.
    old = json.loads(json.dumps(manifest))
    del old["hash_version"]
    for ref in old["spec"]["features"]:
        del ref["join_keys"]
    old["content_hash"] = content_hash(read_table(spark, settings.table_path("old_ts")), hash_version=1)
    rebuilt = rebuild_training_set(spark, settings, old, name="old_ts_rebuilt")
    assert rebuilt.content_hash == old["content_hash"]
    assert sorted(map(tuple, read_table(spark, settings.table_path("old_ts_rebuilt")).select("user_id", "score")
                      .collect())) == [(1, None), (2, 3.0)]


def test_one_very_frequent_key_is_refused_with_its_name_and_count(spark, settings):
    labels = spark.range(300).selectExpr("id", "if(id < 200, 'unknown', cast(id as string)) as device",
                                         "timestamp '2026-03-01 10:00:00' as t")
    write_table(labels, settings.table_path("hot_labels"))
    write_table(spark.range(50).selectExpr("'unknown' as device", "timestamp '2026-03-01 09:00:00' as t",
                                           "cast(id as double) as v"), settings.table_path("hot_feats"))
    spec = TrainingSetSpec.parse({"name": "hot_ts", "engine": "spark", "labels": "hot_labels", "entity_keys": ["device"],
                                  "event_time": "t", "features": [{"table": "hot_feats", "columns": ["v"]}]})
    with pytest.raises(DataQualityError) as err:
        build_training_set(spark, settings, spec, max_partition_rows=100)
    assert "device='unknown'" in err.value.headline and "rows" in err.value.headline
    assert not table_exists(spark, settings.table_path("hot_ts"))
    assert build_training_set(spark, settings, spec, max_partition_rows=1000).rows == 300


def test_flights_imported_from_files_match_an_independent_as_of_join(spark, settings, tmp_path_factory):
    """The issue's case end to end: CSV, JSON and parquet sources imported with `tables import`'s
    function, two entities on each flight (origin airport, carrier), max ages of 3 hours and 7 days,
    checked value by value against pandas merge_asof on the same generated frames."""
    import math

    import pandas as pd
    from deltalake import DeltaTable

    from lakeray.features.imports import import_table
    from tests.flights_data import flights_frames, write_flights_sources

    seed, n = 11, 3000
    sources = write_flights_sources(tmp_path_factory.mktemp("flights"), seed=seed, n_flights=n)
    for table, key in [("fl_flights", "flights"), ("fl_weather", "weather"), ("fl_carrier_daily", "carrier_daily")]:
        import_table(spark, settings, table, str(sources[key]))
    spec = {"labels": "fl_flights", "entity_keys": ["flight_id"], "event_time": "dep_time",
        "features": [
            {"table": "fl_weather", "columns": ["temp", "wind"], "event_time": "obs_time", "max_age_s": 3 * 3600,
             "join_keys": {"airport": "origin"}},
            {"table": "fl_carrier_daily", "columns": ["delay_avg"], "event_time": "day", "max_age_s": 7 * 86400,
             "entity_keys": ["carrier"]},
        ]}
    built = {engine: build_training_set(spark, settings, TrainingSetSpec.parse(
        {"name": f"fl_training_set_{engine}", "engine": engine, **spec})) for engine in ("spark", "duckdb")}
    assert built["spark"].rows == n and built["spark"].content_hash == built["duckdb"].content_hash

    flights, weather, daily = flights_frames(seed, n)
    expected = pd.merge_asof(flights.sort_values("dep_time"), weather.sort_values("obs_time"), left_on="dep_time",
                             right_on="obs_time", left_by="origin", right_by="airport",
                             tolerance=pd.Timedelta(hours=3), direction="backward")
    expected = pd.merge_asof(expected.sort_values("dep_time"), daily.sort_values("day"), left_on="dep_time",
                             right_on="day", by="carrier", tolerance=pd.Timedelta(days=7), direction="backward")
    want = {int(r.flight_id): (r.temp, r.wind, r.delay_avg) for r in expected.itertuples()}
    ours = DeltaTable(settings.table_path("fl_training_set_duckdb")).to_pandas(
        columns=["flight_id", "temp", "wind", "delay_avg"])
    got = {int(r.flight_id): (r.temp, r.wind, r.delay_avg) for r in ours.itertuples()}
    assert got.keys() == want.keys()

    def same(a, b):
        return (a is None or (isinstance(a, float) and math.isnan(a))) == (b is None or (isinstance(b, float) and
                math.isnan(b))) and (a != a or a is None or a == b)

    differ = [fid for fid in want if not all(same(x, y) for x, y in zip(got[fid], want[fid], strict=True))]
    assert differ == []
    # The case exercises both entities and both max ages: some flights lack weather (gaps, outage), none
    # lacks a carrier figure, and every flight got the weather of its own origin.
    assert 0 < sum(math.isnan(v[0]) for v in want.values()) < n // 4
    assert not any(math.isnan(v[2]) for v in want.values())


def test_the_duckdb_engine_builds_from_the_cli_without_java(flights, tmp_path):
    """`features training-set` starts Spark only for the spark engine: with no java on PATH the duckdb
    build succeeds, and forcing spark fails with the setup error (exit 3)."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from tests.conftest import REPO

    spec_file = tmp_path / "flights.yaml"
    spec_file.write_text(yaml.safe_dump(flight_spec("ent_cli").model_dump(mode="json", exclude_none=True)))
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": bin_dir, "HOME": os.environ.get("HOME", "/root"), "LAKERAY_STORAGE__ROOT": flights.storage_root}
    run = [f"{bin_dir}/lakeray", "--config", str(REPO / "lakeray.yaml"), "features", "training-set", str(spec_file)]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ent_cli@0: 4 rows" in done.stdout and "engine duckdb (auto: local inputs" in done.stdout
    forced = subprocess.run([*run, "--engine", "spark"], capture_output=True, text=True, env=env, timeout=300)
    assert forced.returncode == 3 and "Java was not found" in forced.stderr


def test_both_engines_agree_on_random_tables(spark, settings):
    """Random small inputs with everything that makes as-of joins hard at once: ties in (key, time),
    null keys and times, NaN and null values, two entities, integer keys of two widths, max ages."""
    import numpy as np

    rng = np.random.default_rng(2026)

    def maybe(values, share=0.15):
        return [None if rng.random() < share else v for v in values]

    for case in range(4):
        n = int(rng.integers(1, 40))
        labels = list(zip(range(n), maybe(rng.integers(0, 4, n).tolist()), maybe(rng.choice(["eu", "us"], n).tolist()),
                          maybe([at(x / 60) for x in rng.integers(0, 30, n).tolist()]), rng.integers(0, 2, n).tolist(),
                          strict=True))
        write_table(spark.createDataFrame(labels, "id long, k int, region string, t timestamp, y int"),
                    settings.table_path("rnd_labels"))
        m = int(rng.integers(0, 50))
        values = [float("nan") if rng.random() < 0.1 else float(v) for v in rng.normal(size=m)]
        write_table(spark.createDataFrame(
            list(zip(maybe(rng.integers(0, 4, m).tolist()), maybe([at(x / 60) for x in rng.integers(0, 30, m).tolist()]),
                     maybe(values), maybe(rng.choice(["p", "q", ""], m).tolist()), strict=True)),
            "k long, t timestamp, a double, s string"), settings.table_path("rnd_a"))
        write_table(spark.createDataFrame(
            list(zip(maybe(rng.choice(["eu", "us"], m).tolist()), maybe([at(x / 60) for x in rng.integers(0, 30, m).tolist()]),
                     maybe(rng.integers(-5, 5, m).tolist()), strict=True)),
            "region string, t timestamp, b int"), settings.table_path("rnd_b"))
        age = [None, 60.0, 600.0][case % 3]
        spec = {"labels": "rnd_labels", "entity_keys": ["id"], "event_time": "t",
                "features": [{"table": "rnd_a", "columns": ["a", "s"], "entity_keys": ["k"], "max_age_s": age},
                             {"table": "rnd_b", "columns": ["b"], "entity_keys": ["region"]}]}
        hashes = {engine: build_training_set(spark, settings, TrainingSetSpec.parse(
            {"name": f"rnd_{engine}", "engine": engine, **spec})).content_hash for engine in ("spark", "duckdb")}
        rows = {engine: sorted(map(repr, read_table(spark, settings.table_path(f"rnd_{engine}")).collect()))
                for engine in ("spark", "duckdb")}
        assert hashes["spark"] == hashes["duckdb"], (case, rows)
        assert rows["spark"] == rows["duckdb"], case


def test_duckdb_without_spilling_refuses_inputs_over_its_memory_limit(spark, settings):
    from dataclasses import replace

    from lakeray.config import TrainingSetsConfig
    from lakeray.features.training_sets import choose_engine

    write_table(spark.range(3_000_000).selectExpr("id", "timestamp '2026-03-01' + make_interval(0,0,0,0,0,0,id) as t",
                                                  "rand(1) as v"), settings.table_path("mem_feats"))
    write_table(spark.range(10).selectExpr("id", "timestamp '2026-04-01' as t"), settings.table_path("mem_labels"))
    tight = replace(settings, profile=settings.profile.model_copy(update={"training_sets": TrainingSetsConfig(
        duckdb_memory_limit_mb=64, duckdb_spill=False)}))
    spec = TrainingSetSpec.parse({"name": "mem_ts", "labels": "mem_labels", "entity_keys": ["id"], "event_time": "t",
                                  "engine": "duckdb", "features": [{"table": "mem_feats", "columns": ["v"]}]})
    with pytest.raises(ConfigError, match=r"over training_sets.duckdb_memory_limit_mb 64, and "
                                          r"training_sets.duckdb_spill is off"):
        build_training_set(None, tight, spec)
    assert not os.path.exists(settings.table_path("mem_ts"))
    assert choose_engine(tight, spec.model_copy(update={"engine": "auto"}))[0] == "spark"
    assert choose_engine(settings, spec.model_copy(update={"engine": "auto"}))[0] == "duckdb"  # spilling on


def test_the_duckdb_engine_keeps_the_labels_order(spark, settings):
    """Same inputs, same rows in the same order: XGBoost's row sampling depends on the order, so a
    model trained on a rebuilt set is only the same model if the order is the same too."""
    from deltalake import DeltaTable

    write_table(spark.range(300_000).selectExpr("id", "id % 5000 as k", "timestamp '2026-03-02' - make_interval(0,0,0,0,0,0,id % 86400) as t")
                .coalesce(1), settings.table_path("order_labels"))
    write_table(spark.range(300_000).selectExpr("id % 5000 as k", "timestamp '2026-03-01' + make_interval(0,0,0,0,0,0,id) as t",
                                                "rand(3) as v"), settings.table_path("order_feats"))
    spec = TrainingSetSpec.parse({"name": "order_ts", "labels": "order_labels", "entity_keys": ["id"], "event_time": "t",
                                  "engine": "duckdb", "features": [{"table": "order_feats", "columns": ["v"],
                                                                    "entity_keys": ["k"]}]})
    first, second = (build_training_set(None, settings, spec).version for _ in range(2))
    table = DeltaTable(settings.table_path("order_ts"))
    orders = []
    for version in (first, second):
        table.load_as_version(version)
        orders.append(table.to_pyarrow_table(columns=["id", "v"]))
    assert orders[0].equals(orders[1])
    labels = DeltaTable(settings.table_path("order_labels")).to_pyarrow_table(columns=["id"])
    assert orders[0].column("id").equals(labels.column("id"))  # the labels' own order
