"""What the swag plugin's tests share: small digits jobs and real SGD snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flcore_swag.collect import sgd_snapshots
from torch.utils.data import TensorDataset

from examples.digits import MLP, Task
from flcore import Job

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_JOB = ROOT / "examples" / "digits" / "swag.toml"


def swag_job(
    chain: Sequence[str] = ("swag",), swag: dict[str, Any] | None = None, **sections: Any
) -> Job:
    """A digits job (0-4) small enough for a unit test: 3 clients, 2 rounds, a narrow MLP, and
    a short SWAG round (4 epochs, rank 4, 8 samples)."""
    data: dict[str, Any] = {
        "job": {"name": "swag-test", "task": "examples.digits", "rounds": 2, "clients": 3},
        "task": {"hidden": 16, "classes": [0, 1, 2, 3, 4]},
        "trainer": {"model_test_after_each_round": False},
        "local": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        "plugins": {"chain": list(chain)},
    }
    if "swag" in chain:
        data["plugins"]["swag"] = {"epochs": 4, "rank": 4, "samples": 8, **(swag or {})}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Job.from_dict(data, source="swag-test.toml")


def digits_shards(count: int, classes: Sequence[int] = (0, 1, 2, 3, 4)) -> list[TensorDataset]:
    """``count`` IID shards of the digits training data."""
    task = Task(classes=list(classes))
    return [task.client_data(i, count) for i in range(count)]


def snapshots(
    data: TensorDataset,
    model: torch.nn.Module | None = None,
    *,
    steps: int = 24,
    every: int = 2,
    seed: int = 0,
    lr: float = 0.05,
) -> list[dict[str, torch.Tensor]]:
    """Real constant-rate SGD snapshots of ``model`` (default: a small digits MLP) on ``data``."""
    torch.manual_seed(seed)
    model = model if model is not None else MLP(hidden=8)
    taken = sgd_snapshots(
        model,
        data,
        torch.nn.functional.cross_entropy,
        lr=lr,
        momentum=0.9,
        weight_decay=0.0,
        batch_size=32,
        steps=steps,
        snapshot_every=every,
        generator=torch.Generator().manual_seed(seed),
    )
    return [{n: p.detach().clone() for n, p in params.items()} for params in taken]


def flat(snapshot: dict[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    """One snapshot as a float64 vector, in ``names``' order."""
    return np.concatenate([snapshot[n].to(torch.float64).numpy().ravel() for n in names])


def flat_columns(dev: dict[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    """Deviation columns ``(K, *shape)`` by name as one ``d x K`` float64 matrix."""
    return np.concatenate(
        [dev[n].to(torch.float64).reshape(dev[n].shape[0], -1).numpy() for n in names], axis=1
    ).T
