"""A task whose model is above 100 MB (a trained layer and a large random buffer): what the
deployment tests send across in both directions."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

#: float32 elements of the buffer: 27 M x 4 bytes = 108 MB.
BALLAST = 27_000_000


class Big(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.register_buffer("ballast", torch.rand(BALLAST))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Task:
    def model(self) -> torch.nn.Module:
        return Big()

    def client_data(self, client_id: int, num_clients: int) -> TensorDataset:
        g = torch.Generator().manual_seed(client_id)
        return TensorDataset(
            torch.randn(20, 4, generator=g), torch.randint(0, 2, (20,), generator=g)
        )
