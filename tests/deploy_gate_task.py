"""The digits task, except that with ``FLCORE_TEST_GATE`` set to a folder, each client stops
at a gate once it has read every example: its round-1 training request reads each one, so it
waits inside its next request (the test of round 1's model, or round 2). There it writes
``waiting-ID`` and reads nothing more until the test creates ``open``, so a test can act
while the run is in the middle of a request, whatever the machine's speed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import attrs
from torch.utils.data import Dataset, TensorDataset

from examples import digits


class GatedData(Dataset[Any]):
    def __init__(self, data: TensorDataset, gate: Path, client_id: int) -> None:
        self.data = data
        self.gate = gate
        self.client_id = client_id
        self.seen: set[int] = set()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        if len(self.seen) == len(self.data) and not (self.gate / "open").exists():
            (self.gate / f"waiting-{self.client_id}").touch()
            while not (self.gate / "open").exists():
                time.sleep(0.02)
        self.seen.add(i)
        return self.data[i]


@attrs.frozen
class Task(digits.Task):
    def client_data(self, client_id: int, num_clients: int) -> Any:
        data = super().client_data(client_id, num_clients)
        gate = os.environ.get("FLCORE_TEST_GATE")
        return GatedData(data, Path(gate), client_id) if gate else data
