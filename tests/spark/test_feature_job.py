"""The example feature job on a small hand-built input whose values are checked by hand."""

import datetime as dt
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 3, 1, 12, 0, 0)


def load_job():
    spec = importlib.util.spec_from_file_location("customer_aggregates_under_test",
                                                  REPO / "jobs/features/customer_aggregates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.customer_aggregates


def txn(tid, customer, offset, amount, channel="pos", merchant=1, fraud=0):
    return (tid, customer, merchant, channel, float(amount), T0 + offset, fraud)


@pytest.fixture(scope="module")
def features(spark):
    rows = [
        txn(1, 10, dt.timedelta(0), 10, "online"),
        txn(2, 10, dt.timedelta(hours=1), 30),
        txn(3, 10, dt.timedelta(hours=1), 50),  # same second as #2: neither sees the other
        txn(4, 10, dt.timedelta(days=2), 200, "online", merchant=23, fraud=1),
        txn(5, 10, dt.timedelta(days=40), 20),
        txn(6, 99, dt.timedelta(hours=2), 1000),  # another customer: never mixed into customer 10
    ]
    columns = ["transaction_id", "customer_id", "merchant_id", "channel", "amount", "event_time", "is_fraud"]
    df = spark.createDataFrame(rows, columns)
    job = load_job()
    return {r.transaction_id: r for r in job.fn(transactions=df).collect()}


def test_first_transaction_has_no_history(features):
    first = features[1]
    assert first.cust_txn_count_1d == 0 and first.cust_txn_count_30d == 0
    assert first.cust_amount_avg_30d is None and first.seconds_since_prev_txn is None
    assert first.cust_amount_sum_7d == 0.0


def test_windows_only_see_the_strict_past(features):
    second, third = features[2], features[3]
    for row in (second, third):  # ties at the same second are excluded both ways
        assert row.cust_txn_count_1d == 1
        assert row.cust_amount_avg_30d == 10.0
        assert row.seconds_since_prev_txn == 3600.0
    fourth = features[4]
    assert fourth.cust_txn_count_1d == 0  # two days later
    assert fourth.cust_txn_count_7d == 3
    assert fourth.cust_amount_sum_7d == 90.0
    assert fourth.cust_amount_avg_30d == 30.0
    assert fourth.cust_amount_max_30d == 50.0
    assert fourth.amount_to_avg_30d == pytest.approx(200 / 30)
    assert fourth.cust_online_share_30d == pytest.approx(1 / 3)
    assert fourth.merchant_fraud_prior == 1.0
    assert "is_fraud" not in fourth.asDict()  # labels live in their own table (point-in-time join)


def test_thirty_day_window_forgets_old_rows(features):
    fifth = features[5]  # day 40: only #4 (day 2) is more than 30 days back too -> nothing in 30d
    assert fifth.cust_txn_count_30d == 0
    assert fifth.seconds_since_prev_txn == 38 * 86400


def test_customers_are_isolated(features):
    other = features[6]
    assert other.cust_txn_count_30d == 0 and other.amount == 1000.0


def test_calendar_features(features):
    assert features[1].hour == 12.0 and features[1].is_night == 0.0 and features[1].is_online == 1.0
