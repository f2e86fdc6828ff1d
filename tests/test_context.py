from __future__ import annotations

import pytest

from flcore.chain import Chain
from flcore.context import ClientContext, ServerContext
from flcore.errors import FLCoreError
from flcore.logging import make_logger
from flcore.markers import hookimpl
from tests.conftest import small_job


class Listens:
    @hookimpl
    def receive_model(self, ctx: object, weights: object) -> None: ...


def test_handles_says_whether_a_plugin_in_the_chain_implements_a_hook() -> None:
    job = small_job()
    listening = ServerContext(
        job=job, task=None, chain=Chain([("l", Listens())]), log=make_logger()
    )  # type: ignore[arg-type]
    bare = ServerContext(job=job, task=None, chain=Chain([]), log=make_logger())  # type: ignore[arg-type]
    assert listening.handles("receive_model")
    assert not bare.handles("receive_model")
    assert bare.handles("local_train")  # the core's defaults are plugins too


def test_a_plugin_learns_its_name_and_settings_without_the_plugin_manager() -> None:
    plugin = Listens()
    chain = Chain([("listener", plugin)], settings={"listener": {"k": 1}})
    ctx = ServerContext(job=small_job(), task=None, chain=chain, log=make_logger())  # type: ignore[arg-type]
    assert ctx.name_of(plugin) == "listener"
    assert ctx.name_of(Listens()) is None
    assert ctx.settings("listener") == {"k": 1}


def test_the_sides_say_where_they_are() -> None:
    job = small_job()
    server = ServerContext(job=job, task=None, chain=Chain([]), log=make_logger())  # type: ignore[arg-type]
    client = ClientContext(job=job, task=None, chain=Chain([]), log=make_logger(), client_id="c")  # type: ignore[arg-type]
    assert (server.side, client.side) == ("server", "client")


def test_a_context_without_a_training_or_client_says_so() -> None:
    job = small_job()
    server = ServerContext(job=job, task=None, chain=Chain([]), log=make_logger())  # type: ignore[arg-type]
    with pytest.raises(FLCoreError, match="no running training"):
        server.validate_on_clients({})
    client = ClientContext(job=job, task=None, chain=Chain([]), log=make_logger())  # type: ignore[arg-type]
    with pytest.raises(FLCoreError, match="belongs to no client"):
        client.receive(b"", "a model")
