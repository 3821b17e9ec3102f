"""Reading only what is shown: head_arrow stops after ``limit`` rows, file by file, and `features show`
uses it (a table whose later files are unreadable still shows its first rows)."""

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from lakeray.lakehouse.delta import head_arrow, read_arrow, table_files
from tests.conftest import REPO


@pytest.fixture
def three_files(tmp_path):
    """A Delta table of three files (one append each, 100 rows apiece), written by delta-rs."""
    from deltalake import write_deltalake

    path = str(tmp_path / "tables" / "events")
    for part in range(3):
        ids = pa.array(range(part * 100, part * 100 + 100), pa.int64())
        write_deltalake(path, pa.table({"id": ids, "x": pa.compute.multiply(ids, 2), "part": [part] * 100}),
                        mode="append")
    return path


def _break_all_but_first(path: str) -> None:
    files = [f.removeprefix("file://") for f in table_files(path)]
    assert len(files) == 3
    for later in files[1:]:
        with open(later, "wb") as broken:
            broken.write(b"not parquet at all")


def test_head_returns_the_first_rows_and_the_asked_columns(three_files):
    head = head_arrow(three_files, limit=5, columns=["id", "x"])
    assert head.column_names == ["id", "x"] and head.num_rows == 5
    assert head.column("x").to_pylist() == [2 * i for i in head.column("id").to_pylist()]
    assert head_arrow(three_files, limit=1000).num_rows == 300  # fewer rows than asked: all of them
    assert head_arrow(three_files, version=0, limit=1000).num_rows == 100  # time travel
    assert head_arrow(three_files, limit=0).num_rows == 0


def test_head_reads_no_file_beyond_the_rows_it_returns(three_files):
    _break_all_but_first(three_files)
    with pytest.raises(Exception):
        read_arrow(three_files)  # a whole-version read touches the broken files
    head = head_arrow(three_files, limit=20)
    assert head.num_rows == 20


def test_features_show_reads_only_the_rows_it_prints(three_files, tmp_path):
    _break_all_but_first(three_files)
    env = {**os.environ, "LAKERAY_STORAGE__ROOT": str(tmp_path), "COLUMNS": "200"}
    lakeray = os.path.join(os.path.dirname(sys.executable), "lakeray")
    shown = subprocess.run([lakeray, "--config", str(REPO / "lakeray.yaml"),
                            "features", "show", "events", "--limit", "3"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "events@latest" in shown.stdout


def test_evaluation_reads_batch_by_batch_and_matches_a_whole_table_evaluation(tmp_path):
    import numpy as np
    import xgboost
    from deltalake import write_deltalake
    from sklearn.metrics import roc_auc_score

    from lakeray.config import load_settings
    from lakeray.training.data import holdout_mask, to_matrix
    from lakeray.training.evaluate import evaluate
    from lakeray.training.spec import TrainSpec, plan_training

    settings = load_settings(REPO / "lakeray.yaml", "local", environ={"LAKERAY_STORAGE__ROOT": str(tmp_path)})
    rng = np.random.default_rng(3)
    path = settings.table_path("train_set")
    for part in range(3):  # three files
        ids = np.arange(part * 2000, part * 2000 + 2000)
        f1 = rng.normal(size=2000)
        label = (f1 + rng.normal(scale=1.0, size=2000) > 0.8).astype(np.int64)
        write_deltalake(path, pa.table({"row_id": ids, "label": label, "f1": f1, "f2": rng.normal(size=2000)}),
                        mode="append")
    whole = read_arrow(path)
    booster = xgboost.train({"objective": "binary:logistic", "max_depth": 2},
                            xgboost.DMatrix(to_matrix(whole, ["f1", "f2"]), label=whole.column("label").to_numpy()),
                            num_boost_round=5)
    plan = plan_training(settings, TrainSpec.parse({
        "name": "t", "model": {"kind": "xgboost"}, "training_set": "train_set@2", "label": "label",
        "features": ["f1", "f2"], "split": {"kind": "hash", "column": "row_id", "fraction": 0.2}}))
    result = evaluate(plan, booster.inplace_predict)
    mask = holdout_mask(whole.column("row_id").to_numpy(), 0.2)
    expected = roc_auc_score(whole.column("label").to_numpy()[mask],
                             booster.inplace_predict(to_matrix(whole, ["f1", "f2"])[mask]))
    assert result.rows == int(mask.sum()) == plan.extra["valid_rows"] and 0 < result.rows < 6000
    assert result.metrics["auc"] == pytest.approx(expected)
