"""A user's own torch module: a small sequence model over each customer's recent activity.

``jobs/training/fraud_sequence.yaml`` names it as ``module: sequence_model:CustomerSequenceModel``:
lakeray finds this file next to the spec (or any importable module) and calls
``CustomerSequenceModel(num_features, categorical_cardinalities, feature_names=[...], **model.params)``.
The contract is the one in ``lakeray.training.torch_models``: ``forward(x)`` takes the encoded float32
feature matrix (missing values NaN) and returns one logit per row; ``set_feature_stats(mean, std)``,
when defined, receives the training rows' per-column statistics before training.

What the "sequence" is, honestly: the demo's training set has one row per transaction, and a
customer's history reaches it as point-in-time aggregates over trailing windows (1, 7 and 30 days),
not as the raw list of past transactions. This model reads those windows as a short sequence, oldest
horizon first (30d → 7d → 1d), so the GRU's last state is the most recent behaviour seen in the
light of the longer past, and every other feature (the transaction itself: amount, channel, hour, ...)
goes through an MLP. The demo's windows do not carry the same aggregates (1d has only a count; 7d a
count and a sum; 30d a count, mean and max), so each step is a padded vector with a mask saying which
slots are real. A training set with the same aggregates at every horizon, or the last N transactions
per customer as columns, fits the idea better: the step lists in ``model.params.sequence`` say which
columns make each step, so such a table needs no code change here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lakeray.training.torch_models import TabularMLP

__all__ = ["CustomerSequenceModel"]

DEMO_SEQUENCE = [
    ["cust_txn_count_30d", "cust_amount_avg_30d", "cust_amount_max_30d"],
    ["cust_txn_count_7d", "cust_amount_sum_7d"],
    ["cust_txn_count_1d"],
]


class CustomerSequenceModel(nn.Module):
    """GRU over per-window vectors + MLP over the other features → one logit.

    Args:
        num_features, categorical_cardinalities: lakeray's factory arguments.
        feature_names: the plan's feature columns, in the order of the input matrix.
        sequence: one list of column names per step, oldest horizon first (default: the demo's windows).
        gru_hidden: the GRU's state size.
        context_hidden, context_out: the MLP over the non-sequence features.
        dropout: in the context MLP and before the head.
    """

    def __init__(self, num_features: int, categorical_cardinalities: dict[int, int] | None = None, *,
                 feature_names: Sequence[str], sequence: Sequence[Sequence[str]] = tuple(DEMO_SEQUENCE),
                 gru_hidden: int = 16, context_hidden: Sequence[int] = (64,), context_out: int = 32,
                 dropout: float = 0.1):
        super().__init__()
        names = list(feature_names)
        if len(names) != num_features:
            raise ValueError(f"{len(names)} feature names for {num_features} features")
        steps = [list(step) for step in sequence]
        if not steps or not all(steps):
            raise ValueError("sequence needs at least one step, each naming at least one column")
        missing = sorted({c for step in steps for c in step} - set(names))
        if missing:
            raise ValueError(f"sequence columns {missing} are not features of the training set")
        cards = {int(k): int(v) for k, v in (categorical_cardinalities or {}).items()}
        in_sequence = {names.index(c) for step in steps for c in step}
        if in_sequence & set(cards):
            raise ValueError("sequence columns must be numeric")
        width = max(len(step) for step in steps)
        # index[s, k]: the column of slot k of step s; padded slots point at column 0 and are masked out.
        index = [[names.index(c) for c in step] + [0] * (width - len(step)) for step in steps]
        real = [[1.0] * len(step) + [0.0] * (width - len(step)) for step in steps]
        self.register_buffer("step_index", torch.tensor(index, dtype=torch.long))
        self.register_buffer("slot_real", torch.tensor(real))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        context = [j for j in range(num_features) if j not in in_sequence]
        self.register_buffer("context_index", torch.tensor(context, dtype=torch.long))
        # The GRU sees, per step: the standardised values, which slots hold a value, and the step's position.
        self.gru = nn.GRU(input_size=2 * width + len(steps), hidden_size=gru_hidden, batch_first=True)
        self.register_buffer("position", torch.eye(len(steps)))
        self.context = None
        if context:
            context_cards = {context.index(j): n for j, n in cards.items()}
            self.context = TabularMLP(len(context), context_cards, hidden=context_hidden, dropout=dropout,
                                      out_features=context_out)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(gru_hidden + (context_out if context else 0), 1))

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))
        if self.context is not None:
            idx = self.context_index.cpu()
            self.context.set_feature_stats(self.mean[idx], self.std[idx])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        steps, width = self.step_index.shape
        values = x[:, self.step_index.reshape(-1)].reshape(rows, steps, width)
        mean = self.mean[self.step_index]
        std = self.std[self.step_index]
        present = (~torch.isnan(values)).to(values.dtype) * self.slot_real
        scaled = torch.nan_to_num((values - mean) / std) * present
        position = self.position.expand(rows, steps, steps)
        _, state = self.gru(torch.cat([scaled, present, position], dim=2))
        parts = [state[-1]]
        if self.context is not None:
            parts.append(self.context(x.index_select(1, self.context_index)))
        return self.head(torch.cat(parts, dim=1)).squeeze(-1)
