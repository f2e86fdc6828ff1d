"""The floor: a bare torch loop doing exactly the work a federated job does.

Same model and initialisation, same client partitions, same per-client seeds and batch
orders, same local SGD steps, the same sample-weighted mean (float64 accumulation) — and
nothing else: no serialization, no events, no validation, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flcore.client import client_name
from flcore.data import derive_seed, seed_torch


def bare_fedavg(
    task: Any,
    clients: int,
    rounds: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    indices: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The job's final weights. ``indices`` trains only those of the ``clients`` (a share of
    the work, for measuring what running shares side by side costs)."""
    seed_torch(seed)
    model = task.model()
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shares = range(clients) if indices is None else indices
    data = [(i, task.client_data(i, clients).tensors) for i in shares]
    for round_ in range(1, rounds + 1):
        sums: dict[str, torch.Tensor] = {}
        total = 0
        for index, (x, y) in data:
            model.load_state_dict(global_weights)
            client_seed = derive_seed(seed, "train", round_, client_name(index))
            seed_torch(client_seed)
            generator = torch.Generator().manual_seed(client_seed)
            optimizer = torch.optim.SGD(model.parameters(), lr=lr)
            model.train()
            for _ in range(epochs):
                order = torch.randperm(len(y), generator=generator)
                for start in range(0, len(y), batch_size):
                    idx = order[start : start + batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                    optimizer.step()
            n = len(y)
            for name, tensor in model.state_dict().items():
                if name in sums:
                    sums[name].add_(tensor, alpha=n)
                else:
                    sums[name] = tensor.to(torch.float64, copy=True).mul_(n)
            total += n
        global_weights = {k: (v / total).to(global_weights[k].dtype) for k, v in sums.items()}
    return global_weights
