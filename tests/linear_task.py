"""A one-weight task whose updates can be computed by hand: ``y = w * x`` with ``w = 1`` at
the start, one example ``x = 1, y = 0`` per client, and the squared error as its loss, so a
plain SGD step with rate ``lr`` maps ``w`` to ``w - lr * 2w``."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def model() -> torch.nn.Module:
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    return layer


def client_data(client_id: int, num_clients: int) -> TensorDataset:
    return TensorDataset(torch.ones(1, 1), torch.zeros(1, 1))


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).sum()
