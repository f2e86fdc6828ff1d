"""The runtime seam's helper for clients that live in other processes."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from flcore import hookimpl
from flcore.chain import Chain
from flcore.context import ServerContext
from flcore.errors import JobError
from flcore.logging import make_logger
from flcore.runtime.base import job_for_remote_clients
from tests.conftest import small_job


class ServerOnly:
    @hookimpl
    def end_round(self, ctx: Any) -> None: ...


class ClientSide:
    @hookimpl
    def local_train(self, ctx: Any, model: Any, data: Any) -> None: ...


def context(chain: list[str], extra: dict[str, Any]) -> ServerContext:
    job = small_job(chain, **{"plugins.server_only": {}} if "server_only" in chain else {})
    return ServerContext(job=job, task=None, chain=Chain.for_job(job, extra), log=make_logger())  # type: ignore[arg-type]


def test_plugins_given_in_python_with_server_hooks_only_stay_in_the_server() -> None:
    ctx = context(["server_only"], {"server_only": ServerOnly()})
    text = job_for_remote_clients(ctx, "workers", "worker processes")
    remote = tomllib.loads(text)
    assert remote["plugins"] == {"chain": []}
    assert remote["job"] == dict(ctx.job.raw["job"])


def test_plugins_given_in_python_with_client_hooks_are_refused_naming_the_setting() -> None:
    ctx = context(["client_side"], {"client_side": ClientSide()})
    with pytest.raises(JobError, match=r"\[job\]\.runtime: plugins \['client_side'\] were given"):
        job_for_remote_clients(ctx, "runtime", "Ray actors")


@pytest.mark.parametrize(
    "job",
    [
        {"threads": 1},  # embedded: the clients train in this process, on the job's threads
        # a pool: the server folds on one thread; more would spin on the workers' cores
        {"workers": 2, "threads": 2},
    ],
)
def test_the_server_runs_on_its_runtimes_threads_and_gives_them_back(
    tmp_path: Any, job: dict[str, int]
) -> None:
    import torch

    from flcore.run import run_job

    seen: list[int] = []

    class Threads:
        @hookimpl
        def before_aggregation(self, ctx: Any) -> None:
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        run_job(
            small_job(["threads"], job=job),
            out=tmp_path / "run",
            extra_plugins={"threads": Threads()},
        )
        assert seen == [1, 1]
        assert torch.get_num_threads() == 3  # given back when the runtime stops
    finally:
        torch.set_num_threads(before)


def test_torch_threads_are_held_once_and_given_back_once() -> None:
    import torch

    from flcore.runtime.base import TorchThreads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        held = TorchThreads()
        held.hold(1)
        held.hold(1)  # a second hold keeps the first count to give back
        assert torch.get_num_threads() == 1
        held.release()
        assert torch.get_num_threads() == 2
        torch.set_num_threads(3)
        held.release()  # nothing held: leaves the count alone
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
