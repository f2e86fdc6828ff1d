"""A run resumed after a crash keeps its selection: the best model of the rounds before the
crash can still win, and the files end as an uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flcore_model_selection import ModelSelectionHandler
from selection_support import FailAt, digits_job, events

from flcore import RunFailed, run_job

CHAIN = ["model_selection", "fail"]


def run(out: Path, fail_round: int, resume: bool = False) -> None:
    run_job(
        digits_job(chain=CHAIN, job={"rounds": 4}),
        out=out,
        extra_plugins={
            "model_selection": ModelSelectionHandler(),
            "fail": FailAt("end_round", fail_round),
        },
        resume=resume,
    )


def test_a_resumed_run_selects_what_an_uninterrupted_one_selects(tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(whole, fail_round=99)
    with pytest.raises(RunFailed, match=r"last completed round \(2\)"):
        run(cut, fail_round=3)  # the server "dies" in round 3
    run(cut, fail_round=99, resume=True)
    assert events(cut, "model_selection_resumed")
    assert json.loads((cut / "best_model.json").read_text()) == json.loads(
        (whole / "best_model.json").read_text()
    )
    assert (cut / "best_model.safetensors").read_bytes() == (
        whole / "best_model.safetensors"
    ).read_bytes()
    scores = [
        json.loads(x).get("model_selection", {}).get("scores")
        for x in (cut / "metrics.jsonl").read_text().splitlines()
    ]
    whole_scores = [
        json.loads(x).get("model_selection", {}).get("scores")
        for x in (whole / "metrics.jsonl").read_text().splitlines()
    ]
    assert scores == whole_scores
