"""``flcore run`` with model_selection in the chain: what the user sees on the console and
finds in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from selection_support import best_record, round_model, tensor_bytes

from flcore.cli import main


def test_flcore_run_shows_the_selection_per_round_and_the_best_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [
        "job.rounds=3",
        "job.clients=3",
        "job.keep_round_models=true",
        "task.hidden=32",
        "local.epochs=1",
        "local.batch_size=16",
        "local.lr=0.1",
        'plugins.chain=["model_selection"]',
        'plugins.model_selection.validation_metric_name="initial_validation"',
        'plugins.model_selection.key_metric="loss"',
        'plugins.model_selection.mode="min"',
    ]
    args = ["run", "examples/digits/job.toml", "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rounds = [line for line in result.output.splitlines() if line.startswith("round ")]
    assert len(rounds) == 3
    assert "model_selection.scores.0=" in rounds[0]
    assert "model_selection.scores.2=" in rounds[2] and "model_selection.scores.3=" in rounds[2]
    assert all("model_selection.best_round=" in line for line in rounds)
    record = best_record(out)
    assert f"model_selection.best_round={record['round']}" in rounds[-1]
    assert (
        f"best model: round {record['round']} (initial_validation.loss={record['metric']:.4g}, min)"
        f" -> {out / 'best_model.safetensors'}"
    ) in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["model_selection"]["best_round"] == record["round"]
    assert tensor_bytes(out / "best_model.safetensors") == tensor_bytes(
        round_model(out, record["round"])
    )
