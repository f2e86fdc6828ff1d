"""ModelSelectionHandler in real digits jobs: which model is kept, how it is scored, and what
the run directory, metrics.jsonl and events.jsonl say about it.

A :class:`Recorder` in the chain writes down what the clients reported, so every expected
score here is computed by hand from the clients' own values, not taken from the plugin.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from flcore_model_selection import BestModel, ModelSelectionHandler, ModelSelectionSettings
from selection_support import (
    ClientMetric,
    Degrade,
    NaNValidation,
    Recorder,
    best_record,
    digits_job,
    events,
    metrics_lines,
    pick,
    round_model,
    tensor_bytes,
    weighted,
)

from flcore import RunResult, run_job

ACCURACY = "initial_validation_metric"


def run(
    tmp: Path,
    chain: list[str],
    plugins: dict[str, Any],
    selection: dict[str, Any] | None = None,
    **sections: Any,
) -> tuple[RunResult, Recorder]:
    recorder = Recorder()
    job = digits_job(chain=["recorder", *chain], selection=selection, **sections)
    result = run_job(job, out=tmp / "run", extra_plugins={"recorder": recorder, **plugins})
    return result, recorder


def by_hand(recorder: Recorder, name: str = ACCURACY, key: str | None = None) -> dict[int, float]:
    """Model round -> the plain mean of the clients' values, the final model included."""
    scores = {m: sum(v.values()) / len(v) for m, v in recorder.values(name, key).items()}
    last = max(recorder.tests)
    finals = recorder.tests[last]
    field = "accuracy" if name == ACCURACY else str(key)
    scores[last] = sum(t[field] for t in finals.values()) / len(finals)
    return scores


def logged_scores(run_dir: Path) -> dict[int, float]:
    return {
        int(m): v
        for line in metrics_lines(run_dir)
        for m, v in line["model_selection"]["scores"].items()
    }


# -- a degraded model is never kept ----------------------------------------------------------


@pytest.fixture(scope="module")
def degraded(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, Recorder]:
    """Four rounds; the global models of rounds 3 and 4 are replaced by noise."""
    return run(
        tmp_path_factory.mktemp("degraded"),
        ["degrade", "model_selection"],
        {"degrade": Degrade({3, 4})},
        job={"rounds": 4},
    )


def test_best_model_is_the_round_with_the_best_weighted_metric(degraded: Any) -> None:
    result, recorder = degraded
    run_dir = result.run_dir
    expected = by_hand(recorder)
    assert sorted(expected) == [0, 1, 2, 3, 4]  # every model of the run, the final one too
    assert logged_scores(run_dir) == pytest.approx(expected, rel=1e-12)
    best = pick(expected)
    assert best == 2  # rounds 3 and 4 were degraded
    assert tensor_bytes(run_dir / "best_model.safetensors") == tensor_bytes(round_model(run_dir, 2))
    assert tensor_bytes(run_dir / "best_model.safetensors") != tensor_bytes(
        run_dir / "global_model.safetensors"
    )
    record = best_record(run_dir)
    assert record["round"] == 2 and record["scored_in_round"] == 3 and record["final"] is False
    assert record["metric"] == pytest.approx(expected[2], rel=1e-12)
    assert record["metric_name"] == ACCURACY and record["mode"] == "max"
    assert record["clients"] == {
        c: {"value": v, "weight": 1.0} for c, v in recorder.values()[2].items()
    }
    assert record["skipped"] == {}
    assert BestModel.from_json(record).to_json() == {
        k: v for k, v in record.items() if k not in ("file", "sha256")
    }
    payload = (run_dir / "best_model.safetensors").read_bytes()
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()
    assert list(run_dir.glob(".best_model*")) == []  # round-start copies go with each round


def test_metrics_and_events_say_which_model_each_score_belongs_to(degraded: Any) -> None:
    result, _ = degraded
    lines = metrics_lines(result.run_dir)
    assert [sorted(line["model_selection"]["scores"]) for line in lines] == [
        ["0"],
        ["1"],
        ["2"],
        ["3", "4"],  # the last round also scores its own, final model
    ]
    assert [line["model_selection"]["best_round"] for line in lines] == [0, 1, 2, 2]
    assert result.final_metrics["model_selection"]["best_round"] == 2
    scored = [(e["round"], e["model_round"]) for e in events(result.run_dir, "model_scored")]
    assert scored == [(1, 0), (2, 1), (3, 2), (4, 3), (4, 4)]
    kept = [e["model_round"] for e in events(result.run_dir, "best_model_selected")]
    assert kept == [0, 1, 2]
    (final,) = events(result.run_dir, "final_model_scored")
    assert final["model_round"] == 4 and final["via"] == "round_test"
    (summary,) = events(result.run_dir, "best_model")
    assert summary["model_round"] == 2


def test_each_new_best_is_announced_after_its_files_are_written(degraded: Any) -> None:
    _, recorder = degraded
    assert [(s["in_round"], s["round"]) for s in recorder.best_seen] == [(1, 0), (2, 1), (3, 2)]
    assert all(s["record_matches"] and s["weights_match_file"] for s in recorder.best_seen)


# -- the final model can win -------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RunResult, Recorder]]:
    """Undisturbed training: three rounds (the clients test every round), the same without
    any client tests, and a fourth round to see what the clients say of model 3 next."""
    tmp = tmp_path_factory.mktemp("plain")
    return {
        "tested": run(tmp / "a", ["model_selection"], {}),
        "untested": run(tmp / "b", ["model_selection"], {}, trainer={"skip_model_tests": True}),
        "longer": run(tmp / "c", ["model_selection"], {}, job={"rounds": 4}),
    }


def test_a_final_model_that_is_best_is_selected(plain: Any) -> None:
    result, recorder = plain["tested"]
    run_dir = result.run_dir
    expected = by_hand(recorder)
    assert pick(expected) == 3
    # without the final pass only models 0-2 were scored, and model 2 would have been kept
    assert pick({m: v for m, v in expected.items() if m < 3}) == 2
    record = best_record(run_dir)
    assert record["round"] == 3 and record["final"] is True and record["scored_in_round"] == 3
    assert record["metric"] == pytest.approx(expected[3], rel=1e-12)
    assert (
        tensor_bytes(run_dir / "best_model.safetensors")
        == tensor_bytes(run_dir / "global_model.safetensors")
        == tensor_bytes(round_model(run_dir, 3))
    )


def test_the_final_model_is_scored_like_every_other(plain: Any) -> None:
    tested, _ = plain["tested"]
    untested, _ = plain["untested"]
    longer, longer_recorder = plain["longer"]
    # no client test in the last round: the clients validate the final model once more
    (event,) = events(untested.run_dir, "final_model_scored")
    assert event["via"] == "validation_pass"
    assert best_record(untested.run_dir) == best_record(tested.run_dir)
    # and what they say of it is what they say of it when they receive it in a fourth round
    assert best_record(tested.run_dir)["clients"] == {
        c: {"value": v, "weight": 1.0} for c, v in longer_recorder.values()[3].items()
    }
    assert logged_scores(longer.run_dir)[3] == best_record(tested.run_dir)["metric"]


# -- the mode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["min", "max"])
def test_mode_decides_between_the_lowest_and_the_highest_loss(mode: str, tmp_path: Path) -> None:
    selection = {"validation_metric_name": "initial_validation", "key_metric": "loss", "mode": mode}
    result, recorder = run(
        tmp_path,
        ["degrade", "model_selection"],
        {"degrade": Degrade({3, 4})},
        selection,
        job={"rounds": 4},
    )
    expected = by_hand(recorder, "initial_validation", "loss")
    assert logged_scores(result.run_dir) == pytest.approx(expected, rel=1e-12)
    best = pick(expected, mode)
    record = best_record(result.run_dir)
    assert record["round"] == best and record["mode"] == mode
    assert record["metric_name"] == "initial_validation.loss"
    assert tensor_bytes(result.run_dir / "best_model.safetensors") == tensor_bytes(
        round_model(result.run_dir, best)
    )
    if mode == "min":
        assert best == 2  # the lowest loss: the last model before the damage
    else:
        assert best in (3, 4)  # "higher is better" on a loss keeps a broken model


# -- weights ------------------------------------------------------------------------------------


def test_client_weights_and_local_iterations_weigh_the_mean_as_specified(tmp_path: Path) -> None:
    weights = {"client-0": 3.0, "client-2": 0.5}
    result, recorder = run(
        tmp_path,
        ["model_selection"],
        {},
        {"weigh_by_local_iter": True, "aggregation_weights": weights},
        task={"hidden": 32, "partition": "dirichlet", "alpha": 0.5},
    )
    iterations = {c: it for c, (_, it) in recorder.reports[3].items()}
    assert len(set(iterations.values())) > 1, "the clients should differ in local iterations"
    expected, unweighted = {}, {}
    for round, reports in recorder.reports.items():
        values = {c: m[ACCURACY] for c, (m, _) in reports.items()}
        w = {c: weights.get(c, 1.0) * it for c, (_, it) in reports.items()}
        expected[round - 1] = weighted(values, w)
        unweighted[round - 1] = sum(values.values()) / len(values)
    # the final model: the clients' test of it, weighed by their last reported iterations
    finals = {c: t["accuracy"] for c, t in recorder.tests[3].items()}
    expected[3] = weighted(finals, {c: weights.get(c, 1.0) * iterations[c] for c in finals})
    assert logged_scores(result.run_dir) == pytest.approx(expected, rel=1e-12)
    assert any(abs(expected[m] - unweighted[m]) > 1e-3 for m in unweighted), "weights had no effect"
    record = best_record(result.run_dir)
    assert record["round"] == pick(expected)
    model_round = record["round"]
    source = recorder.reports[model_round + 1] if model_round < 3 else None
    for client, entry in record["clients"].items():
        its = source[client][1] if source else iterations[client]
        assert entry["weight"] == weights.get(client, 1.0) * its


def test_a_zero_weight_leaves_a_client_out(tmp_path: Path) -> None:
    result, recorder = run(
        tmp_path,
        ["model_selection"],
        {},
        {"aggregation_weights": {"client-1": 0.0}},
        job={"rounds": 2},
    )
    values = recorder.values()
    expected = {m: (v["client-0"] + v["client-2"]) / 2 for m, v in values.items()}
    assert {m: logged_scores(result.run_dir)[m] for m in expected} == pytest.approx(expected)
    for line in metrics_lines(result.run_dir):
        assert line["model_selection"]["skipped"]["client-1"].startswith("weight 0")
    assert "client-1" not in best_record(result.run_dir)["clients"]


# -- what clients report that cannot count ------------------------------------------------------


def test_a_nan_metric_is_refused_by_the_core_and_the_others_count(tmp_path: Path) -> None:
    result, recorder = run(
        tmp_path,
        ["nan", "model_selection"],
        {"nan": NaNValidation("client-1", round=2)},
        job={"min_clients": 2},
    )
    reports = recorder.reports[2]
    assert "client-1" not in reports  # refused before any plugin saw it
    (refused,) = [e for e in events(result.run_dir, "contribution_refused") if e["round"] == 2]
    assert refused["client"] == "client-1" and "not finite" in refused["reason"]
    line = metrics_lines(result.run_dir)[1]
    others = [reports[c][0][ACCURACY] for c in ("client-0", "client-2")]
    assert line["model_selection"]["scores"]["1"] == pytest.approx(sum(others) / 2, rel=1e-12)
    assert not events(result.run_dir, "model_selection_skipped")


def test_missing_and_non_numeric_metrics_are_skipped_and_logged(tmp_path: Path) -> None:
    metric = ClientMetric("custom_score", {"client-0": 0.25, "client-1": "high"})  # client-2: none
    result, _ = run(
        tmp_path,
        ["custom", "model_selection"],
        {"custom": metric},
        {"validation_metric_name": "custom_score"},
        job={"rounds": 2},
    )
    skipped = events(result.run_dir, "model_selection_skipped")
    by_round = {(e["round"], e["client"]): e["reason"] for e in skipped}
    for round in (1, 2):
        assert by_round[(round, "client-1")] == "metric 'custom_score' is not a number: str 'high'"
        assert by_round[(round, "client-2")].startswith("metric 'custom_score' missing (reported: ")
    assert logged_scores(result.run_dir) == {0: 0.25, 1: 0.25}
    record = best_record(result.run_dir)
    assert record["round"] == 0  # a tie keeps the earlier model
    assert set(record["skipped"]) == {"client-1", "client-2"}
    # a training metric says nothing about the final model: it is left unscored, and said so
    (unscored,) = events(result.run_dir, "final_model_unscored")
    assert unscored["round"] == 2 and unscored["level"] == "warning"
    assert "validation of the final model has no 'custom_score'" in unscored["reason"]
    assert len(skipped) == 4  # no skip per client for the final model


def test_a_mapping_without_key_metric_keeps_no_model_and_says_why(tmp_path: Path) -> None:
    result, _ = run(
        tmp_path,
        ["model_selection"],
        {},
        {"validation_metric_name": "initial_validation"},
        job={"rounds": 2},
    )
    reasons = {e["reason"] for e in events(result.run_dir, "model_selection_skipped")}
    assert reasons == {
        "metric 'initial_validation' is a mapping; set key_metric to one of its entries "
        "(accuracy, loss)"
    }
    assert not (result.run_dir / "best_model.safetensors").exists()
    assert not (result.run_dir / "best_model.json").exists()
    (warning,) = events(result.run_dir, "no_best_model")
    assert warning["level"] == "warning"


# -- state ----------------------------------------------------------------------------------


def test_startup_resets_a_handler_used_for_a_second_run(tmp_path: Path) -> None:
    handler = ModelSelectionHandler(ModelSelectionSettings())
    first = run_job(
        digits_job(job={"rounds": 2}),
        out=tmp_path / "a",
        extra_plugins={"model_selection": handler},
    )
    second = run_job(
        digits_job(job={"rounds": 2}),
        out=tmp_path / "b",
        extra_plugins={"model_selection": handler},
    )
    assert best_record(first.run_dir) == best_record(second.run_dir)
    assert [e["model_round"] for e in events(second.run_dir, "best_model_selected")] == [
        e["model_round"] for e in events(first.run_dir, "best_model_selected")
    ]
    assert handler.files.run_dir == second.run_dir and not handler.files.pending


def test_the_selection_is_the_same_when_clients_run_in_worker_processes(
    plain: Any, tmp_path: Path
) -> None:
    # the final model's extra validation goes through the runtime like any client request
    sequential, _ = plain["untested"]
    job = digits_job(job={"workers": 2}, trainer={"skip_model_tests": True})
    pooled = run_job(job, out=tmp_path / "run").run_dir
    (event,) = events(pooled, "final_model_scored")
    assert event["via"] == "validation_pass" and event["clients"] == 3
    for name in ("best_model.safetensors", "best_model.json"):
        assert (pooled / name).read_bytes() == (sequential.run_dir / name).read_bytes()
