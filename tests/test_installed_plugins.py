"""A real, separately installed plugin distribution, seen through the CLI in its own environment."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture
def python(plugin_env_python: Path) -> Path:
    return plugin_env_python


def flcore(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "flcore", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def job_file(tmp_path: Path, chain: list[str], extra: str = "", rounds: int = 2) -> Path:
    log = tmp_path / "calls.log"
    sections = "".join(
        f'\n[plugins.{name}]\nlog = "{log}"\n' for name in chain if name.startswith("recorder")
    )
    path = tmp_path / "job.toml"
    path.write_text(
        f"""
[job]
name = "plugins"
task = "examples.digits"
rounds = {rounds}
clients = 2

[task]
hidden = 8

[plugins]
chain = {json.dumps(chain)}
{sections}
{extra}
"""
    )
    return path


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


def test_flcore_plugins_lists_the_installed_distribution(python: Path) -> None:
    result = flcore(python, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    a = plugins["recorder_a"]
    assert a["distribution"] == "flcore-test-plugins" and a["version"] == "1.2.3"
    assert a["hooks"] == ["before_aggregation", "end_round", "rollback", "shutdown", "startup"]
    assert a["error"] is None and a["builtin"] is False
    assert plugins["failing"]["hooks"] == ["before_aggregation"]
    assert plugins["core.fedavg"]["builtin"] is True
    assert "swag" not in plugins  # excluded from this environment
    broken = plugins["broken"]
    assert "flcore_module_that_does_not_exist" in broken["error"]
    assert broken["hooks"] == []
    table = flcore(python, "plugins")
    assert table.returncode == 0
    assert "recorder_a" in table.stdout and "flcore-test-plugins 1.2.3" in table.stdout
    assert "FAILED" in table.stdout


def test_hooks_run_in_chain_order_and_shutdown_reversed(python: Path, tmp_path: Path) -> None:
    result = flcore(
        python,
        "run",
        str(job_file(tmp_path, ["recorder_a", "recorder_b"])),
        "--out",
        str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [
        "recorder_a startup",
        "recorder_b startup",
        "recorder_a before_aggregation",
        "recorder_b before_aggregation",
        "recorder_a end_round",
        "recorder_b end_round",
        "recorder_a before_aggregation",
        "recorder_b before_aggregation",
        "recorder_a end_round",
        "recorder_b end_round",
        "recorder_b shutdown",
        "recorder_a shutdown",
    ]


def test_reversing_the_chain_reverses_the_order(python: Path, tmp_path: Path) -> None:
    result = flcore(
        python,
        "run",
        str(job_file(tmp_path, ["recorder_b", "recorder_a"], rounds=1)),
        "--out",
        str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [
        "recorder_b startup",
        "recorder_a startup",
        "recorder_b before_aggregation",
        "recorder_a before_aggregation",
        "recorder_b end_round",
        "recorder_a end_round",
        "recorder_a shutdown",
        "recorder_b shutdown",
    ]


def test_a_failing_handler_rolls_back_and_stops_the_run(python: Path, tmp_path: Path) -> None:
    job = job_file(tmp_path, ["recorder_a", "recorder_b", "failing"], rounds=3)
    out = tmp_path / "run"
    result = flcore(
        python, "run", str(job), "--out", str(out), "--set", "job.keep_round_models=true"
    )
    assert result.returncode != 0
    assert "plugin 'failing' raised in 'before_aggregation'" in result.stderr
    assert "Round 2 failed" in result.stderr
    assert "last completed round (1) is kept" in result.stderr
    # both handlers that already handled before_aggregation in round 2 rolled back, last first
    assert calls(tmp_path)[-6:] == [
        "recorder_a before_aggregation",
        "recorder_b before_aggregation",
        "recorder_b rollback",
        "recorder_a rollback",
        "recorder_b shutdown",
        "recorder_a shutdown",
    ]
    saved = (out / "global_model.safetensors").read_bytes()
    assert saved == (out / "rounds" / "0001" / "global_model.safetensors").read_bytes()
    assert json.loads((out / "checkpoint.json").read_text())["round"] == 1
    rounds = [
        json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert rounds == [1]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    failed = [e for e in events if e["event"] == "handler_failed"]
    assert failed and failed[0]["plugin"] == "failing" and failed[0]["hook"] == "before_aggregation"


def test_a_broken_plugin_stops_nothing_unless_named(python: Path, tmp_path: Path) -> None:
    ok = flcore(python, "run", str(job_file(tmp_path, [], rounds=1)), "--out", str(tmp_path / "a"))
    assert ok.returncode == 0, ok.stderr
    named = flcore(
        python, "run", str(job_file(tmp_path, ["broken"], rounds=1)), "--out", str(tmp_path / "b")
    )
    assert named.returncode != 0
    for part in (
        "plugin 'broken'",
        "flcore-test-plugins 1.2.3",
        "ModuleNotFoundError",
        "flcore_module_that_does_not_exist",
    ):
        assert part in named.stderr
    assert not (tmp_path / "b").exists()  # stopped before training: no run directory


def test_an_unknown_plugin_lists_the_installed_ones(python: Path, tmp_path: Path) -> None:
    result = flcore(python, "validate", str(job_file(tmp_path, ["recorder_c"])))
    assert result.returncode != 0
    assert "unknown plugin 'recorder_c'" in result.stderr
    assert "broken, crash, failing, recorder_a, recorder_b" in result.stderr


def test_listing_plugins_does_not_import_torch(python: Path) -> None:
    code = (
        "import sys; from flcore.plugins import list_plugins\n"
        "names = [p.name for p in list_plugins()]\n"
        "assert 'core.fedavg' in names and 'recorder_a' in names\n"
        "assert 'torch' not in sys.modules, 'listing plugins imported torch'\n"
    )
    result = subprocess.run([str(python), "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_install_alone_makes_the_plugin_the_only_one(tmp_path: Path) -> None:
    from flcore.testing import install_alone

    alone = install_alone(
        ROOT / "tests" / "fixtures" / "test_plugins", "flcore-test-plugins", tmp_path, cwd=ROOT
    )
    listed = alone.run("-m", "flcore", "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    names = {p["name"] for p in json.loads(listed.stdout) if not p["builtin"]}
    assert names == {"recorder_a", "recorder_b", "failing", "broken", "crash"}
    where = alone.run("-c", "import flcore_test_plugins as p; print(p.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(alone.root)  # the copy, not the source
    assert not list((ROOT / "tests" / "fixtures" / "test_plugins").glob("*.egg-info"))
