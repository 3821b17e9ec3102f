"""Point-in-time training sets on hand-built cases: no leakage, max age, ties, late data, rebuilds."""

import datetime as dt

import pytest

from lakeray.errors import DataQualityError, TableNotFoundError
from lakeray.features.training_sets import (
    FeatureRef,
    TrainingSetSpec,
    build_training_set,
    load_manifest,
    rebuild_training_set,
)
from lakeray.lakehouse.delta import read_table, table_exists, write_table

pytestmark = pytest.mark.spark

T0 = dt.datetime(2026, 5, 1)


def ts(seconds: int) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def tables(spark, settings):
    labels = spark.createDataFrame(
        [(1, ts(10), 0), (1, ts(15), 1), (1, ts(20), 0), (1, ts(30), 1), (1, ts(30), 0), (2, ts(20), 1),
         (3, ts(1), 0)],
        "user_id long, event_time timestamp, label int")
    balance = spark.createDataFrame(
        [(1, ts(5), "a5", 5.0), (1, ts(20), "a20", 20.0), (1, ts(25), "a25", 25.0), (1, ts(28), None, None),
         (2, ts(40), "b40", 40.0)],  # user 2's only row is after its label: must not leak
        "user_id long, event_time timestamp, balance_tag string, balance double")
    activity = spark.createDataFrame([(1, ts(5), 7), (2, ts(19), 3)], "user_id long, ts timestamp, clicks int")
    write_table(labels, settings.table_path("pit_labels"))
    write_table(balance, settings.table_path("pit_balance"))
    write_table(activity, settings.table_path("pit_activity"))
    return settings


@pytest.fixture(params=["spark", "duckdb"])
def engine(request):
    """Every case runs on both engines: the same rows, the same content hash."""
    return request.param


def spec(name="pit_ts", **overrides):
    data = {
        "name": name,
        "labels": "pit_labels",
        "entity_keys": ["user_id"],
        "event_time": "event_time",
        "features": [
            {"table": "pit_balance", "columns": ["balance_tag", "balance"]},
            {"table": "pit_activity", "columns": ["clicks"], "event_time": "ts", "max_age_s": 8},
        ],
    }
    data.update(overrides)
    return TrainingSetSpec.parse(data)


def rows_of(spark, settings, name, version=None):
    df = read_table(spark, settings.table_path(name), version)
    return sorted((r.user_id, (r.event_time - T0).seconds, r.label, r.balance_tag, r.clicks) for r in df.collect())


def test_each_label_sees_only_the_latest_past_feature_row(spark, tables, engine):
    result = build_training_set(spark, tables, spec(f"pit_ts_{engine}", engine=engine))
    assert result.rows == 7 and result.engine == engine
    assert load_manifest(tables, f"pit_ts_{engine}")["engine"] == engine
    assert rows_of(spark, tables, f"pit_ts_{engine}") == [
        (1, 10, 0, "a5", 7),      # clicks at t5 is 5 s old: within max age 8
        (1, 15, 1, "a5", None),   # clicks 10 s old: too old
        (1, 20, 0, "a20", None),  # a feature row at exactly the label's time is visible
        (1, 30, 0, None, None),   # the latest row (t28) has a null value: null, not the older a25
        (1, 30, 1, None, None),   # two labels at the same time get the same features
        (2, 20, 1, None, 3),      # user 2's balance row is from the future: nothing leaks
        (3, 1, 0, None, None),    # no feature rows at all
    ]


def test_no_feature_is_ever_from_after_the_label(spark, tables, engine):
    """Fails on a naive latest-value join, which would hand t=25 and t=40 rows to earlier labels."""
    build_training_set(spark, tables, spec(f"pit_leak_{engine}", engine=engine))
    for row in read_table(spark, tables.table_path(f"pit_leak_{engine}")).collect():
        if row.balance is not None:
            assert row.balance <= (row.event_time - T0).seconds


def test_late_data_changes_only_new_versions_and_rebuild_is_identical_on_either_engine(spark, tables):
    first = build_training_set(spark, tables, spec("pit_late", engine="spark"))
    # A late row for t=12 arrives in a new version of the feature table.
    late = spark.createDataFrame([(1, ts(12), "late12", 12.0)],
                                 "user_id long, event_time timestamp, balance_tag string, balance double")
    late.write.format("delta").mode("append").save(tables.table_path("pit_balance"))
    second = build_training_set(spark, tables, spec("pit_late", engine="duckdb"))
    assert second.inputs["pit_balance"] == first.inputs["pit_balance"] + 1
    assert dict((s, t) for _, s, _, t, _ in rows_of(spark, tables, "pit_late", second.version))[15] == "late12"
    assert dict((s, t) for _, s, _, t, _ in rows_of(spark, tables, "pit_late", first.version))[15] == "a5"
    # The first manifest pins the old version: replaying it ignores the late row, bit for bit, on the
    # engine that built it and on the other one.
    manifest = load_manifest(tables, "pit_late", first.version)
    assert manifest["inputs"]["pit_balance"] == first.inputs["pit_balance"] and manifest["engine"] == "spark"
    for engine in ("duckdb", "spark"):
        rebuilt = rebuild_training_set(spark, tables, manifest, name=f"pit_late_rebuilt_{engine}", engine=engine)
        assert rebuilt.content_hash == first.content_hash and rebuilt.rows == first.rows
        assert rebuilt.engine == engine
        assert rows_of(spark, tables, f"pit_late_rebuilt_{engine}") == rows_of(spark, tables, "pit_late", first.version)
    again = rebuild_training_set(spark, tables, load_manifest(tables, "pit_late", second.version), engine="spark")
    assert again.content_hash == second.content_hash


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"labels": "pit_nope"}, TableNotFoundError, "no Delta table"),
        ({"labels_version": 99}, TableNotFoundError, "pit_labels has no version 99"),
        ({"event_time": "when"}, DataQualityError, "labels/events table 'labels' has no column(s) ['when']"),
        ({"features": [{"table": "pit_balance", "columns": ["nope"]}]}, DataQualityError,
         "feature table 'pit_balance' has no column(s) ['nope']"),
        ({"features": [{"table": "pit_balance", "columns": ["balance"], "version": 50}]}, TableNotFoundError,
         "pit_balance has no version 50"),
    ],
)
def test_bad_specs_name_the_problem_and_write_nothing(spark, tables, overrides, error, message, engine):
    with pytest.raises(error) as err:
        build_training_set(spark, tables, spec("pit_bad", engine=engine, **overrides))
    assert message in err.value.headline
    assert not table_exists(spark, tables.table_path("pit_bad"))


def test_feature_ref_validation_names_the_field():
    from lakeray.errors import ConfigError

    with pytest.raises(ConfigError, match="features.0.columns"):
        TrainingSetSpec.parse({"name": "x", "labels": "l", "entity_keys": ["k"], "event_time": "t",
                               "features": [{"table": "f", "columns": []}]})
    assert FeatureRef(table="f", columns=["c"]).max_age_s is None


def test_composite_keys_match_on_every_key_and_ties_resolve_the_same_on_any_partitioning_and_engine(spark, settings):
    labels = spark.createDataFrame(
        [("eu", 1, ts(10), 1), ("us", 1, ts(10), 0), ("eu", 2, ts(10), 1), (None, 1, ts(10), 0)],
        "region string, user_id long, event_time timestamp, label int")
    # Two rows of (eu, 1) at the same time t5: the tie is broken by a hash of the row, not by arrival.
    feats = spark.createDataFrame(
        [("eu", 1, ts(5), 1.0), ("eu", 1, ts(5), 2.0), ("us", 1, ts(3), 3.0), ("eu", 2, ts(11), 4.0),
         (None, 1, ts(1), 5.0)],
        "region string, user_id long, event_time timestamp, score double")
    write_table(labels, settings.table_path("pit_ck_labels"))
    write_table(feats, settings.table_path("pit_ck_feats"))
    ck = {"labels": "pit_ck_labels", "entity_keys": ["region", "user_id"], "event_time": "event_time",
          "features": [{"table": "pit_ck_feats", "columns": ["score"]}]}
    previous = spark.conf.get("spark.sql.shuffle.partitions")
    hashes, tables = [], []
    try:
        for partitions, descending, engine in [("1", False, "spark"), ("7", True, "spark"), ("1", False, "duckdb"),
                                               ("7", True, "duckdb")]:
            spark.conf.set("spark.sql.shuffle.partitions", partitions)
            # Rewrite the feature rows in another order each time: arrival order must not matter.
            write_table(read_table(spark, settings.table_path("pit_ck_feats")).orderBy("score", ascending=not descending).coalesce(1),
                        settings.table_path("pit_ck_feats"))
            name = f"pit_ck_{partitions}_{engine}"
            hashes.append(build_training_set(spark, settings, TrainingSetSpec.parse(
                {"name": name, "engine": engine, **ck})).content_hash)
            tables.append(sorted((r.region or "-", r.user_id, r.score) for r in
                                 read_table(spark, settings.table_path(name)).collect()))
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", previous)
    assert len(set(hashes)) == 1 and all(t == tables[0] for t in tables)  # any partitioning, order, engine
    by_key = {(region, user): score for region, user, score in tables[0]}
    assert by_key[("eu", 1)] in (1.0, 2.0)   # one of the tied rows, the same one on every build
    assert by_key[("us", 1)] == 3.0          # both keys must match: (eu, 1)'s rows never leak to (us, 1)
    assert by_key[("eu", 2)] is None         # its only row is from the future
    assert by_key[("-", 1)] is None          # a null key matches nothing, not even a null-keyed row
