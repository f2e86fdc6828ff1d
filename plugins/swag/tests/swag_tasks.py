"""Digits tasks with models that test what the MLP cannot: BatchNorm, and parameters whose
names do not sort in registration order."""

from __future__ import annotations

import attrs
import torch

from examples.digits import Task


class BatchNormMLP(torch.nn.Module):
    """One BatchNorm layer, so that its statistics over the union of the clients' data are
    well defined whatever the batches."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(64, hidden)
        self.norm = torch.nn.BatchNorm1d(hidden)
        self.out = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x))))


class Scrambled(torch.nn.Module):
    """Registration order zeta, alpha, layer10, layer2, m; sorted order is the reverse-ish:
    a posterior mapped by position instead of name would load the wrong tensors."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.zeta = torch.nn.Linear(64, hidden)
        self.alpha = torch.nn.Linear(hidden, hidden)
        self.layer10 = torch.nn.Linear(hidden, hidden, bias=False)
        self.layer2 = torch.nn.Linear(hidden, 10)
        self.m = torch.nn.Parameter(torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.zeta(x))
        h = torch.relu(self.alpha(h)) + self.layer10(h)
        return self.layer2(h) * self.m


@attrs.frozen
class BatchNormDigits(Task):
    def model(self) -> torch.nn.Module:
        return BatchNormMLP(self.hidden)


@attrs.frozen
class ScrambledDigits(Task):
    def model(self) -> torch.nn.Module:
        return Scrambled(self.hidden)
