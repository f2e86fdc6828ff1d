"""``source = "server"``: the new global model is scored by the server's metric in
``after_aggregation``, on the rounds that have one; the README's recipe runs as written."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from flcore_model_selection import ModelSelectionSettings
from selection_support import (
    Degrade,
    ServerEval,
    best_record,
    digits_job,
    events,
    metrics_lines,
    pick,
    round_model,
    tensor_bytes,
)

from flcore import Job, run_job
from flcore.settings import build_settings

README = Path(__file__).resolve().parents[1] / "README.md"
SERVER = {"source": "server", "key_metric": "accuracy", "mode": "max"}


def test_each_server_score_belongs_to_the_model_of_its_own_round(tmp_path: Path) -> None:
    # the server validates rounds 2 and 4; round 4's model is broken
    server = ServerEval({2, 4})
    result = run_job(
        digits_job(["degrade", "server_validation", "model_selection"], SERVER, job={"rounds": 4}),
        out=tmp_path / "run",
        extra_plugins={"degrade": Degrade({4}), "server_validation": server},
    )
    run_dir = result.run_dir
    expected = {r: m["accuracy"] for r, m in server.scores.items()}
    assert sorted(expected) == [2, 4]
    lines = metrics_lines(run_dir)
    assert [line["model_selection"]["scores"] for line in lines] == [
        {},
        {"2": expected[2]},
        {},
        {"4": expected[4]},
    ]
    assert [line["model_selection"].get("best_round") for line in lines] == [None, 2, 2, 2]
    assert pick(expected) == 2
    record = best_record(run_dir)
    assert record == {
        **record,
        "round": 2,
        "scored_in_round": 2,
        "metric": expected[2],
        "metric_name": "server.accuracy",
        "source": "server",
        "clients": {},
        "final": False,
    }
    assert tensor_bytes(run_dir / "best_model.safetensors") == tensor_bytes(round_model(run_dir, 2))
    assert [(e["round"], e["model_round"]) for e in events(run_dir, "model_scored")] == [
        (2, 2),
        (4, 4),
    ]
    assert events(run_dir, "final_model_scored") == []  # the server scored the final model


def test_a_last_round_without_a_server_score_is_reported(tmp_path: Path) -> None:
    result = run_job(
        digits_job(["server_validation", "model_selection"], SERVER, job={"rounds": 2}),
        out=tmp_path / "run",
        extra_plugins={"server_validation": ServerEval({1})},
    )
    (warning,) = events(result.run_dir, "final_model_unscored")
    assert warning["round"] == 2 and "server.accuracy" in warning["reason"]
    assert best_record(result.run_dir)["round"] == 1


def test_an_unusable_server_metric_is_skipped_and_logged(tmp_path: Path) -> None:
    selection = {**SERVER, "key_metric": "f1"}  # the server reports loss and accuracy only
    result = run_job(
        digits_job(["server_validation", "model_selection"], selection, job={"rounds": 2}),
        out=tmp_path / "run",
        extra_plugins={"server_validation": ServerEval({1, 2})},
    )
    unscored = events(result.run_dir, "model_selection_unscored")
    assert [e["round"] for e in unscored] == [1, 2]
    assert unscored[0]["reason"] == "metric 'server' has no entry 'f1' (entries: accuracy, loss)"
    assert metrics_lines(result.run_dir)[0]["model_selection"]["skipped"] == {
        "server": unscored[0]["reason"]
    }
    assert not (result.run_dir / "best_model.safetensors").exists()


def readme_recipe() -> dict:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    recipes = [tomllib.loads(b) for b in blocks if 'source = "server"' in b]
    assert len(recipes) == 1, "the README has one server recipe"
    return recipes[0]


def test_the_readme_recipe_is_a_valid_selection_by_the_server() -> None:
    recipe = readme_recipe()
    assert recipe["plugins"]["chain"] == ["server_validation", "model_selection"]
    settings = build_settings(
        ModelSelectionSettings, recipe["plugins"]["model_selection"], "README"
    )
    assert (settings.source, settings.key_metric, settings.mode) == ("server", "accuracy", "max")


def test_the_readme_recipe_runs_with_the_server_validation_plugin(tmp_path: Path) -> None:
    pytest.importorskip("flcore_server_validation", reason="needs flcore-server-validation")
    recipe = readme_recipe()
    recipe["job"].update(rounds=4, clients=3, keep_round_models=True)
    recipe["task"] = {"hidden": 32}
    recipe["local"] = {"batch_size": 16, "lr": 0.1, "momentum": 0.9}
    result = run_job(Job.from_dict(recipe, source="README recipe"), out=tmp_path / "run")
    lines = metrics_lines(result.run_dir)
    server = {line["round"]: line["server"]["accuracy"] for line in lines if "server" in line}
    assert sorted(server) == [2, 4]  # num_rounds_per_valid = 2, and the last round
    scores = {int(m): v for line in lines for m, v in line["model_selection"]["scores"].items()}
    assert scores == server
    record = best_record(result.run_dir)
    assert record["round"] == pick(server) and record["metric"] == server[record["round"]]
    assert tensor_bytes(result.run_dir / "best_model.safetensors") == tensor_bytes(
        round_model(result.run_dir, record["round"])
    )
