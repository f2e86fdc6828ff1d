"""The trainer's round snapshot: what a rollback restores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flcore import codec
from flcore.chain import Chain
from flcore.errors import RoundFailed
from flcore.logging import make_logger
from flcore.trainer import ModelTrainer
from flcore.training import Training
from tests.conftest import small_job


def trainer(run_dir: Path | None = None) -> ModelTrainer:
    training = Training(small_job(), Chain([]), None, run_dir, make_logger())  # type: ignore[arg-type]
    return ModelTrainer(training)


def test_a_snapshot_restores_round_model_state_and_metrics() -> None:
    t = trainer()
    ctx = t.ctx
    ctx.round = 1
    ctx.global_model = {"w": torch.ones(2)}
    ctx.state["p"] = {"best": 0.5}
    ctx.metrics["x"] = 1
    t.take_snapshot()
    ctx.round = 2
    ctx.global_model["w"].add_(5)  # in place: the snapshot holds a copy
    ctx.state["p"]["best"] = 0.9
    ctx.metrics["server"] = {"accuracy": 1.0}
    ctx.client_tests = {"client-0": {"accuracy": 1.0}}
    t.dispatch("TrainingRoundFinished")
    t.restore_snapshot()
    assert ctx.round == 1
    assert torch.equal(ctx.global_model["w"], torch.ones(2))
    assert ctx.state == {"p": {"best": 0.5}} and ctx.metrics == {"x": 1}
    assert ctx.client_tests == {} and ctx.contributions == []
    assert not t.queue  # a restored round has no events left to process


def test_with_a_run_directory_the_model_is_kept_by_reference_and_reread_if_edited(
    tmp_path: Path,
) -> None:
    t = trainer(tmp_path)
    ctx = t.ctx
    ctx.round = 3
    model = {"w": torch.ones(2)}
    ctx.global_model = model
    codec.save_file(tmp_path / "global_model.safetensors", model, {"round": 3})
    snap = t.take_snapshot()
    assert snap.global_model["w"] is model["w"]  # no copy
    ctx.global_model = {"w": torch.zeros(2)}  # replaced, as the trainer does
    t.restore_snapshot()
    assert ctx.global_model["w"] is model["w"]
    t.take_snapshot()
    ctx.global_model["w"].mul_(7)  # edited in place, as a careless plugin might
    t.restore_snapshot()
    assert torch.equal(ctx.global_model["w"], torch.ones(2))  # read back from the file
    t.take_snapshot()
    ctx.global_model["w"].mul_(7)
    codec.save_file(tmp_path / "global_model.safetensors", model, {"round": 2})
    with pytest.raises(RoundFailed, match="edited in place during round 4"):
        t.restore_snapshot()
