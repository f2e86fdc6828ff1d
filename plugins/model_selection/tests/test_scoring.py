"""The arithmetic of a score, checked against hand computations, and every kind of value a
client may report that must not count."""

from __future__ import annotations

import math
from typing import Any

import pytest
from flcore_model_selection import (
    ClientScore,
    Unusable,
    client_weight,
    is_better,
    read_metric,
    validation_view,
    weighted_score,
)


def test_reads_a_number_or_an_entry_of_a_mapping() -> None:
    metrics = {
        "initial_validation_metric": 0.75,
        "initial_validation": {"loss": 1, "accuracy": 0.5},
    }
    assert read_metric(metrics, "initial_validation_metric") == 0.75
    assert read_metric(metrics, "initial_validation", "loss") == 1.0
    assert isinstance(read_metric(metrics, "initial_validation", "loss"), float)
    # key_metric only picks an entry of a mapping; a number is the number
    assert read_metric(metrics, "initial_validation_metric", "accuracy") == 0.75


@pytest.mark.parametrize(
    ("metrics", "name", "key", "reason"),
    [
        (
            {"train_loss": 0.3},
            "initial_validation_metric",
            None,
            "metric 'initial_validation_metric' missing (reported: train_loss)",
        ),
        ({}, "score", None, "metric 'score' missing (reported: none)"),
        ({"score": math.nan}, "score", None, "metric 'score' is not finite: nan"),
        ({"score": math.inf}, "score", None, "metric 'score' is not finite: inf"),
        ({"score": -math.inf}, "score", None, "metric 'score' is not finite: -inf"),
        ({"score": "0.9"}, "score", None, "metric 'score' is not a number: str '0.9'"),
        ({"score": True}, "score", None, "metric 'score' is not a number: bool True"),
        ({"score": None}, "score", None, "metric 'score' is not a number: NoneType None"),
        ({"score": [0.9]}, "score", None, "metric 'score' is not a number: list [0.9]"),
        (
            {"v": {"loss": 1.0, "accuracy": 0.5}},
            "v",
            None,
            "metric 'v' is a mapping; set key_metric to one of its entries (accuracy, loss)",
        ),
        (
            {"v": {"loss": 1.0}},
            "v",
            "accuracy",
            "metric 'v' has no entry 'accuracy' (entries: loss)",
        ),
        ({"v": {"loss": math.nan}}, "v", "loss", "metric 'v.loss' is not finite: nan"),
        ({"v": {"loss": "low"}}, "v", "loss", "metric 'v.loss' is not a number: str 'low'"),
        ({"v": {"loss": {"x": 1}}}, "v", "loss", "metric 'v.loss' is not a number: dict"),
    ],
)
def test_unusable_values_say_why(
    metrics: dict[str, Any], name: str, key: str | None, reason: str
) -> None:
    with pytest.raises(Unusable) as caught:
        read_metric(metrics, name, key)
    assert str(caught.value).startswith(reason)


def test_weighted_mean_by_hand() -> None:
    # Clara's rule: weight = aggregation weight x local iterations (when asked)
    weights = {"a": 2.0, "b": 1.0, "c": 1.0}
    iters = {"a": 10, "b": 20, "c": 30}
    values = {"a": 0.5, "b": 0.8, "c": 0.9}
    clients = [
        ClientScore(c, values[c], client_weight(weights[c], iters[c], weigh_by_local_iter=True))
        for c in values
    ]
    score = weighted_score(clients)
    # (2*10*0.5 + 20*0.8 + 30*0.9) / (20 + 20 + 30) = (10 + 16 + 27) / 70
    assert score.value == pytest.approx(53 / 70, rel=1e-15)
    assert score.per_client() == {
        "a": {"value": 0.5, "weight": 20.0},
        "b": {"value": 0.8, "weight": 20.0},
        "c": {"value": 0.9, "weight": 30.0},
    }
    unweighted = weighted_score(
        ClientScore(c, values[c], client_weight(1.0, iters[c], weigh_by_local_iter=False))
        for c in values
    )
    assert unweighted.value == pytest.approx((0.5 + 0.8 + 0.9) / 3, rel=1e-15)


def test_zero_weight_leaves_a_client_out_and_says_so() -> None:
    score = weighted_score(
        [ClientScore("a", 0.2, 0.0), ClientScore("b", 0.6, 3.0)], skipped={"c": "missing"}
    )
    assert score.value == pytest.approx(0.6)
    assert [c.client_id for c in score.clients] == ["b"]
    assert score.skipped == {"c": "missing", "a": "weight 0 (aggregation weight x iterations)"}


def test_no_client_counts_no_score() -> None:
    score = weighted_score([ClientScore("a", 0.9, 0.0)], skipped={"b": "not finite"})
    assert score.value is None and score.clients == ()
    assert set(score.skipped) == {"a", "b"}
    assert weighted_score([]).value is None


def test_weighing_by_iterations_needs_a_count() -> None:
    assert client_weight(1.5, None, weigh_by_local_iter=False) == 1.5
    assert client_weight(1.5, 4, weigh_by_local_iter=True) == 6.0
    with pytest.raises(Unusable, match="no local iteration count"):
        client_weight(1.5, None, weigh_by_local_iter=True)


def test_better_is_strict_and_follows_the_mode() -> None:
    assert is_better(0.1, None, higher_is_better=True)
    assert is_better(0.9, 0.8, higher_is_better=True)
    assert not is_better(0.8, 0.8, higher_is_better=True)  # a tie keeps the earlier model
    assert not is_better(0.7, 0.8, higher_is_better=True)
    assert is_better(0.7, 0.8, higher_is_better=False)
    assert not is_better(0.8, 0.8, higher_is_better=False)
    assert not is_better(0.9, 0.8, higher_is_better=False)


def test_final_validation_is_named_like_the_validation_of_a_received_model() -> None:
    view = validation_view({"loss": 0.4, "accuracy": 0.9, "num_samples": 30})
    assert view["initial_validation_metric"] == 0.9
    assert view["initial_validation"] == {"loss": 0.4, "accuracy": 0.9}
    assert view["loss"] == 0.4 and "num_samples" not in view
    regression = validation_view({"loss": 0.25, "num_samples": 30})
    assert regression["initial_validation_metric"] == -0.25  # the client's own convention
