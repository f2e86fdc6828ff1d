"""The composed stack: server_validation, then model_selection selecting by the server's metric.

The recipe of both READMEs: ``source = "server"`` makes model_selection read
``ctx.metrics["server"][key_metric]`` in ``after_aggregation``, right after this plugin wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from server_validation_helpers import DegradeAt, digits_job

from flcore import FLCoreError, load_tensors, run_job

pytest.importorskip("flcore_model_selection")


def select_by_server(
    tmp_path: Path, rounds: int, every: int, key: str, mode: str, degrade: set[int]
) -> tuple[list[dict[str, Any]], Path]:
    job = digits_job(
        rounds=rounds,
        every=every,
        chain=["degrade", "server_validation", "model_selection"],
        plugins={"model_selection": {"source": "server", "key_metric": key, "mode": mode}},
        keep_round_models=True,
    )
    result = run_job(job, out=tmp_path / "run", extra_plugins={"degrade": DegradeAt(degrade)})
    return result.history, result.run_dir


def assert_best_is(run_dir: Path, round: int, value: float) -> None:
    record = json.loads((run_dir / "best_model.json").read_text())
    assert record["round"] == round
    assert record["metric"] == value
    best, _ = load_tensors(run_dir / "best_model.safetensors")
    kept, _ = load_tensors(run_dir / "rounds" / f"{round:04d}" / "global_model.safetensors")
    assert best.keys() == kept.keys()
    assert all(torch.equal(best[name], kept[name]) for name in kept)


def test_the_round_with_the_best_server_accuracy_is_selected(tmp_path: Path) -> None:
    # Rounds 4 and 5 end with a ruined global model: the best is an earlier round, not the last.
    history, run_dir = select_by_server(tmp_path, 5, 1, "accuracy", "max", degrade={4, 5})
    accuracy = {m["round"]: m["server"]["accuracy"] for m in history}
    best = max(accuracy, key=lambda r: (accuracy[r], -r))  # the first of equals is kept
    assert best < 4 and accuracy[best] > max(accuracy[4], accuracy[5])
    assert_best_is(run_dir, best, accuracy[best])


def test_selection_by_server_loss_sees_only_the_validated_rounds(tmp_path: Path) -> None:
    history, run_dir = select_by_server(tmp_path, 5, 2, "loss", "min", degrade={4})
    loss = {m["round"]: m["server"]["loss"] for m in history if "server" in m}
    assert sorted(loss) == [2, 4, 5]
    best = min(loss, key=lambda r: (loss[r], r))
    assert best != 4
    assert_best_is(run_dir, best, loss[best])


def test_model_selection_before_server_validation_is_refused(tmp_path: Path) -> None:
    job = digits_job(
        chain=["model_selection", "server_validation"],
        plugins={"model_selection": {"source": "server", "key_metric": "accuracy", "mode": "max"}},
    )
    with pytest.raises(FLCoreError, match="'server_validation' must come before 'model_selection'"):
        run_job(job, out=tmp_path / "run")
