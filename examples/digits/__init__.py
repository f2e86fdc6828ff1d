"""scikit-learn's bundled 8x8 digits (offline): an MLP trained over IID or Dirichlet clients.

``task = "examples.digits"`` picks :class:`Task`; the job's ``[task]`` section sets its fields.
scikit-learn is imported with the module, not on first use: worker processes fork from a
process that imported the task, and so start with it loaded.

A fixed, stratified fifth of the data is the server's held-out set; the rest is split
among the clients.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import attrs
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 1234


@cache
def _arrays(classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, held_out_x, held_out_y)`` for the given classes, pixels in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    keep = np.isin(y, classes)
    x, y = (x[keep] / 16.0).astype(np.float32), y[keep].astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return train_x, train_y, test_x, test_y


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal indices into ``num_clients`` near-equal parts."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Per class, split its indices among clients in Dirichlet(alpha) proportions: small alpha,
    skewed label mixes. Every client gets at least one example."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(chunk.tolist())
    for client, part in enumerate(parts):  # no empty client: borrow from the largest
        if not part:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))
            part.append(parts[donor].pop())
            parts[client] = part
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


class MLP(torch.nn.Sequential):
    def __init__(self, hidden: int = 128, classes: int = 10) -> None:
        super().__init__(
            torch.nn.Linear(64, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, classes),
        )


@attrs.frozen
class Task:
    """The digits task; every field is a ``[task]`` setting."""

    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = 0.5
    hidden: int = 128
    classes: list[int] = attrs.field(factory=lambda: list(range(10)))
    partition_seed: int = 0

    def model(self) -> torch.nn.Module:
        return MLP(self.hidden, 10)

    def client_data(self, client_id: int, num_clients: int) -> TensorDataset:
        x, y, _, _ = _arrays(tuple(self.classes))
        if self.partition == "iid":
            parts = iid_partition(len(y), num_clients, self.partition_seed)
        else:
            parts = dirichlet_partition(y, num_clients, self.alpha, self.partition_seed)
        index = parts[client_id]
        return TensorDataset(torch.from_numpy(x[index]), torch.from_numpy(y[index]))

    def server_data(self) -> TensorDataset:
        _, _, x, y = _arrays(tuple(self.classes))
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
