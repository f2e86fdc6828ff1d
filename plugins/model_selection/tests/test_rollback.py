"""A failed round leaves the best-model files and the selection as they were before it, in
whichever event it failed: the one that wrote them, a later one, or a listener of the plugin's
own hook; a retried round starts from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flcore_model_selection import ModelSelectionHandler
from selection_support import (
    FailAt,
    best_record,
    digits_job,
    events,
    file_bytes,
    metrics_lines,
    round_model,
    tensor_bytes,
)

from flcore import RunFailed, run_job


def failing_run(
    tmp_path: Path, fail: FailAt, chain: list[str], **job: Any
) -> tuple[Path, ModelSelectionHandler, RunFailed]:
    handler = ModelSelectionHandler()
    out = tmp_path / "run"
    with pytest.raises(RunFailed) as caught:
        run_job(
            digits_job(chain=chain, job={"rounds": 3, **job}),
            out=out,
            extra_plugins={"model_selection": handler, "fail": fail},
        )
    return out, handler, caught.value


def assert_as_before_the_round(run_dir: Path, fail: FailAt, handler: ModelSelectionHandler) -> None:
    assert fail.raised == 1
    assert fail.at_round_start is not None and fail.when_raised is not None
    # the round did select a new best before it failed...
    assert fail.when_raised != fail.at_round_start
    # ...and the failure took it back, file for file
    assert file_bytes(run_dir) == fail.at_round_start
    assert not handler.files.pending
    last = metrics_lines(run_dir)[-1]
    assert last["round"] == fail.round - 1
    assert best_record(run_dir)["round"] == last["model_selection"]["best_round"]
    assert tensor_bytes(run_dir / "best_model.safetensors") == tensor_bytes(
        round_model(run_dir, last["model_selection"]["best_round"])
    )
    assert any(e["round"] == fail.round for e in events(run_dir, "best_model_restored"))
    assert events(run_dir, "best_model_out_of_step") == []  # files agree with ctx.state
    assert list(run_dir.glob(".best_model*")) == []  # no round-start copy left behind


def test_a_plugin_failing_after_the_selection_in_the_same_event_rolls_it_back(
    tmp_path: Path,
) -> None:
    fail = FailAt("before_aggregation", round=3)
    run_dir, handler, err = failing_run(tmp_path, fail, ["model_selection", "fail"])
    assert "plugin 'fail' raised in 'before_aggregation'" in str(err)
    assert_as_before_the_round(run_dir, fail, handler)
    rolled = [e["plugin"] for e in events(run_dir, "rolled_back")]
    assert rolled == ["model_selection"]


def test_a_failure_in_a_later_event_is_undone(tmp_path: Path) -> None:
    # the aggregation fails after model_selection wrote round 3's best in another event: the
    # rollback reaches every plugin that handled an event of the round, this one included
    fail = FailAt("aggregate", round=3)
    run_dir, handler, err = failing_run(tmp_path, fail, ["fail", "model_selection"])
    assert "plugin 'fail' raised in 'aggregate'" in str(err)
    assert_as_before_the_round(run_dir, fail, handler)
    assert [e["plugin"] for e in events(run_dir, "rolled_back")] == ["model_selection"]


def test_a_failed_last_round_takes_back_both_of_its_selections(tmp_path: Path) -> None:
    # round 3 scores model 2 (before_aggregation) and the final model 3 (end_round); a plugin
    # failing after both in end_round undoes both
    fail = FailAt("end_round", round=3)
    run_dir, handler, _ = failing_run(tmp_path, fail, ["model_selection", "fail"])
    assert_as_before_the_round(run_dir, fail, handler)
    kept = [(e["round"], e["model_round"]) for e in events(run_dir, "best_model_selected")]
    assert kept[-2:] == [(3, 2), (3, 3)]  # both had been selected before the failure


def test_a_failing_listener_of_best_model_selected_rolls_the_selection_back(
    tmp_path: Path,
) -> None:
    fail = FailAt("best_model_selected", round=3)
    run_dir, handler, err = failing_run(tmp_path, fail, ["model_selection", "fail"])
    assert "plugin 'fail' raised in 'best_model_selected'" in str(err)
    assert_as_before_the_round(run_dir, fail, handler)


def test_a_retried_round_starts_from_the_files_before_it(tmp_path: Path) -> None:
    fail = FailAt("aggregate", round=2, times=1)
    handler = ModelSelectionHandler()
    result = run_job(
        digits_job(
            chain=["fail", "model_selection"],
            job={"rounds": 3, "on_error": "retry", "max_retries": 1},
        ),
        out=tmp_path / "run",
        extra_plugins={"model_selection": handler, "fail": fail},
    )
    run_dir = result.run_dir
    assert fail.raised == 1 and fail.when_raised != fail.at_round_start
    (restored,) = events(run_dir, "best_model_restored")
    assert restored["round"] == 2  # by the failed round's rollback, before the retry
    assert [
        e["event"] for e in events(run_dir) if e["event"] in {"round_retry", "best_model_restored"}
    ] == [
        "best_model_restored",
        "round_retry",
    ]
    # the retry selected again, and the files describe the run as it completed
    record = best_record(run_dir)
    assert record["round"] == metrics_lines(run_dir)[-1]["model_selection"]["best_round"]
    assert tensor_bytes(run_dir / "best_model.safetensors") == tensor_bytes(
        round_model(run_dir, record["round"])
    )
    kept = [(e["round"], e["model_round"]) for e in events(run_dir, "best_model_selected")]
    assert kept.count((2, 1)) == 2  # once in the failed attempt, once in the retry
