"""The tabular model lakeray ships for ``model.kind: torch`` (``lakeray.training.torch_models:TabularMLP``).

A torch model factory is called as ``Factory(num_features, categorical_cardinalities, **model.params)``
(plus ``feature_names=[...]`` when its signature has that parameter) and returns an ``nn.Module`` whose
``forward(x)`` takes the encoded float32 feature matrix (``training.data.encode``: numbers as they
are, categories as codes, missing as NaN) and returns one logit per row. A module that defines
``set_feature_stats(mean, std)`` gets the per-column mean and standard deviation of the training rows
(all workers' rows, NaN skipped) before training; keep them in buffers so they travel in the state dict.

Imports torch only (it runs on workers and, through ``load_torch``, on the driver).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["TabularMLP", "embedding_dim"]


def embedding_dim(cardinality: int) -> int:
    """A common rule of thumb (fast.ai's, capped): grows slowly with the vocabulary, at most 16."""
    return int(min(16, round(1.6 * (cardinality + 1) ** 0.56)))


class TabularMLP(nn.Module):
    """An MLP over numeric columns (standardised, NaN → 0 plus a missing flag) and categorical codes
    (one embedding per column; NaN or an unseen code → an extra "missing" index).

    Args:
        num_features: columns of the input matrix.
        categorical_cardinalities: column index → vocabulary size (codes ``0 … size-1``).
        hidden: widths of the hidden layers.
        dropout: dropout after each hidden layer.
        missing_indicators: one 0/1 input per numeric column telling that it was NaN (the demo's
            ``cust_amount_avg_30d`` is NaN for a customer's first transaction: that is information).
        out_features: 1 for a classifier's logit; more to use the MLP as an encoder inside a larger
            module (jobs/training/sequence_model.py does).
    """

    def __init__(self, num_features: int, categorical_cardinalities: dict[int, int] | None = None,
                 hidden: Sequence[int] = (128, 64), dropout: float = 0.1, missing_indicators: bool = True,
                 out_features: int = 1):
        super().__init__()
        cards = {int(k): int(v) for k, v in (categorical_cardinalities or {}).items()}
        bad = [k for k in cards if not 0 <= k < num_features]
        if bad:
            raise ValueError(f"categorical column index(es) {bad} outside 0..{num_features - 1}")
        numeric = [j for j in range(num_features) if j not in cards]
        categorical = sorted(cards)
        self.num_features = num_features
        self.missing_indicators = bool(missing_indicators)
        self.out_features = out_features
        self.register_buffer("numeric_index", torch.tensor(numeric, dtype=torch.long))
        self.register_buffer("categorical_index", torch.tensor(categorical, dtype=torch.long))
        self.register_buffer("cardinality", torch.tensor([cards[j] for j in categorical], dtype=torch.long))
        self.register_buffer("mean", torch.zeros(len(numeric)))
        self.register_buffer("std", torch.ones(len(numeric)))
        # index ``cardinality`` is "missing" (NaN or a code the vocabulary did not have)
        self.embeddings = nn.ModuleList(nn.Embedding(cards[j] + 1, embedding_dim(cards[j])) for j in categorical)
        width = len(numeric) * (2 if self.missing_indicators else 1) + sum(e.embedding_dim for e in self.embeddings)
        if width == 0:
            raise ValueError("TabularMLP needs at least one feature column")
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, int(size)), nn.ReLU(), nn.Dropout(dropout)]
            width = int(size)
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-column statistics of all input columns (the numeric ones are kept)."""
        idx = self.numeric_index.cpu()
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32)[idx])
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32)[idx])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        if len(self.numeric_index):
            numbers = x.index_select(1, self.numeric_index)
            missing = torch.isnan(numbers)
            scaled = torch.where(missing, torch.zeros_like(numbers), (numbers - self.mean) / self.std)
            parts.append(scaled)
            if self.missing_indicators:
                parts.append(missing.to(scaled.dtype))
        if len(self.embeddings):
            codes = x.index_select(1, self.categorical_index)
            limit = self.cardinality.to(codes.dtype)
            unseen = torch.isnan(codes) | (codes < 0) | (codes >= limit)
            codes = torch.where(unseen, limit.expand_as(codes), codes).long()
            parts += [emb(codes[:, j]) for j, emb in enumerate(self.embeddings)]
        out = self.net(torch.cat(parts, dim=1))
        return out.squeeze(-1) if self.out_features == 1 else out
