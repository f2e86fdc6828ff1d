"""The runtime seam's helper for clients that live in other processes."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from flcore import hookimpl
from flcore.chain import Chain
from flcore.context import FLContext
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


def context(chain: list[str], extra: dict[str, Any]) -> FLContext:
    job = small_job(chain, **{"plugins.server_only": {}} if "server_only" in chain else {})
    return FLContext(job=job, task=None, chain=Chain.for_job(job, extra), log=make_logger())  # type: ignore[arg-type]


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
