"""The digits task, except that the client whose index ``FLCORE_TEST_CRASH`` names dies with
SIGKILL on its first read of an example once it has read every example. Its round-1 training
request reads each one (its validation split in the first evaluation, the rest in the one
epoch of training, the request's last read), so the kill lands after its round-1
contribution is sent and before it can answer anything else: the test of round 1's model,
or round 2. It lands there whatever the machine's speed, which a kill sent by the test once
round 1 is committed cannot promise."""

from __future__ import annotations

import os
import signal
from typing import Any

import attrs
from torch.utils.data import Dataset, TensorDataset

from examples import digits


class CrashingData(Dataset[Any]):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data
        self.seen: set[int] = set()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        if len(self.seen) == len(self.data):
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a power cut would
        self.seen.add(i)
        return self.data[i]


@attrs.frozen
class Task(digits.Task):
    def client_data(self, client_id: int, num_clients: int) -> Any:
        data = super().client_data(client_id, num_clients)
        crash = os.environ.get("FLCORE_TEST_CRASH") == str(client_id)
        return CrashingData(data) if crash else data
