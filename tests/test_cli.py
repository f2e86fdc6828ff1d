"""The ``flcore`` command, run as a user runs it: a subprocess on real TOML files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DIGITS = ROOT / "examples" / "digits" / "job.toml"


def flcore(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flcore", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_digits_example_reaches_90_percent_with_its_defaults(tmp_path: Path) -> None:
    result = flcore("run", str(DIGITS), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert f"run directory: {tmp_path / 'run'}" in result.stdout
    final = json.loads(result.stdout.split("final metrics: ", 1)[1])
    assert final["test"]["accuracy"] >= 0.90
    assert final["round"] == 20
    # not a terminal: one plain progress line per round
    lines = [line for line in result.stderr.splitlines() if line.startswith("round ")]
    assert len(lines) == 20 and lines[-1].startswith("round 20/20  clients 10/10")
    assert "test.accuracy=" in lines[-1]


def test_overrides_and_json_console(tmp_path: Path) -> None:
    result = flcore(
        "run",
        str(DIGITS),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "job.rounds=2",
        "--set",
        "job.clients=3",
        "--set",
        "task.hidden=8",
        "--log-format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    rounds = [r for r in records if r["event"] == "round_end"]
    assert [r["round"] for r in rounds] == [1, 2]
    resolved = (tmp_path / "run" / "job.toml").read_text()
    assert "rounds = 2" in resolved and "hidden = 8" in resolved


def test_validate_checks_without_training(tmp_path: Path) -> None:
    ok = flcore("validate", str(DIGITS))
    assert ok.returncode == 0 and "ok (20 rounds, 10 clients" in ok.stdout
    bad = flcore("validate", str(DIGITS), "--set", "local.lr=fast")
    assert bad.returncode == 1
    assert f"error: {DIGITS}: [local].lr: expected float, got str 'fast'" in bad.stderr
    missing = tmp_path / "job.toml"
    missing.write_text('[job]\ntask = "examples.nothing_here"\n')
    result = flcore("validate", str(missing))
    assert result.returncode == 1
    assert "[job].task: cannot import task module 'examples.nothing_here'" in result.stderr
    no_task = tmp_path / "job2.toml"
    no_task.write_text('[job]\nname = "x"\n')
    assert "[job] is missing 'task'" in flcore("validate", str(no_task)).stderr


def test_a_task_without_its_functions_is_refused(tmp_path: Path) -> None:
    (tmp_path / "hollow_task.py").write_text("def model():\n    return None\n")
    job = tmp_path / "job.toml"
    job.write_text('[job]\ntask = "hollow_task"\n')
    result = flcore("validate", str(job), cwd=tmp_path)
    assert result.returncode == 1
    assert "task 'hollow_task' has no client_data()" in result.stderr
    job.write_text('[job]\ntask = "examples.digits"\n[task]\ncolour = "red"\n')
    result = flcore("validate", str(job))
    assert "[task]: unknown key 'colour'" in result.stderr


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from flcore.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import flcore; from flcore import hookimpl\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout and "plugins" in result.stdout


def test_a_missing_job_file_is_a_clear_error(tmp_path: Path) -> None:
    result = flcore("run", str(tmp_path / "none.toml"))
    assert result.returncode == 1
    assert re.search(r"error: cannot read job file '.*none\.toml'", result.stderr)


def test_flcore_hooks_lists_the_hooks_installed_plugins_declare() -> None:
    from flcore.plugins import installed_entry_points

    result = flcore("hooks")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["end_round"][:4] == ["end_round", "handler", "server", "core"]
    if "swag" not in installed_entry_points():
        pytest.skip("the swag plugin is not installed here")
    assert rows["end_swag_round"][:4] == ["end_swag_round", "handler", "server", "swag"]
    assert " ".join(rows["end_swag_round"][4:]).startswith("The SWAG round is complete")
