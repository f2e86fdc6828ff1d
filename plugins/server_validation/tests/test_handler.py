"""The handler in real jobs: the schedule, what it writes where, refusals, rollback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flcore_server_validation import ServerValidationHandler, validation_due
from server_validation_helpers import (
    FailInAfterAggregation,
    FailInEndRound,
    Observer,
    PlannedFailure,
    digits_job,
)

from flcore import FLCoreError, JobError, RunFailed, RunResult, run_job
from flcore.run import prepare


def lines(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def test_validation_due_is_every_nth_round_and_the_last() -> None:
    assert [r for r in range(1, 11) if validation_due(r, 10, 3)] == [3, 6, 9, 10]
    assert [r for r in range(1, 7) if validation_due(r, 6, 3)] == [3, 6]
    assert [r for r in range(1, 5) if validation_due(r, 4, 1)] == [1, 2, 3, 4]
    assert [r for r in range(1, 4) if validation_due(r, 3, 5)] == [3]


# -- every third round of ten -----------------------------------------------------------


@pytest.fixture(scope="module")
def ten_rounds(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    job = digits_job(rounds=10, every=3)
    return run_job(job, out=tmp_path_factory.mktemp("ten") / "run")


def test_exactly_rounds_3_6_9_and_10_are_evaluated(ten_rounds: RunResult) -> None:
    evaluated = [m["round"] for m in ten_rounds.history if "server" in m]
    assert evaluated == [3, 6, 9, 10]
    written = lines(ten_rounds.run_dir, "metrics.jsonl")
    assert [m["round"] for m in written if "server" in m] == [3, 6, 9, 10]
    events = [
        e for e in lines(ten_rounds.run_dir, "events.jsonl") if e["event"] == "server_validation"
    ]
    assert [e["round"] for e in events] == [3, 6, 9, 10]


def test_adding_server_validation_changes_no_trained_weight(tmp_path: Path) -> None:
    # Even a random evaluator runs under its own seed: the clients train exactly the same.
    plain = run_job(digits_job(rounds=2, chain=[]), out=tmp_path / "plain")
    job = digits_job(rounds=2, evaluator="server_validation_helpers:subsampled_accuracy")
    validated = run_job(job, out=tmp_path / "validated")
    again = run_job(job, out=tmp_path / "again")
    assert plain.global_model_path.read_bytes() == validated.global_model_path.read_bytes()
    assert [m["server"] for m in validated.history] == [m["server"] for m in again.history]


# -- what later plugins see ------------------------------------------------------------------


def test_later_plugins_see_the_metrics_in_the_same_event(tmp_path: Path) -> None:
    observer = Observer()
    job = digits_job(rounds=3, every=2, chain=["server_validation", "observer"])
    result = run_job(job, out=tmp_path / "run", extra_plugins={"observer": observer})
    r2, r3 = result.history[1]["server"], result.history[2]["server"]
    assert observer.seen == {
        1: (None, None),  # not due, and nothing evaluated yet
        2: (r2, {"round": 2, "metrics": r2}),
        3: (r3, {"round": 3, "metrics": r3}),
    }


# -- refusals ------------------------------------------------------------------------------


def test_a_task_without_server_data_is_refused_before_training(tmp_path: Path) -> None:
    job = digits_job(task="server_validation_helpers:NoServerDataTask")
    with pytest.raises(FLCoreError) as raised:
        run_job(job, out=tmp_path / "run")
    message = str(raised.value)
    assert "JobError" in message or isinstance(raised.value, JobError)
    assert (
        "test-job.toml: [plugins.server_validation]: server validation needs held-out data"
        in message
    )
    assert "task 'server_validation_helpers:NoServerDataTask' has no server_data()" in message
    assert not (tmp_path / "run").exists()


def test_an_empty_server_data_set_is_refused_before_training(tmp_path: Path) -> None:
    job = digits_job(task="server_validation_helpers:EmptyServerDataTask")
    with pytest.raises(
        FLCoreError, match=r"server_data\(\) of task .*EmptyServerDataTask' is empty"
    ):
        run_job(job, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_same_task_without_the_plugin_runs(tmp_path: Path) -> None:
    job = digits_job(rounds=1, chain=[], task="server_validation_helpers:NoServerDataTask")
    assert "server" not in run_job(job, out=tmp_path / "run").history[0]


# -- rollback --------------------------------------------------------------------------------


@pytest.mark.parametrize("failing_cls", [FailInAfterAggregation, FailInEndRound])
def test_a_failure_after_validation_leaves_no_metrics_of_the_failed_round(
    failing_cls: type[PlannedFailure],
) -> None:
    failing = failing_cls(round=2)
    job = digits_job(rounds=3, chain=["server_validation", "failing"])
    training = prepare(job, extra_plugins={"failing": failing})
    with pytest.raises(
        RunFailed, match=r"plugin 'failing' raised in '(after_aggregation|end_round)'"
    ):
        training.run()
    # The failing plugin saw round 2's server metrics: they had been written...
    assert failing.seen[1][0] == 2 and set(failing.seen[1][1]) == {"loss", "accuracy"}
    # ...and nothing of them is left: not in the context, not in the history.
    ctx = training.ctx
    assert "server" not in ctx.metrics
    assert ctx.state["server_validation"]["round"] == 1
    assert [m["round"] for m in training.history] == [1]


def test_an_aborted_run_keeps_the_completed_rounds_metrics_only(tmp_path: Path) -> None:
    job = digits_job(rounds=3, chain=["server_validation", "failing"])
    with pytest.raises(RunFailed):
        run_job(job, out=tmp_path / "run", extra_plugins={"failing": FailInAfterAggregation(2)})
    written = lines(tmp_path / "run", "metrics.jsonl")
    assert [(m["round"], "server" in m) for m in written] == [(1, True)]
    events = lines(tmp_path / "run", "events.jsonl")
    rolled = [e for e in events if e["event"] in {"rolled_back", "server_validation_rolled_back"}]
    assert [(e["event"], e.get("plugin"), e["round"]) for e in rolled] == [
        ("server_validation_rolled_back", None, 2),
        ("rolled_back", "server_validation", 2),
    ]


def test_a_retried_round_is_validated_once(tmp_path: Path) -> None:
    job = digits_job(rounds=3, chain=["server_validation", "failing"], on_error="retry")
    failing = FailInAfterAggregation(round=2, times=1)
    result = run_job(job, out=tmp_path / "run", extra_plugins={"failing": failing})
    written = lines(result.run_dir, "metrics.jsonl")
    assert [m["round"] for m in written] == [1, 2, 3]
    assert all(set(m["server"]) == {"loss", "accuracy"} for m in written)
    assert [r for r, _ in failing.seen] == [1, 2, 2, 3]  # round 2 ran twice, was written once


def test_rollback_restores_what_the_round_replaced(tmp_path: Path) -> None:
    # The handler undoes its own writes, whatever the core restores after it.
    training = prepare(digits_job(rounds=3))
    ctx = training.ctx
    handler = ServerValidationHandler(ctx.settings("server_validation"))
    ctx.global_model = training.initial_model()
    handler.startup(ctx)
    ctx.round = 1
    handler.after_aggregation(ctx)
    first = ctx.metrics.pop("server")
    ctx.round = 2
    handler.after_aggregation(ctx)
    assert ctx.state["server_validation"]["round"] == 2
    handler.rollback(ctx)
    assert "server" not in ctx.metrics
    assert ctx.state["server_validation"] == {"round": 1, "metrics": first}
    handler.rollback(ctx)  # a second rollback has nothing left to undo
    assert ctx.state["server_validation"] == {"round": 1, "metrics": first}
