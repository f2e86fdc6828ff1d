"""The core's ``evaluate`` (loss and accuracy, or loss for regression) and ``predict``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flcore.markers import hookimpl

if TYPE_CHECKING:
    import torch

EVAL_BATCH = 1024


def is_classification(targets: torch.Tensor) -> bool:
    return not targets.is_floating_point()


def loss_function(task: Any, data: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The task's ``loss``, else cross-entropy for integer targets and MSE for float ones."""
    import torch.nn.functional as F
    from torch.utils.data import Subset, TensorDataset

    from flcore.data import batches

    if task is not None and task.loss is not None:
        return task.loss
    base = data.dataset if isinstance(data, Subset) else data
    if isinstance(base, TensorDataset) and len(base.tensors) == 2:
        targets = base.tensors[1]  # only its dtype counts: no batch needs to be made
    else:
        _, targets = next(iter(batches(data, 1)))
    return F.cross_entropy if is_classification(targets) else F.mse_loss


@hookimpl
def evaluate(ctx: Any, model: torch.nn.Module, data: Any) -> dict[str, float]:
    if len(data) == 0:  # first: with no validation split, this is every client's every round
        return {}
    import torch

    from flcore.data import as_tensors, batches

    loss_fn = loss_function(getattr(ctx, "task", None), data)
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    with torch.no_grad():
        for inputs, targets in batches(data, EVAL_BATCH, tensors=as_tensors(data)):
            outputs = model(inputs)
            n = len(targets)
            loss_sum += float(loss_fn(outputs, targets)) * n
            total += n
            if is_classification(targets):
                correct += int((outputs.argmax(dim=-1) == targets).sum())
    metrics = {"loss": loss_sum / total}
    if is_classification(targets):
        metrics["accuracy"] = correct / total
    return metrics


@hookimpl
def predict(ctx: Any, model: torch.nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
    import torch

    model.eval()
    with torch.no_grad():
        probabilities = torch.softmax(model(inputs), dim=-1)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1)
    return {
        "prediction": probabilities.argmax(dim=-1),
        "probabilities": probabilities,
        "predictive_entropy": entropy,
        "method": "global model (no posterior)",
    }


def primary_metric(metrics: dict[str, float]) -> float | None:
    """The one number a client reports as ``initial_validation_metric`` (higher is better):
    accuracy when there is one, else the negative loss."""
    if "accuracy" in metrics:
        return metrics["accuracy"]
    if "loss" in metrics:
        return -metrics["loss"]
    return None
