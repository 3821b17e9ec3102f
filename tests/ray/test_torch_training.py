"""PyTorch training through lakeray: one worker (a Ray task), two workers (TorchTrainer + DDP), a user's
module from jobs/training/, a module that does not import (refused before any worker starts), GPU
device selection, and the per-worker loop running without Ray.

The data is a synthetic table with the demo training set's columns (written with deltalake, no Spark)
whose label follows a rule over amount, channel and the customer's window features, so a model that
learns reaches a validation AUC well above 0.7 (the Bernoulli noise keeps it below 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lakeray.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS = 20_000
TABLE = "torch_fraud_like"


def _synthetic(rows: int, seed: int):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    count_30d = rng.poisson(20, rows).astype(np.float64)
    count_7d = rng.binomial(count_30d.astype(int), 0.25).astype(np.float64)
    count_1d = rng.binomial(count_7d.astype(int), 0.2).astype(np.float64)
    avg_30d = np.where(count_30d > 0, rng.gamma(2.0, 30.0, rows), np.nan)
    amount = rng.gamma(2.0, 30.0, rows)
    channel = rng.choice(["atm", "online", "pos"], rows, p=[0.2, 0.3, 0.5])
    hour = rng.integers(0, 24, rows).astype(np.float64)
    burst = count_1d - count_7d / 7.0
    ratio = amount / np.where(np.isnan(avg_30d), amount, avg_30d)
    logit = -2.0 + 1.2 * np.log1p(ratio) + 0.9 * burst + 1.0 * (channel == "online") + 0.8 * (hour < 5)
    is_fraud = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int32)
    return pa.table({
        "transaction_id": np.arange(rows, dtype=np.int64), "customer_id": rng.integers(0, 500, rows),
        "is_fraud": is_fraud, "amount": amount, "channel": channel, "is_online": (channel == "online") * 1.0,
        "is_atm": (channel == "atm") * 1.0, "hour": hour, "is_night": (hour < 5) * 1.0,
        "cust_txn_count_1d": count_1d, "cust_txn_count_7d": count_7d, "cust_txn_count_30d": count_30d,
        "cust_amount_sum_7d": count_7d * rng.gamma(2.0, 30.0, rows), "cust_amount_avg_30d": avg_30d,
        "cust_amount_max_30d": avg_30d * 2.0, "amount_to_avg_30d": amount / avg_30d,
        "cust_online_share_30d": rng.random(rows), "seconds_since_prev_txn": rng.exponential(3e4, rows),
        "merchant_fraud_prior": (rng.random(rows) < 0.05) * 1.0,
    })


@pytest.fixture(scope="module")
def table_version(settings):
    from deltalake import DeltaTable, write_deltalake

    path = settings.table_path(TABLE)
    table = _synthetic(ROWS, seed=3)
    half = ROWS // 2  # two files: two workers read one each
    write_deltalake(path, table.slice(0, half), mode="overwrite")
    write_deltalake(path, table.slice(half), mode="append")
    return DeltaTable(path).version()


def _spec(version: int, **changes):
    from lakeray.training.spec import TrainSpec

    body = {
        "name": "torch_test", "training_set": f"{TABLE}@{version}", "label": "is_fraud",
        "features": {"all_except": ["customer_id"]}, "categorical": ["channel"],
        "split": {"kind": "hash", "column": "transaction_id", "fraction": 0.2},
        "model": {"kind": "torch", "rounds": 3, "batch_size": 256, "learning_rate": 0.003, "seed": 5,
                  "params": {"hidden": [32, 16]}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False},
        "checkpoint_every": 1, "metric": {"name": "auc"},
    }
    for key, value in changes.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    return TrainSpec.parse(body, "test spec")


@pytest.mark.ray
def test_one_worker_trains_checkpoints_each_epoch_and_loads_on_the_driver(settings, ray_handle, table_version):
    from lakeray.training.api import train
    from lakeray.training.torch_trainer import predict_torch

    report = train(settings, _spec(table_version), "test spec", register=False)
    o = report.outcome
    assert o.kind == "torch" and o.path == "task" and o.steps == 3
    assert o.train_rows + o.valid_rows == ROWS
    assert report.evaluation.metrics["auc"] > 0.7
    assert [h["step"] for h in o.history] == [1, 2, 3]  # one progress entry per epoch
    checkpoints = sorted(d for d in os.listdir(o.run_dir) if d.startswith("checkpoint_"))
    assert checkpoints == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003_final"]
    # The driver's model is on CPU, in eval mode, and scores like the worker's last validation pass.
    assert not o.model.training and all(p.device.type == "cpu" for p in o.model.parameters())
    worker_auc = o.history[-1]["valid_auc"]
    assert report.evaluation.metrics["auc"] == pytest.approx(worker_auc, abs=1e-4)
    scores = predict_torch(o.model, np.full((2, len(o.plan.features)), np.nan, dtype=np.float32))
    assert scores.shape == (2,) and np.all((scores > 0) & (scores < 1))  # all-missing rows still score


@pytest.mark.ray
def test_a_resumed_run_ends_with_the_same_weights_as_the_uninterrupted_one(settings, ray_handle, table_version):
    """Resume from the epoch-2 checkpoint (optimizer state, seeds, the best epoch under early
    stopping): epoch 3 is trained exactly as before, so the final weights are equal, bit for bit."""
    import shutil

    import torch

    from lakeray.training.api import resume, train

    first = train(settings, _spec(table_version, early_stopping={"rounds": 5}), "test spec", register=False)
    o = first.outcome
    assert o.best_step is not None and 1 <= o.best_step <= 3
    weights = torch.load(os.path.join(o.checkpoint_dir, "model.pt"), weights_only=True)
    shutil.rmtree(o.checkpoint_dir)  # as if the driver died after epoch 2's checkpoint
    again = resume(settings, o.run_id, register=False).outcome
    assert again.steps == 3 and again.best_step == o.best_step
    assert [h["step"] for h in again.history] == [1, 2, 3]
    resumed = torch.load(os.path.join(again.checkpoint_dir, "model.pt"), weights_only=True)
    assert weights.keys() == resumed.keys()
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


@pytest.mark.ray
def test_two_workers_train_with_ddp_on_their_own_shards(settings, ray_handle, table_version):
    from lakeray.training.api import train

    spec = _spec(table_version, scaling={"num_workers": 2}, checkpoint_every=5)
    report = train(settings, spec, "test spec", register=False)
    o = report.outcome
    assert o.path == "ray-train" and o.steps == 3
    assert o.train_rows + o.valid_rows == ROWS  # both workers trained, on disjoint shards
    assert report.evaluation.metrics["auc"] > 0.7
    # The validation metric the workers computed (gathered over both shards) is the driver's.
    assert report.evaluation.metrics["auc"] == pytest.approx(o.history[-1]["valid_auc"], abs=1e-4)


@pytest.mark.ray
def test_a_users_module_next_to_the_spec_trains(settings, ray_handle, table_version):
    """jobs/training/fraud_sequence.yaml as shipped, on the synthetic table (same column names)."""
    from lakeray.training.api import train
    from lakeray.training.spec import load_train_spec

    where = os.path.join(REPO, "jobs", "training", "fraud_sequence.yaml")
    shipped = load_train_spec(where)
    assert shipped.model.module == "sequence_model:CustomerSequenceModel"
    spec = shipped.model_copy(update={
        "training_set": f"{TABLE}@{table_version}", "early_stopping": None,
        "model": shipped.model.model_copy(update={"rounds": 2, "batch_size": 256}),
        "scaling": shipped.scaling.model_copy(update={"cpus_per_worker": 1, "use_gpu": False})})
    report = train(settings, spec, where, register=False)
    assert type(report.outcome.model).__name__ == "CustomerSequenceModel"
    assert report.outcome.steps == 2
    assert report.evaluation.metrics["auc"] > 0.7


@pytest.mark.ray
def test_a_module_that_does_not_import_fails_before_any_worker_starts(settings, ray_handle, table_version):
    from lakeray.training.api import train

    spec = _spec(table_version, model={"module": "no_such_package.models:Net"})
    runs = os.path.join(settings.storage_root, "train_runs")
    before = set(os.listdir(runs)) if os.path.isdir(runs) else set()
    with pytest.raises(ConfigError, match=r"test spec: model\.module: 'no_such_package\.models' does not import"):
        train(settings, spec, "test spec", register=False)
    after = set(os.listdir(runs)) if os.path.isdir(runs) else set()
    assert after == before  # no run folder: nothing was launched


@pytest.mark.parametrize("module, params, message", [
    ("lakeray.training.torch_models:NoSuchModel", {}, "has no attribute 'NoSuchModel'"),
    (None, {"hidden_layers": [8]}, "does not build with model.params"),
    ("lakeray.training.torch_models:embedding_dim", {}, "does not build"),
])
def test_module_errors_name_the_field(module, params, message):
    from lakeray.training.torch_trainer import validate_torch_spec

    spec = _spec(0, model={"module": module, "params": params})
    with pytest.raises(ConfigError, match="model.module") as err:
        validate_torch_spec(spec, "test spec")
    assert message in err.value.headline


def test_device_for_picks_the_gpu_of_the_local_rank(monkeypatch):
    import torch

    from lakeray.training.torch_loop import device_for

    assert device_for(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        device_for(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_for(True) == torch.device("cuda", 0)
    assert device_for(True, local_rank=3) == torch.device("cuda", 1)  # several workers sharing a node's GPUs
    assert device_for(False, local_rank=1) == torch.device("cpu")


def test_the_torch_loop_runs_without_ray_or_lakeray():
    """What the GPU machine has: torch and numpy. The loop file is loaded by path, so not even the
    lakeray package is imported; it trains a plain module and resumes deterministically."""
    loop_file = os.path.join(REPO, "platform", "lakeray", "training", "torch_loop.py")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import numpy as np, torch
        spec = importlib.util.spec_from_file_location("torch_loop", {loop_file!r})
        loop = importlib.util.module_from_spec(spec); spec.loader.exec_module(loop)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4000, 5)).astype(np.float32)
        y = (x[:, 0] - x[:, 1] > 0).astype(np.float32)

        def model():
            torch.manual_seed(1)
            return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(8, 1))
        full = model()
        out = loop.train_epochs(full, x[:3000], y[:3000], x[3000:], y[3000:], epochs=2, batch_size=128, lr=0.01,
                                device=loop.device_for(False))
        assert out["metrics"]["valid_auc"] > 0.9, out
        # Stop after epoch 1, resume from its weights and optimizer: epoch 2 replays exactly.
        saved = {{}}
        def keep(epoch, metrics, module, optimizer):
            saved.update(weights=loop.clone_state(module), opt=optimizer.state_dict())
            return True
        first = model()
        loop.train_epochs(first, x[:3000], y[:3000], None, None, epochs=2, batch_size=128, lr=0.01, on_epoch=keep)
        again = model(); again.load_state_dict(saved["weights"])
        loop.train_epochs(again, x[:3000], y[:3000], None, None, epochs=2, start_epoch=1, batch_size=128, lr=0.01,
                          optimizer_state=saved["opt"])
        assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values()))
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "lakeray", "pyarrow", "pandas"))
        assert not heavy, heavy
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
