"""Tasks only the benchmarks use: a wide model for the memory case."""

from __future__ import annotations

import attrs
import torch
from torch.utils.data import TensorDataset


@attrs.frozen
class Wide:
    """A single linear layer of ``inputs * outputs`` weights (10 M by default), one sample
    per client: the round's cost is moving the model, not training it."""

    inputs: int = 1000
    outputs: int = 10_000

    def model(self) -> torch.nn.Module:
        return torch.nn.Linear(self.inputs, self.outputs, bias=False)

    def client_data(self, client_id: int, num_clients: int) -> TensorDataset:
        gen = torch.Generator().manual_seed(client_id)
        x = torch.randn(1, self.inputs, generator=gen)
        return TensorDataset(x, torch.randint(0, self.outputs, (1,), generator=gen))
