"""What the tests' jobs name by import path: small tasks, evaluators, and plugins that fail,
observe or degrade on purpose.

Imported by name (``server_validation_helpers:...``) from job settings, like user code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from flcore import Job, hookimpl, load_tensors

# -- jobs ---------------------------------------------------------------------------


def digits_job(
    rounds: int = 3,
    every: int | None = 1,
    evaluator: str | None = None,
    chain: list[str] | None = None,
    task: str = "examples.digits",
    plugins: dict[str, dict[str, Any]] | None = None,
    **job: Any,
) -> Job:
    """A small, fast digits job (two IID clients, a 32-unit MLP) with server validation."""
    section: dict[str, Any] = {}
    if every is not None:
        section["num_rounds_per_valid"] = every
    if evaluator is not None:
        section["evaluator"] = evaluator
    data: dict[str, Any] = {
        "job": {"name": "sv-test", "task": task, "rounds": rounds, "clients": 2, "seed": 0, **job},
        "trainer": {"skip_model_tests": True},
        "local": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "plugins": {
            "chain": chain if chain is not None else ["server_validation"],
            "server_validation": section,
            **(plugins or {}),
        },
    }
    if task == "examples.digits":
        data["task"] = {"hidden": 32}
    return Job.from_dict(data, source="test-job.toml")


def saved_model(run_dir: Path, round: int, task: Any) -> torch.nn.Module:
    """The global model a run kept for ``round`` (``keep_round_models``), loaded into the task's
    architecture and ready to evaluate."""
    weights, _ = load_tensors(run_dir / "rounds" / f"{round:04d}" / "global_model.safetensors")
    model: torch.nn.Module = task.model()
    model.load_state_dict(weights)
    model.eval()
    return model


# -- tasks ----------------------------------------------------------------------------


def _regression_data(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=generator)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


class NoServerDataTask:
    """A linear regression whose server holds no data: nothing to validate on."""

    def model(self) -> torch.nn.Module:
        return torch.nn.Linear(3, 1)

    def client_data(self, client_id: int, num_clients: int) -> TensorDataset:
        return _regression_data(64, seed=client_id)


class RegressionTask(NoServerDataTask):
    """The same regression with a held-out server set: the core's evaluator reports loss only."""

    def server_data(self) -> TensorDataset:
        return _regression_data(50, seed=99)


class EmptyServerDataTask(NoServerDataTask):
    """A server set with no examples."""

    def server_data(self) -> TensorDataset:
        return TensorDataset(torch.empty(0, 3), torch.empty(0, 1))


# -- evaluators -----------------------------------------------------------------------

#: Every call of :func:`top2_accuracy`: (number of examples, model was in eval mode).
CALLS: list[tuple[int, bool]] = []


def top2_accuracy(model: torch.nn.Module, data: TensorDataset) -> dict[str, Any]:
    """A real evaluator other than the core's: top-2 accuracy and the mean top-1 probability."""
    CALLS.append((len(data), not model.training))
    inputs, targets = data.tensors
    with torch.no_grad():
        probabilities = torch.softmax(model(inputs), dim=-1)
    top2 = probabilities.topk(2, dim=-1).indices
    hit = (top2 == targets.unsqueeze(-1)).any(dim=-1)
    return {
        "top2_accuracy": float(hit.float().mean()),
        "confidence": probabilities.max(dim=-1).values.mean(),  # a 0-d tensor is a number too
    }


def subsampled_accuracy(model: torch.nn.Module, data: TensorDataset) -> dict[str, float]:
    """A random evaluator: accuracy on a random half of the data (reproducible per round)."""
    inputs, targets = data.tensors
    keep = torch.rand(len(targets)) < 0.5
    with torch.no_grad():
        predictions = model(inputs[keep]).argmax(dim=-1)
    return {"accuracy": float((predictions == targets[keep]).float().mean())}


def returns_list(model: torch.nn.Module, data: Any) -> Any:
    return [0.5, 0.7]


def returns_text(model: torch.nn.Module, data: Any) -> Any:
    return {"accuracy": "high"}


def returns_nan(model: torch.nn.Module, data: Any) -> Any:
    return {"loss": float("nan"), "accuracy": 0.5}


def raises(model: torch.nn.Module, data: Any) -> Any:
    raise RuntimeError("the evaluator's disk is full")


def takes_three(model: torch.nn.Module, data: Any, extra: int) -> Any:
    return {}


NOT_CALLABLE = {"accuracy": 1.0}


# -- plugins ----------------------------------------------------------------------------


class PlannedFailure:
    """Raises in ``round`` (only ``times`` times), after recording what the plugins before it
    left in the context; the subclasses say in which event."""

    def __init__(self, round: int, times: int = 1_000) -> None:
        self.round = round
        self.times = times
        self.seen: list[tuple[int, Any]] = []

    def maybe_fail(self, ctx: Any) -> None:
        self.seen.append((ctx.round, ctx.metrics.get("server")))
        if ctx.round == self.round and self.times > 0:
            self.times -= 1
            raise RuntimeError(f"planned failure in round {ctx.round}")


class FailInAfterAggregation(PlannedFailure):
    """Fails in the event server validation writes in: its own ``rollback`` undoes it."""

    @hookimpl
    def after_aggregation(self, ctx: Any) -> None:
        self.maybe_fail(ctx)


class FailInEndRound(PlannedFailure):
    """Fails one event later, in ``end_round``: only the core's restore of the round takes
    the server's metrics back."""

    @hookimpl
    def end_round(self, ctx: Any) -> None:
        self.maybe_fail(ctx)


class Observer:
    """Records, per round, what server validation made available to later plugins."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[Any, Any]] = {}

    @hookimpl
    def after_aggregation(self, ctx: Any) -> None:
        state = ctx.state.get("server_validation")
        self.seen[ctx.round] = (ctx.metrics.get("server"), state and dict(state))


class DegradeAt:
    """Replaces the new global model of the given rounds with noise (before validation sees it):
    a known bad round for model selection to avoid."""

    def __init__(self, rounds: set[int]) -> None:
        self.rounds = rounds

    @hookimpl
    def after_aggregation(self, ctx: Any) -> None:
        if ctx.round in self.rounds:
            generator = torch.Generator().manual_seed(ctx.round)
            ctx.global_model = {
                name: torch.randn(t.shape, generator=generator).to(t.dtype) * 3
                if t.is_floating_point()
                else t
                for name, t in ctx.global_model.items()
            }
