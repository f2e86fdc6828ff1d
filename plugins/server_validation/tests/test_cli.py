"""End to end through the ``flcore`` command, as a user runs it: a job file on disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from server_validation_helpers import saved_model

from flcore import Job
from flcore.cli import main
from flcore.run import prepare

REPO = Path(__file__).resolve().parents[3]

JOB = """\
[job]
name = "server-validation"
task = "examples.digits"
rounds = 10
clients = 2
seed = 0
keep_round_models = true

[task]
hidden = 32

[trainer]
skip_model_tests = true

[local]
epochs = 1
lr = 0.1

[plugins]
chain = ["server_validation"]

[plugins.server_validation]
num_rounds_per_valid = 3
"""


@pytest.fixture(scope="module")
def job_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("job") / "job.toml"
    path.write_text(JOB)
    return path


@pytest.fixture(scope="module")
def cli_run(job_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """``flcore run job.toml --out DIR`` in a fresh process: (run dir, stdout, stderr)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "flcore", "run", str(job_file), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return out, done.stdout, done.stderr


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_third_round_and_the_last_are_validated(cli_run: tuple[Path, str, str]) -> None:
    run_dir, stdout, stderr = cli_run
    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == list(range(1, 11))
    assert [m["round"] for m in lines if "server" in m] == [3, 6, 9, 10]
    assert all(set(m["server"]) == {"loss", "accuracy"} for m in lines if "server" in m)
    # The console's round lines carry the server's metrics on those rounds only.
    round_lines = [line for line in stderr.splitlines() if line.startswith("round ")]
    assert len(round_lines) == 10
    shown = [
        int(re.match(r"round (\d+)/10", line).group(1))  # type: ignore[union-attr]
        for line in round_lines
        if "server.loss=" in line and "server.accuracy=" in line
    ]
    assert shown == [3, 6, 9, 10]
    final = json.loads(stdout.split("final metrics: ", 1)[1])
    assert final["server"] == lines[-1]["server"]


def test_the_metrics_equal_the_saved_models_evaluated_directly(
    cli_run: tuple[Path, str, str], job_file: Path
) -> None:
    run_dir, _, _ = cli_run
    ctx = prepare(Job.load(job_file)).ctx
    data = ctx.task.server_data()
    for line in metrics(run_dir):
        if "server" in line:
            model = saved_model(run_dir, line["round"], ctx.task)
            assert line["server"] == ctx.ask("evaluate", model=model, data=data)
    assert metrics(run_dir)[-1]["server"]["accuracy"] > 0.5  # scored on data no client holds


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("num_rounds_per_valid = 3", "num_rounds_per_valid = 0"),
            "[plugins.server_validation]: num_rounds_per_valid must be at least 1 (validate on "
            "every N-th round and on the last one), got 0",
        ),
        (
            ('task = "examples.digits"', 'task = "server_validation_helpers:NoServerDataTask"'),
            "task 'server_validation_helpers:NoServerDataTask' has no server_data(); add a "
            "server_data()",
        ),
        (
            ("num_rounds_per_valid = 3", 'evaluator = "metrics_of_mine:score"'),
            "[plugins.server_validation].evaluator: cannot import module 'metrics_of_mine' of "
            "evaluator 'metrics_of_mine:score': ModuleNotFoundError",
        ),
    ],
)
def test_flcore_validate_refuses_with_the_reason(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    text = JOB.replace(*edit)
    if "NoServerDataTask" in text:
        text = text.replace("[task]\nhidden = 32\n", "")  # that task takes no settings
    path = tmp_path / "job.toml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {path}: [plugins.server_validation]") or error.startswith(
        f"error: plugin 'server_validation' refuses the job: {path}: [plugins.server_validation]"
    )
    assert message in error


def test_flcore_validate_accepts_the_job(job_file: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(job_file)])
    assert result.exit_code == 0, result.output
    assert "chain server_validation" in result.stdout
