"""The evaluator: the chain's ``evaluate`` hook or a callable named by import path, and the
check of what it returns."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import server_validation_helpers as helpers
import torch
from flcore_server_validation import EvaluatorError, checked_metrics
from server_validation_helpers import digits_job, saved_model

from flcore import FLCoreError, JobError, RunFailed, run_job
from flcore.run import prepare

EVALUATOR = "server_validation_helpers:top2_accuracy"


def metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- the check of a result ------------------------------------------------------------


def test_numbers_of_every_kind_become_floats() -> None:
    result = {"a": 1, "b": 0.25, "c": torch.tensor(2.5), "d": np.float32(0.5), "e": np.int64(3)}
    metrics = checked_metrics(result, "'pkg:fn'")
    assert metrics == {"a": 1.0, "b": 0.25, "c": 2.5, "d": 0.5, "e": 3.0}
    assert all(type(v) is float for v in metrics.values())
    assert list(metrics) == list(result)  # the evaluator's order is the console's order


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ([0.5, 0.7], "returned list [0.5, 0.7], not a mapping of metric name to number"),
        (0.9, "returned float 0.9, not a mapping"),
        (None, "returned NoneType None, not a mapping"),
        ({}, "returned no metrics"),
        ({"accuracy": "high"}, "non-numeric value for metric 'accuracy': str 'high'"),
        ({"accuracy": None}, "non-numeric value for metric 'accuracy'"),
        ({"accuracy": True}, "non-numeric value for metric 'accuracy': bool True"),
        ({"accuracy": [0.9]}, "non-numeric value for metric 'accuracy': list"),
        ({"accuracy": torch.ones(3)}, "non-numeric value for metric 'accuracy': Tensor"),
        ({"loss": math.nan}, "non-finite value for metric 'loss': nan"),
        ({"loss": -math.inf}, "non-finite value for metric 'loss': -inf"),
        ({"loss": torch.tensor(math.inf)}, "non-finite value for metric 'loss': inf"),
        ({1: 0.5}, "returned the metric name 1; names must be non-empty strings"),
        ({"": 0.5}, "returned the metric name ''"),
    ],
)
def test_a_bad_result_is_an_error_naming_the_evaluator(result: Any, reason: str) -> None:
    with pytest.raises(EvaluatorError) as raised:
        checked_metrics(result, "'pkg.module:score'")
    assert str(raised.value).startswith("evaluator 'pkg.module:score' ")
    assert reason in str(raised.value)


# -- naming an evaluator by import path ---------------------------------------------------


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (
            "server_validation_helpers.top2_accuracy",
            "is not an import path of the form 'package.module:function'",
        ),
        (":top2_accuracy", "is not an import path"),
        ("server_validation_helpers:", "is not an import path"),
        (
            "no_such_package.metrics:score",
            "cannot import module 'no_such_package.metrics' of evaluator 'no_such_package.metrics:score': ModuleNotFoundError",
        ),
        (
            "server_validation_helpers:no_such_function",
            "'server_validation_helpers' has no attribute 'no_such_function'",
        ),
        (
            "server_validation_helpers:NOT_CALLABLE",
            "is a dict, not a callable taking (model, data)",
        ),
        ("server_validation_helpers:takes_three", "cannot be called as evaluator(model, data)"),
    ],
)
def test_a_bad_evaluator_path_is_refused_before_training(
    tmp_path: Path, path: str, reason: str
) -> None:
    # check_job's JobError reaches the user as it is, or wrapped naming the plugin and hook.
    with pytest.raises(FLCoreError) as raised:
        run_job(digits_job(evaluator=path), out=tmp_path / "run")
    message = str(raised.value)
    assert "JobError" in message or isinstance(raised.value, JobError)
    assert "test-job.toml: [plugins.server_validation].evaluator: " in message
    assert reason in message
    assert not (tmp_path / "run").exists()


def test_the_default_is_the_chain_s_evaluate_hook_loss_only_for_regression(tmp_path: Path) -> None:
    result = run_job(
        digits_job(rounds=2, task="server_validation_helpers:RegressionTask"),
        out=tmp_path / "run",
    )
    server = [line["server"] for line in result.history]
    assert [set(s) for s in server] == [{"loss"}, {"loss"}]
    assert server[1]["loss"] < server[0]["loss"]  # it trains, and the server sees it


# -- a custom evaluator in a real job ---------------------------------------------------------


def test_a_custom_evaluator_is_called_and_its_metrics_appear(tmp_path: Path) -> None:
    helpers.CALLS.clear()
    job = digits_job(rounds=4, every=2, evaluator=EVALUATOR, keep_round_models=True)
    result = run_job(job, out=tmp_path / "run")

    # Called on the due rounds only, in eval mode, with the whole server set.
    training = prepare(job)
    data = training.ctx.task.server_data()
    calls = list(helpers.CALLS)
    assert calls == [(len(data), True), (len(data), True)]

    lines = metrics_lines(result.run_dir)
    assert [line["round"] for line in lines if "server" in line] == [2, 4]
    for line in lines:
        if "server" not in line:
            continue
        # Its own metrics, not the core's, and exactly what it gives on the saved model.
        model = saved_model(result.run_dir, line["round"], training.ctx.task)
        direct = checked_metrics(helpers.top2_accuracy(model, data), "direct")
        assert line["server"] == direct
        assert set(line["server"]) == {"top2_accuracy", "confidence"}
    helpers.CALLS.clear()


@pytest.mark.parametrize(
    ("function", "reason"),
    [
        ("returns_list", "returned list [0.5, 0.7], not a mapping of metric name to number"),
        ("returns_text", "returned a non-numeric value for metric 'accuracy': str 'high'"),
        ("returns_nan", "returned a non-finite value for metric 'loss': nan"),
        ("raises", "raised RuntimeError: the evaluator's disk is full"),
    ],
)
def test_a_bad_evaluator_result_stops_the_run_naming_the_evaluator(
    tmp_path: Path, function: str, reason: str
) -> None:
    path = f"server_validation_helpers:{function}"
    job = digits_job(rounds=3, every=2, evaluator=path)
    with pytest.raises(RunFailed) as raised:
        run_job(job, out=tmp_path / "run")
    message = str(raised.value)
    assert "Round 2 failed: plugin 'server_validation' raised in 'after_aggregation'" in message
    assert re.search(rf"EvaluatorError: evaluator '{re.escape(path)}' {re.escape(reason)}", message)
    # Round 1 (not due) completed and is kept; nothing of round 2 is.
    assert [line["round"] for line in metrics_lines(tmp_path / "run")] == [1]
    assert "server" not in metrics_lines(tmp_path / "run")[0]
