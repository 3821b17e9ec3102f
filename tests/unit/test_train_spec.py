"""Train specs are checked against the pinned table before any worker starts: each mistake a clear error
naming the field. Tables are written with deltalake (no Spark, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from lakeray.errors import ClusterError, ConfigError, DataQualityError, TableNotFoundError


@pytest.fixture(scope="module")
def unit_settings(tmp_path_factory):
    from pathlib import Path

    from lakeray.config import load_settings

    root = tmp_path_factory.mktemp("train_spec")
    return load_settings(Path(__file__).parents[2] / "lakeray.yaml", "local",
                         environ={"LAKERAY_STORAGE__ROOT": str(root)})


def _write(settings, name: str, rows: int = 2000, mode: str = "overwrite", **overrides) -> None:
    import pandas as pd
    from deltalake import write_deltalake

    rng = np.random.default_rng(3)
    frame = pd.DataFrame({
        "txn_id": np.arange(rows, dtype=np.int64),
        "event_time": pd.date_range("2024-01-01", periods=rows, freq="min", tz="UTC"),
        "amount": rng.normal(size=rows),
        "merchant": rng.choice(["a", "b", "c"], size=rows),
        "count_7d": rng.integers(0, 9, size=rows),
        "label": (rng.random(rows) < 0.3).astype(np.int64),
    })
    for column, values in overrides.items():
        frame[column] = values
    write_deltalake(settings.table_path(name), frame, mode=mode)


def _spec(**changes):
    from lakeray.training.spec import TrainSpec

    data = {"name": "t", "model": {"kind": "xgboost", "rounds": 5}, "training_set": "txns", "label": "label",
            "features": ["amount", "merchant", "count_7d"], "split": {"kind": "hash", "column": "txn_id"}}
    data.update(changes)
    return TrainSpec.parse(data, "spec.yaml")


@pytest.fixture(scope="module")
def txns(unit_settings):
    _write(unit_settings, "txns")
    return unit_settings


def test_a_valid_spec_pins_the_version_and_encodes_strings_as_categories(txns):
    from lakeray.training.data import encode, validation_mask
    from lakeray.training.spec import plan_training

    plan = plan_training(txns, _spec())
    assert plan.input == "txns@0" and plan.features == ["amount", "merchant", "count_7d"]
    assert plan.categorical == {"merchant": ["a", "b", "c"]}  # strings are features, not dropped
    assert plan.extra["train_rows"] + plan.extra["valid_rows"] == 2000
    assert 300 < plan.extra["valid_rows"] < 500  # 20% held out by id hash
    import pyarrow as pa

    table = pa.table({"amount": [1.5, None], "merchant": ["c", "zzz"], "count_7d": [2, 3], "txn_id": [1, 2]})
    x = encode(table, plan)
    assert x[0].tolist() == [1.5, 2.0, 2.0] and np.isnan(x[1, 0]) and np.isnan(x[1, 1])  # unseen → missing
    assert validation_mask(table, plan).dtype == bool


def test_all_except_takes_numeric_and_string_columns_and_reports_the_rest(txns):
    from lakeray.training.spec import plan_training

    plan = plan_training(txns, _spec(features={"all_except": ["count_7d"]}))
    assert plan.features == ["amount", "merchant"]
    assert "event_time" in plan.skipped and "timestamp" in plan.skipped["event_time"]


def test_time_split_holds_out_the_latest_rows(txns):
    from lakeray.training.spec import plan_training

    plan = plan_training(txns, _spec(split={"kind": "time", "column": "event_time", "fraction": 0.25}))
    assert plan.extra["valid_rows"] == 500
    cut = plan_training(txns, _spec(split={"kind": "time", "column": "event_time", "cutoff": "2024-01-02T00:00:00"}))
    assert cut.extra["valid_rows"] == 2000 - 24 * 60


@pytest.mark.parametrize(("changes", "match"), [
    ({"features": ["amount", "nope"]}, r"spec.yaml: features: no column\(s\) \['nope'\]"),
    ({"label": "is_fraud"}, r"spec.yaml: label: no column 'is_fraud' in txns@0"),
    ({"features": ["amount", "event_time"]}, r"features: column 'event_time' has type timestamp"),
    ({"features": ["amount", "label"]}, r"features: \['label'\] is the label"),
    ({"categorical": ["count_7d"]}, r"categorical: count_7d: int64 is numeric"),
    ({"categorical": ["amount2"]}, r"categorical: \['amount2'\] not among the features"),
    ({"split": {"kind": "hash", "column": "event_time"}}, r"split.column: .event_time. has type timestamp.*; a hash split"),
    ({"features": ["merchant"], "split": {"kind": "time", "column": "amount", "fraction": 0.2}}, r"split.column: 'amount' has type double"),
    ({"split": {"kind": "time", "column": "event_time", "cutoff": "soon"}}, r"split.cutoff: 'soon' is not an ISO"),
    ({"training_set": "txns@7"}, r"training_set: txns has no version 7 \(latest is 0\)"),
    ({"features": {"all_except": ["ghost"]}}, r"features.all_except: no column\(s\) \['ghost'\]"),
])
def test_spec_errors_name_the_field_before_anything_runs(txns, changes, match):
    from lakeray.training.spec import plan_training

    with pytest.raises(ConfigError, match=match):
        plan_training(txns, _spec(**changes), "spec.yaml")


@pytest.mark.parametrize(("data", "match"), [
    ({"modle": {}}, r"spec.yaml: .*modle: Extra inputs are not permitted"),
    ({"training_set": "txns@latest"}, r"training_set: .*must be `table` or `table@version`"),
    ({"model": {"kind": "xgboost", "module": "x:y"}}, r"model: .*module is only for kind: torch"),
    ({"model": {"kind": "lightgbm"}}, r"model.kind: Input should be 'xgboost' or 'torch'"),
    ({"metric": {"name": "f1"}}, r"metric.name: .*unknown metric 'f1'"),
    ({"scaling": {"num_workers": 0}}, r"scaling.num_workers: Input should be greater than or equal to 1"),
    ({"scaling": {"placement_strategy": "spread"}}, r"scaling.placement_strategy: Input should be 'PACK', 'SPREAD'"),
    ({"split": {"kind": "hash", "column": "txn_id", "cutoff": "2024-01-01"}}, r"cutoff is only for kind: time"),
])
def test_malformed_specs_fail_on_parse(data, match):
    with pytest.raises(ConfigError, match=match):
        _spec(**data)


def test_missing_table_and_label_problems(unit_settings):
    from lakeray.training.spec import plan_training

    with pytest.raises(TableNotFoundError, match="training_set: table 'ghost' does not exist"):
        plan_training(unit_settings, _spec(training_set="ghost"))
    _write(unit_settings, "one_class", label=np.zeros(2000, dtype=np.int64))
    with pytest.raises(DataQualityError, match=r"split: the training split of one_class@0 has a single class"):
        plan_training(unit_settings, _spec(training_set="one_class"))
    # Every positive label falls in the training side: the validation split has a single class.
    labels = np.zeros(2000, dtype=np.int64)
    labels[:10] = 1
    _write(unit_settings, "late_split", label=labels)
    with pytest.raises(DataQualityError, match=r"the validation split of late_split@0 has a single class"):
        plan_training(unit_settings, _spec(training_set="late_split",
                                           split={"kind": "time", "column": "event_time", "fraction": 0.2}))
    _write(unit_settings, "three_classes", label=np.arange(2000, dtype=np.int64) % 3)
    with pytest.raises(DataQualityError, match="values other than 0 and 1"):
        plan_training(unit_settings, _spec(training_set="three_classes"))
    _write(unit_settings, "float_label", label=np.ones(2000) * 0.5)
    with pytest.raises(ConfigError, match=r"label: 'label' has type double"):
        plan_training(unit_settings, _spec(training_set="float_label"))


def test_a_vacuumed_version_is_refused(unit_settings):
    from deltalake import DeltaTable

    from lakeray.training.spec import plan_training

    _write(unit_settings, "vacuumed")
    _write(unit_settings, "vacuumed")  # version 1 replaces every file of version 0
    DeltaTable(unit_settings.table_path("vacuumed")).vacuum(retention_hours=0, enforce_retention_duration=False,
                                                           dry_run=False)
    assert plan_training(unit_settings, _spec(training_set="vacuumed@1")).version == 1
    with pytest.raises(DataQualityError, match=r"training_set: vacuumed@0 lost 1 of its 1 data file\(s\) \(VACUUM"):
        plan_training(unit_settings, _spec(training_set="vacuumed@0"))


def test_gpu_choice():
    from lakeray.training.spec import resolve_gpu

    assert resolve_gpu("auto", 0, 2) is False
    assert resolve_gpu("auto", 2, 2) is True
    assert resolve_gpu("auto", 1, 2) is False  # not one per worker: CPU rather than a hang
    assert resolve_gpu(False, 8, 2) is False
    assert resolve_gpu(True, 4, 2) is True
    with pytest.raises(ClusterError, match=r"use_gpu: true needs 2 GPU\(s\) \(one per worker\), the Ray cluster has no GPU"):
        resolve_gpu(True, 0, 2, "spec.yaml")


def test_xgboost_params_follow_the_device_and_the_spec(txns):
    from lakeray.training.spec import plan_training
    from lakeray.training.xgboost_trainer import xgb_params

    plan = plan_training(txns, _spec(model={"kind": "xgboost", "params": {"max_depth": 3}},
                                     metric={"name": "logloss"}))
    assert xgb_params(plan, use_gpu=True)["device"] == "cuda"
    cpu = xgb_params(plan, use_gpu=False)
    assert cpu["device"] == "cpu" and cpu["max_depth"] == 3 and cpu["eval_metric"] == "logloss"
    assert plan.spec.metric.direction == "min"


def test_the_example_spec_file_is_valid():
    from lakeray.demo import example_project
    from lakeray.training.spec import load_train_spec

    import yaml

    train_specs = [p for p in sorted((example_project() / "jobs" / "training").glob("*.yaml"))
                   if "model" in yaml.safe_load(p.read_text())]  # the others are tune specs
    assert len(train_specs) >= 3
    for path in train_specs:
        assert load_train_spec(path).name


def test_spec_file_errors(tmp_path):
    from lakeray.training.spec import load_train_spec

    with pytest.raises(ConfigError, match="does not exist"):
        load_train_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_train_spec(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_train_spec(listing)


def test_cli_spec_errors_exit_before_ray_and_register_nothing(txns, tmp_path):
    """`lakeray train` with a bad spec: exit 2 (config) or 1 (data), one line naming the field, no
    Ray started (it would take seconds), no MLflow store, no run folder."""
    import os
    import subprocess
    import sys
    import time

    import yaml

    from tests.conftest import REPO

    lakeray = os.path.join(os.path.dirname(sys.executable), "lakeray")
    env = {**os.environ, "LAKERAY_STORAGE__ROOT": txns.storage_root}
    cases = [
        ({"features": ["amount", "nope"]}, 2, "features: no column(s) ['nope']"),
        ({"categorical": ["count_7d"]}, 2, "categorical: count_7d: int64 is numeric"),
        ({"model": {"kind": "torch", "module": "no_such_pkg.mod:Net"}}, 2, "model.module"),
        ({"training_set": "one_class_cli"}, 1, "has a single class"),
    ]
    _write(txns, "one_class_cli", label=np.zeros(2000, dtype=np.int64))
    for changes, code, message in cases:
        spec = _spec(**changes).model_dump(mode="json")
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(spec))
        started = time.perf_counter()
        done = subprocess.run([lakeray, "--config", str(REPO / "lakeray.yaml"), "train", str(path)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == code, done.stderr[-2000:]
        assert message in done.stderr and "Traceback" not in done.stderr
        assert time.perf_counter() - started < 30
    assert not os.path.exists(os.path.join(txns.storage_root, "mlflow.db"))
    assert not os.path.exists(os.path.join(txns.storage_root, "train_runs"))


def test_streamed_shards_are_the_shard_file_by_file(unit_settings):
    import pyarrow as pa
    from deltalake import write_deltalake

    from lakeray.training.ingest import iter_shard, read_shard, table_shards

    path = unit_settings.table_path("four_files")
    for part in range(4):
        write_deltalake(path, pa.table({"k": list(range(part * 10, part * 10 + 10)), "v": [float(part)] * 10}),
                        mode="append")
    for world in (1, 2, 3, 5):  # 5 > files: the contiguous-slice fallback
        shards = table_shards(path, 3, world)
        for rank in range(world):
            pieces = list(iter_shard(path, 3, ["k", "v"], rank, world, shards))
            whole = read_shard(path, 3, ["k", "v"], rank, world, shards)
            streamed = pa.concat_tables(pieces) if pieces else whole.slice(0, 0)
            assert streamed.to_pylist() == whole.to_pylist()
            if all(shards):
                assert len(pieces) == len(shards[rank])  # one batch per data file


def test_ingest_stream_is_for_xgboost():
    with pytest.raises(ConfigError, match="ingest: stream is for xgboost"):
        _spec(model={"kind": "torch"}, ingest="stream")
