"""The core's loss choice: the task's own loss, else one that fits the targets' dtype."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from flcore.defaults.evaluation import loss_function


class Pairs(Dataset):
    """A dataset that is no TensorDataset: its targets are only seen in a batch."""

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return torch.zeros(2), self.targets[i]


def test_the_targets_dtype_picks_the_loss_for_every_kind_of_dataset() -> None:
    labels, values = torch.arange(4), torch.linspace(0, 1, 4)
    no_loss = SimpleNamespace(loss=None)
    for targets, expected in ((labels, F.cross_entropy), (values, F.mse_loss)):
        tensors = TensorDataset(torch.zeros(4, 2), targets)
        for data in (tensors, Subset(tensors, [2, 0]), Pairs(targets)):
            assert loss_function(no_loss, data) is expected, (targets.dtype, type(data))
            assert loss_function(None, data) is expected


def test_a_task_s_own_loss_wins() -> None:
    own = SimpleNamespace(loss=F.l1_loss)
    assert loss_function(own, TensorDataset(torch.zeros(2, 1), torch.arange(2))) is F.l1_loss


def test_nothing_to_evaluate_gives_no_metrics_and_reads_nothing() -> None:
    from flcore.defaults.evaluation import evaluate

    class Untouchable(Pairs):
        def __getitem__(self, i: int):
            raise AssertionError("an empty split was read")

    model = torch.nn.Linear(2, 3)
    ctx = SimpleNamespace(task=SimpleNamespace(loss=None))
    assert evaluate(ctx, model, Untouchable(torch.arange(0))) == {}
    assert evaluate(ctx, model, TensorDataset(torch.zeros(0, 2), torch.zeros(0))) == {}
    metrics = evaluate(ctx, model, TensorDataset(torch.zeros(4, 2), torch.arange(4) % 3))
    assert set(metrics) == {"loss", "accuracy"}
