"""The digits task, with one client that stalls while a marker file exists (a test creates
the file to hold that client's actor busy, then kills the actor in the middle of a round),
or with no data at all (actors cannot start)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
from torch.utils.data import Dataset

from examples.digits import Task as Digits


class Stalling(Dataset[Any]):
    """``inner``, except that reading an item waits while ``marker`` exists (at most 2 min)."""

    def __init__(self, inner: Any, marker: Path) -> None:
        self.inner, self.marker = inner, marker

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Any:
        deadline = time.monotonic() + 120
        while self.marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.inner[index]


@attrs.frozen
class Task(Digits):
    stall_client: int = -1
    stall_marker: str = ""
    #: Fail to load any client's data: the server never loads it, so only actors fail.
    broken_data: bool = False

    def client_data(self, client_id: int, num_clients: int) -> Any:
        if self.broken_data:
            raise RuntimeError(f"no data for client {client_id}")
        data = super().client_data(client_id, num_clients)
        if client_id == self.stall_client:
            return Stalling(data, Path(self.stall_marker))
        return data
