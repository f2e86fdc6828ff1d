"""The embedded runtime builds a client on its first request: a huge federation starts at
once, and a round builds only its cohort."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.data import TensorDataset

from flcore.job import Job
from flcore.logging import make_logger
from flcore.options import MAX_CLIENTS
from flcore.run import run_job
from flcore.runtime.embedded import EmbeddedRuntime
from flcore.task import load_task

#: The data indices whose split was loaded, in order (the task below records them).
LOADED: list[int] = []


class CountingTask:
    """``tests/linear_task``'s one weight, with a record of every ``client_data`` call."""

    def model(self) -> torch.nn.Module:
        return torch.nn.Linear(1, 1, bias=False)

    def client_data(self, client_id: int, num_clients: int) -> TensorDataset:
        LOADED.append(client_id)
        return TensorDataset(torch.ones(4, 1) * client_id, torch.zeros(4, 1))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((outputs - targets) ** 2).sum()


def counting_job(clients: int, **job: Any) -> Job:
    return Job.from_dict(
        {
            "job": {"task": f"{__name__}:CountingTask", "clients": clients, **job},
            "trainer": {"model_test_after_each_round": False},
            "local": {"validation_split": 0.25},
        },
        source="counting.toml",
    )


def test_a_million_clients_start_at_once_and_none_is_built() -> None:
    LOADED.clear()
    job = counting_job(MAX_CLIENTS)
    ctx = SimpleNamespace(
        job=job,
        task=load_task(job),
        _chain=SimpleNamespace(fresh=lambda: None),
        run_dir=None,
        log=make_logger(None, console_level="critical"),
    )
    runtime = EmbeddedRuntime()
    names = runtime.start(ctx)  # type: ignore[arg-type]
    assert len(names) == MAX_CLIENTS and names[-1] == f"client-{MAX_CLIENTS - 1}"
    assert LOADED == [] and runtime.clients == {}

    last = runtime.client(ctx, names[-1])  # type: ignore[arg-type]
    assert runtime.client(ctx, names[-1]) is last  # built once
    assert LOADED == [MAX_CLIENTS - 1] and last.index == MAX_CLIENTS - 1
    assert last.name == names[-1] and len(last.train_data) == 3 and len(last.val_data) == 1
    runtime.stop(ctx)  # type: ignore[arg-type]


def test_a_round_builds_only_the_clients_of_its_cohort(tmp_path: Path) -> None:
    LOADED.clear()
    result = run_job(counting_job(50, rounds=3, clients_per_round=2), out=tmp_path / "run")
    cohorts = [
        json.loads(line)["cohort"]
        for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    sampled = {int(name.split("-")[1]) for cohort in cohorts for name in cohort}
    assert len(cohorts) == 3 and 2 <= len(sampled) <= 6
    assert sorted(LOADED) == sorted(sampled)  # each sampled client loaded its data once


def test_lazily_built_clients_train_as_eagerly_built_ones(tmp_path: Path) -> None:
    """Each client built as it is first asked, between other clients' training, gives the
    bytes of the pool runtime, whose workers build all their clients up front."""
    lazy = run_job(counting_job(4, rounds=2, seed=3), out=tmp_path / "embedded")
    eager = run_job(counting_job(4, rounds=2, seed=3, workers=2), out=tmp_path / "pool")
    assert lazy.global_model_path.read_bytes() == eager.global_model_path.read_bytes()
