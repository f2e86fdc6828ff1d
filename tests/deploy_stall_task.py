"""A task whose client stalls in the middle of a round, its heartbeats still going: the client
whose index ``FLCORE_TEST_STALL`` names sleeps on its first data item."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch.utils.data import Dataset


class StallingData(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, stall: bool) -> None:
        self.x, self.y, self.stall = x, y, stall

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        if self.stall:
            time.sleep(3600)  # stuck, as a client on a hung disk or GPU would be
        return self.x[i], self.y[i]


class Task:
    def model(self) -> torch.nn.Module:
        return torch.nn.Linear(4, 2)

    def client_data(self, client_id: int, num_clients: int) -> StallingData:
        g = torch.Generator().manual_seed(client_id)
        x, y = torch.randn(20, 4, generator=g), torch.randint(0, 2, (20,), generator=g)
        return StallingData(x, y, os.environ.get("FLCORE_TEST_STALL") == str(client_id))
