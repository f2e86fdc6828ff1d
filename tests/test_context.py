from __future__ import annotations

import torch

from flcore.chain import Chain
from flcore.context import FLContext
from flcore.logging import make_logger
from tests.conftest import small_job


def test_a_snapshot_restores_round_model_state_and_metrics() -> None:
    chain = Chain([])
    ctx = FLContext(job=small_job(), task=None, chain=chain, log=make_logger())  # type: ignore[arg-type]
    ctx.round = 1
    ctx.global_model = {"w": torch.ones(2)}
    ctx.state["p"] = {"best": 0.5}
    ctx.metrics["x"] = 1
    ctx.take_snapshot()
    ctx.round = 2
    ctx.global_model["w"].add_(5)  # in place: the snapshot holds a copy
    ctx.state["p"]["best"] = 0.9
    ctx.metrics["server"] = {"accuracy": 1.0}
    ctx.client_tests = {"client-0": {"accuracy": 1.0}}
    ctx.restore_snapshot()
    assert ctx.round == 1
    assert torch.equal(ctx.global_model["w"], torch.ones(2))
    assert ctx.state == {"p": {"best": 0.5}} and ctx.metrics == {"x": 1}
    assert ctx.client_tests == {} and ctx.contributions == []


def test_with_a_run_directory_the_model_is_kept_by_reference_and_reread_if_edited(
    tmp_path,
) -> None:
    from flcore import codec

    chain = Chain([])
    ctx = FLContext(job=small_job(), task=None, chain=chain, log=make_logger(), run_dir=tmp_path)  # type: ignore[arg-type]
    ctx.round = 3
    model = {"w": torch.ones(2)}
    ctx.global_model = model
    codec.save_file(tmp_path / "global_model.safetensors", model, {"round": 3})
    snap = ctx.take_snapshot()
    assert snap.global_model["w"] is model["w"]  # no copy
    ctx.global_model = {"w": torch.zeros(2)}  # replaced, as the trainer does
    ctx.restore_snapshot()
    assert ctx.global_model["w"] is model["w"]
    ctx.take_snapshot()
    ctx.global_model["w"].mul_(7)  # edited in place, as a careless plugin might
    ctx.restore_snapshot()
    assert torch.equal(ctx.global_model["w"], torch.ones(2))  # read back from the file
    ctx.take_snapshot()
    ctx.global_model["w"].mul_(7)
    codec.save_file(tmp_path / "global_model.safetensors", model, {"round": 2})
    import pytest

    from flcore.errors import RoundFailed

    with pytest.raises(RoundFailed, match="edited in place during round 4"):
        ctx.restore_snapshot()


def test_handles_says_whether_a_plugin_in_the_chain_implements_a_hook() -> None:
    from flcore.markers import hookimpl

    class Listens:
        @hookimpl
        def receive_model(self, ctx: object, weights: object) -> None: ...

    job = small_job()
    listening = FLContext(job=job, task=None, chain=Chain([("l", Listens())]), log=make_logger())  # type: ignore[arg-type]
    bare = FLContext(job=job, task=None, chain=Chain([]), log=make_logger())  # type: ignore[arg-type]
    assert listening.handles("receive_model")
    assert not bare.handles("receive_model")
    assert bare.handles("local_train")  # the core's defaults are plugins too
