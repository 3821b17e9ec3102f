"""The per-worker PyTorch loop: plain functions over tensors, no Ray and no lakeray imports.

This module imports only ``torch`` and ``numpy`` so that the loop lakeray runs on its workers can be
run, timed and checked as it is on a machine that has nothing else (the lent GPU machine has torch,
pyarrow and numpy, no Ray). ``torch_trainer`` wires it to Ray (data, checkpoints, DDP); the benchmark
compares it with a hand-written loop.

What the loop guarantees:

- **Deterministic.** Epoch ``e`` shuffles with ``seed + e`` (and the rank) and reseeds torch's
  generator (dropout) the same way, so a run resumed from the checkpoint after epoch ``k`` trains
  epochs ``k+1…`` exactly as the uninterrupted run did (bit for bit on CPU; cuBLAS may differ on GPU).
- **Mixed precision on CUDA only**: the forward pass runs under ``torch.autocast(bfloat16)`` (bf16 has
  float32's range, so no loss scaling); CPU trains in float32 (CPU autocast is slower there).
- **Even steps under DDP.** Ranks may hold different row counts; DDP hangs if one rank takes a step the
  others do not. Every rank takes the largest rank's number of steps per epoch; a rank with fewer
  rows continues through a second pass of its own permutation to fill them (documented trade-off: a
  few of its rows are seen twice in that epoch, instead of dropping rows of the larger ranks).
- **Exact validation metrics under DDP.** Each rank scores its own validation rows; the scores and
  labels are gathered to every rank (8 bytes a row), so AUC/logloss are those of the whole validation
  split, identical on every rank (early stopping decides the same everywhere) and equal to what one
  worker computes on the same rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["device_for", "train_epochs", "predict_proba", "binary_metrics", "feature_stats", "seed_everything",
           "EpochResult", "clone_state", "all_reduce"]

# Rows scored per forward pass at validation / prediction time (memory, not speed).
_PREDICT_CHUNK = 65_536


def device_for(use_gpu: bool, local_rank: int = 0) -> torch.device:
    """The device a worker trains on: ``cuda:<local_rank mod visible GPUs>`` when asked for a GPU, else CPU.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the worker's GPU(s), so one visible GPU is ``cuda:0``; when
    several workers on a node see all GPUs, each takes the one of its local rank. Asking for a GPU where
    CUDA has none is an error, not a silent CPU run (the spec said ``use_gpu: true`` or auto found GPUs).
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu is set but torch sees no CUDA device (CUDA_VISIBLE_DEVICES="
                           "empty, a CPU-only torch build, or no driver)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _collective_device(device: torch.device) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if _distributed() and torch.distributed.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: np.ndarray, op: str, device: torch.device) -> np.ndarray:
    """``values`` summed (op "sum") or maximised ("max") over the process group; as they are without one."""
    if not _distributed():
        return values
    tensor = torch.as_tensor(values, dtype=torch.float64).to(_collective_device(device))
    torch.distributed.all_reduce(tensor, op={"sum": torch.distributed.ReduceOp.SUM,
                                             "max": torch.distributed.ReduceOp.MAX}[op])
    return tensor.cpu().numpy()


def feature_stats(x: np.ndarray, columns: list[int], device: torch.device = torch.device("cpu"),
                  distributed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``x[:, columns]`` over non-NaN values (float32 arrays).

    With ``distributed``, the sums are all-reduced so every rank gets the statistics of all training
    rows (the same standardisation on every rank and at serving time). An all-NaN or constant column
    gets mean 0 / std 1, which leaves it as it is.
    """
    sub = x[:, columns].astype(np.float64, copy=False) if columns else np.empty((len(x), 0))
    present = ~np.isnan(sub)
    filled = np.where(present, sub, 0.0)
    sums = np.stack([present.sum(axis=0), filled.sum(axis=0), (filled * filled).sum(axis=0)]).astype(np.float64)
    if distributed and _distributed():
        sums = all_reduce(sums, "sum", device)
    count, total, squares = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        var = np.where(count > 1, squares / np.maximum(count, 1) - mean * mean, 1.0)
    std = np.sqrt(np.maximum(var, 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the user's module as ``.module``; state dicts and eval use that one.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray | torch.Tensor, device: torch.device | None = None) -> np.ndarray:
    """P(label = 1) for every row of ``x`` (float32 features), in chunks, in eval mode; float32 numpy."""
    model = _unwrap(model)
    device = device or next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    out = []
    for start in range(0, len(xt), _PREDICT_CHUNK):
        with _autocast(device):
            logits = model(xt[start:start + _PREDICT_CHUNK].to(device, non_blocking=True))
        out.append(torch.sigmoid(logits.float().reshape(-1)).cpu())
    model.train(was_training)
    return (torch.cat(out) if out else torch.empty(0)).numpy()


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int(len(y) - pos.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg_rank = first + (counts + 1) / 2.0  # 1-based average rank of each distinct score
    ranks = np.empty(len(score), dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve, as scikit-learn's average_precision_score (step-wise)."""
    n_pos = int((y == 1).sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    y_sorted, s_sorted = y[order], score[order]
    last_of_tie = np.r_[np.diff(s_sorted) != 0, True]
    tp = np.cumsum(y_sorted == 1)[last_of_tie]
    seen = np.arange(1, len(y) + 1)[last_of_tie]
    precision = tp / seen
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(precision * recall_step))


def binary_metrics(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """auc, aucpr, logloss and error (threshold 0.5) of probabilities ``score`` against 0/1 labels ``y``."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if len(y) == 0:
        return {}
    p = np.clip(score, 1e-7, 1 - 1e-7)
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return {"auc": _auc(y, score), "aucpr": _average_precision(y, score), "logloss": logloss,
            "error": float(np.mean((score >= 0.5) != (y == 1)))}


def _gather(array: np.ndarray) -> np.ndarray:
    if not _distributed():
        return array
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, array)
    return np.concatenate(parts)


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


class EpochResult(dict):
    """What ``train_epochs`` returns: ``epochs`` (last epoch trained), ``train_s`` (loop seconds),
    ``stopped_early`` and the last epoch's ``metrics``."""


def train_epochs(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                 x_valid: np.ndarray | torch.Tensor | None, y_valid: np.ndarray | torch.Tensor | None, *,
                 epochs: int, start_epoch: int = 0, batch_size: int = 1024, lr: float = 1e-3,
                 device: torch.device | str = "cpu", seed: int = 7, weight_decay: float = 0.01,
                 optimizer_state: dict[str, Any] | None = None,
                 on_epoch: Callable[[int, dict[str, float], nn.Module, torch.optim.Optimizer], bool | None] | None = None,
                 distributed: bool = False) -> EpochResult:
    """Train ``model`` (a logit-returning module, possibly DDP-wrapped) for epochs ``start_epoch+1 … epochs``.

    ``x``/``y``: this worker's training rows (float32; labels 0/1). AdamW with ``lr``; binary cross
    entropy on logits. After each epoch the validation rows are scored and
    ``on_epoch(epoch, metrics, module, optimizer)`` is called with the unwrapped module; it may save a
    checkpoint, and returns True to stop (early stopping). ``metrics`` holds ``train_loss``, ``valid_auc``,
    ``valid_aucpr``, ``valid_logloss``, ``valid_error`` and ``epoch_s`` (training steps only).
    ``distributed``: a torch.distributed process group is up and the model is DDP-wrapped; step
    counts are evened out and validation scores gathered (module docstring).
    """
    device = torch.device(device)
    distributed = distributed and _distributed()
    module = _unwrap(model)
    module.to(device)
    model.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    loss_fn = nn.BCEWithLogitsLoss()
    on_gpu = device.type == "cuda"
    # Keep the rows where they are (pinned host memory on GPU, for async copies of each batch).
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32).reshape(-1)
    if on_gpu:
        xt, yt = xt.pin_memory(), yt.pin_memory()
    n = len(xt)
    local_steps = -(-n // batch_size)
    steps = int(all_reduce(np.array([local_steps], dtype=np.float64), "max", device)[0]) if distributed \
        else local_steps
    rank = _rank()
    result = EpochResult(epochs=start_epoch, train_s=0.0, stopped_early=False, metrics={})
    loop_started = time.perf_counter()
    for epoch in range(start_epoch + 1, epochs + 1):
        epoch_started = time.perf_counter()
        # Seeds depend on the epoch only (and the rank): resuming after epoch k replays epoch k+1 exactly.
        torch.manual_seed(seed * 1_000_003 + epoch * 7919 + rank)
        order = torch.from_numpy(np.random.default_rng([seed, epoch, rank]).permutation(n))
        if steps * batch_size > n:  # a rank with fewer rows: wrap around its own permutation
            order = order.repeat(-(-steps * batch_size // max(n, 1)))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            if len(idx) == 0:
                break
            xb = xt.index_select(0, idx).to(device, non_blocking=True)
            yb = yt.index_select(0, idx).to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device):
                logits = model(xb).reshape(-1)
            loss = loss_fn(logits.float(), yb)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double()
        if on_gpu:
            torch.cuda.synchronize(device)
        epoch_s = time.perf_counter() - epoch_started
        metrics: dict[str, float] = {"train_loss": float(loss_sum.item() / max(steps, 1)), "epoch_s": epoch_s}
        # Under DDP every rank joins the gather, even one without validation rows.
        if x_valid is not None and y_valid is not None and (distributed or len(x_valid)):
            scores = predict_proba(module, x_valid, device)
            y_all = _gather(np.asarray(y_valid, dtype=np.float32).reshape(-1)) if distributed \
                else np.asarray(y_valid).reshape(-1)
            s_all = _gather(scores) if distributed else scores
            metrics.update({f"valid_{k}": v for k, v in binary_metrics(y_all, s_all).items()})
        if distributed:  # every rank reports the slowest rank's epoch
            metrics["epoch_s"] = float(all_reduce(np.array([epoch_s]), "max", device)[0])
        result.update(epochs=epoch, metrics=metrics)
        stop = bool(on_epoch(epoch, metrics, module, optimizer)) if on_epoch is not None else False
        model.train()
        if stop:
            result["stopped_early"] = True
            break
    result["train_s"] = time.perf_counter() - loop_started
    result["optimizer"] = optimizer
    return result


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the module's state dict (the best epoch's weights under early stopping)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
