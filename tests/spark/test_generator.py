"""The example data generator: deterministic by seed, independent of partitioning, learnable label."""

import hashlib

import pytest

from lakeray.features.synthetic import TRANSACTION_COLUMNS, generate_transactions

pytestmark = pytest.mark.spark


def digest(df) -> str:
    rows = sorted(tuple(r) for r in df.collect())
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def test_same_seed_same_rows_whatever_the_partitioning(spark):
    one = generate_transactions(spark, 5_000, seed=7, partitions=1)
    three = generate_transactions(spark, 5_000, seed=7, partitions=3)
    assert one.columns == TRANSACTION_COLUMNS
    assert digest(one) == digest(three)


def test_other_seed_other_rows(spark):
    assert digest(generate_transactions(spark, 2_000, seed=1)) != digest(generate_transactions(spark, 2_000, seed=2))


def test_values_are_plausible(spark):
    from pyspark.sql import functions as F

    df = generate_transactions(spark, 50_000, seed=3)
    stats = df.agg(
        F.count("*").alias("rows"),
        F.countDistinct("transaction_id").alias("ids"),
        F.min("amount").alias("min_amount"),
        F.avg("is_fraud").alias("fraud_rate"),
        F.min("event_time").alias("first"),
        F.max("event_time").alias("last"),
        F.countDistinct("channel").alias("channels"),
    ).first()
    assert stats.rows == stats.ids == 50_000
    assert stats.min_amount > 0
    assert 0.005 < stats.fraud_rate < 0.1
    assert (stats.last - stats.first).days >= 85
    assert stats.channels == 3


def test_fraud_is_more_likely_online(spark):
    from pyspark.sql import functions as F

    rates = {r.channel: r.rate for r in generate_transactions(spark, 50_000, seed=3)
             .groupBy("channel").agg(F.avg("is_fraud").alias("rate")).collect()}
    assert rates["online"] > 1.5 * rates["pos"]
