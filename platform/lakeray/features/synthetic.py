"""Example data: card-transaction events with a learnable fraud signal, generated in Spark.

Every value is a pure function of ``(transaction_id, seed)`` through Spark's ``xxhash64``, so the
output does not depend on the number of partitions or executors: the same seed gives the same rows on
a laptop and on a cluster, and 10,000,000 rows generate in parallel without a driver-side loop.

The fraud label follows a hidden logistic model over things the feature job can see: the amount
relative to the customer's usual spend, the channel, night hours and a set of risky merchants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["generate_transactions", "TRANSACTION_COLUMNS", "START_TIMESTAMP", "SPAN_DAYS"]

TRANSACTION_COLUMNS = ["transaction_id", "customer_id", "merchant_id", "channel", "amount", "event_time",
                       "is_fraud"]
START_TIMESTAMP = "2026-01-01 00:00:00"
SPAN_DAYS = 90


def _uniform(seed: int, salt: str, *cols):
    """A uniform draw in [0, 1) from a hash of ``cols``; deterministic and partition-independent."""
    from pyspark.sql import functions as F

    hashed = F.xxhash64(*cols, F.lit(seed), F.lit(salt))
    return F.pmod(hashed, F.lit(1 << 30)).cast("double") / float(1 << 30)


def generate_transactions(spark: SparkSession, rows: int, seed: int = 42, partitions: int | None = None
                          ) -> DataFrame:
    """``rows`` transactions over 90 days from ``START_TIMESTAMP``; the same seed gives the same rows."""
    from pyspark.sql import functions as F

    if rows < 1:
        raise ValueError("rows must be >= 1")
    customers = max(50, rows // 40)  # ~40 transactions per customer: enough history for the windows
    merchants = max(20, rows // 400)
    partitions = partitions or max(spark.sparkContext.defaultParallelism, rows // 2_000_000)
    tid = F.col("transaction_id")

    base = spark.range(0, rows, numPartitions=partitions).withColumnRenamed("id", "transaction_id")
    df = (
        base.withColumn("customer_id", (F.floor(_uniform(seed, "cust", tid) * customers)).cast("long"))
        .withColumn("merchant_id", (F.floor(_uniform(seed, "merch", tid) * merchants)).cast("long"))
        .withColumn("_u_channel", _uniform(seed, "chan", tid))
        .withColumn(
            "channel",
            F.when(F.col("_u_channel") < 0.35, "online").when(F.col("_u_channel") < 0.9, "pos").otherwise("atm"),
        )
        # Each customer has a usual spend level (log-uniform 8..270); amounts scatter around it.
        .withColumn("_base", F.exp(F.lit(2.0) + 3.5 * _uniform(seed, "base", F.col("customer_id"))))
        .withColumn("_u_spike", _uniform(seed, "spike", tid))
        .withColumn("_spike", F.when(F.col("_u_spike") < 0.03, 4.0 + 6.0 * _uniform(seed, "mag", tid))
                    .otherwise(1.0))
        .withColumn(
            "amount",
            F.round(F.col("_base") * F.col("_spike") * (0.2 - F.log(1.0 - _uniform(seed, "amt", tid) * 0.999)), 2),
        )
        .withColumn(
            "event_time",
            (F.unix_timestamp(F.lit(START_TIMESTAMP)) + F.floor(_uniform(seed, "time", tid) * SPAN_DAYS * 86400))
            .cast("timestamp"),
        )
        .withColumn("_night", (F.hour("event_time") < 5).cast("double"))
        .withColumn("_risky", (F.pmod(F.col("merchant_id"), F.lit(23)) == 0).cast("double"))
        .withColumn(
            "_logit",
            F.lit(-6.0)
            + 4.5 * (F.col("_spike") > 1.0).cast("double")
            + 1.3 * (F.col("channel") == "online").cast("double")
            + 1.2 * F.col("_night")
            + 2.2 * F.col("_risky"),
        )
        .withColumn("is_fraud", (_uniform(seed, "fraud", tid) < 1.0 / (1.0 + F.exp(-F.col("_logit")))).cast("int"))
    )
    return df.select(*TRANSACTION_COLUMNS)
