"""Per-customer spending behaviour over past windows, one row per transaction (the demo's features).

Every aggregate looks strictly into the past: the window ends one second before the transaction, so
a row never sees itself or anything after it (no label leakage through the features).
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lakeray.features import expect, feature_job

DAY = 86_400

FEATURE_COLUMNS = [
    "amount",
    "is_online",
    "is_atm",
    "hour",
    "is_night",
    "cust_txn_count_1d",
    "cust_txn_count_7d",
    "cust_txn_count_30d",
    "cust_amount_sum_7d",
    "cust_amount_avg_30d",
    "cust_amount_max_30d",
    "amount_to_avg_30d",
    "cust_online_share_30d",
    "seconds_since_prev_txn",
    "merchant_fraud_prior",
]


@feature_job(
    name="customer_aggregates",
    inputs=["transactions"],
    entity_keys=["customer_id"],
    event_time="event_time",
    description="Per-transaction features: the customer's spend over the past 1/7/30 days.",
    owner="risk-ml",
    expectations=[
        expect.not_null("transaction_id", "customer_id", "event_time", "amount"),
        expect.unique("transaction_id"),
        expect.between("amount", min=0),
        expect.between("cust_online_share_30d", min=0, max=1),
        expect.row_count(min=1),
    ],
)
def customer_aggregates(transactions: DataFrame) -> DataFrame:
    t = transactions.withColumn("_ts", F.col("event_time").cast("long"))
    by_customer = Window.partitionBy("customer_id").orderBy("_ts")

    def past(days: int) -> Window:
        return by_customer.rangeBetween(-days * DAY, -1)

    online = (F.col("channel") == "online").cast("int")
    avg_30d = F.avg("amount").over(past(30))
    out = (
        t.withColumn("is_online", online)
        .withColumn("is_atm", (F.col("channel") == "atm").cast("int"))
        .withColumn("hour", F.hour("event_time"))
        .withColumn("is_night", (F.col("hour") < 5).cast("int"))
        .withColumn("cust_txn_count_1d", F.count(F.lit(1)).over(past(1)))
        .withColumn("cust_txn_count_7d", F.count(F.lit(1)).over(past(7)))
        .withColumn("cust_txn_count_30d", F.count(F.lit(1)).over(past(30)))
        .withColumn("cust_amount_sum_7d", F.coalesce(F.sum("amount").over(past(7)), F.lit(0.0)))
        .withColumn("cust_amount_avg_30d", avg_30d)
        .withColumn("cust_amount_max_30d", F.max("amount").over(past(30)))
        .withColumn("amount_to_avg_30d", F.col("amount") / avg_30d)
        .withColumn("cust_online_share_30d", F.avg(online).over(past(30)))
        .withColumn("seconds_since_prev_txn", F.col("_ts") - F.max("_ts").over(past(3650)))
        # A static merchant attribute (card networks publish risk lists); here: the generator's rule.
        .withColumn("merchant_fraud_prior", (F.pmod(F.col("merchant_id"), F.lit(23)) == 0).cast("int"))
    )
    return out.select(
        "transaction_id", "customer_id", "event_time",
        *[F.col(c).cast("double").alias(c) for c in FEATURE_COLUMNS],
    )
