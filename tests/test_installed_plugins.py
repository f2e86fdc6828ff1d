"""A real, separately installed plugin distribution, seen through the CLI in its own environment."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.conftest import flcore_in as flcore


@pytest.fixture
def python(plugin_env_python: Path) -> Path:
    return plugin_env_python


#: The test plugins that write to a log file named in their settings.
LOGGING = {"recorder_a", "recorder_b", "watcher", "early"}


def job_file(tmp_path: Path, chain: list[str], extra: str = "", rounds: int = 2) -> Path:
    log = tmp_path / "calls.log"
    sections = "".join(f'\n[plugins.{name}]\nlog = "{log}"\n' for name in chain if name in LOGGING)
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
    assert plugins["watcher"]["hooks"] == ["end_round"] and plugins["watcher"]["error"] is None
    table = flcore(python, "plugins")
    assert table.returncode == 0
    assert "recorder_a" in table.stdout and "flcore-test-plugins 1.2.3" in table.stdout
    assert "FAILED" in table.stdout


def test_hooks_pluggy_would_never_call_are_refused_when_the_plugin_loads(
    python: Path, tmp_path: Path
) -> None:
    plugins = {p["name"]: p for p in json.loads(flcore(python, "plugins", "--json").stdout)}
    typo = (
        "plugin 'typo' (distribution flcore-test-plugins 1.2.3) implements 'end_rond', "
        "which is no flcore hook (did you mean 'end_round'?)"
    )
    wrong = (
        "plugin 'wrong_argument' (distribution flcore-test-plugins 1.2.3) implements "
        "'end_round' with argument 'colour', which 'end_round' does not have "
        "(its arguments: ctx)"
    )
    assert (plugins["typo"]["error"], plugins["typo"]["hooks"]) == (typo, [])
    assert (plugins["wrong_argument"]["error"], plugins["wrong_argument"]["hooks"]) == (wrong, [])
    table = flcore(python, "plugins").stdout.splitlines()
    assert any(line.startswith("typo ") and line.endswith(f"FAILED: {typo}") for line in table)
    for name, message in (("typo", typo), ("wrong_argument", wrong)):
        out = tmp_path / name
        result = flcore(python, "run", str(job_file(tmp_path, [name])), "--out", str(out))
        assert result.returncode == 1 and f"error: {message}" in result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()  # refused before anything trained


def test_a_wrapper_sees_each_end_round_and_the_chains_result_and_tryfirst_runs_first(
    python: Path, tmp_path: Path
) -> None:
    chain = ["recorder_a", "watcher", "recorder_b", "early"]
    result = flcore(python, "run", str(job_file(tmp_path, chain)), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    rounds = [
        [
            "recorder_a before_aggregation",
            "recorder_b before_aggregation",
            f"watcher end_round {n} begins",  # the wrapper is outermost, wherever it is
            "early end_round",  # tryfirst: before the handlers earlier in the chain
            "recorder_a end_round",
            "recorder_b end_round",
            # the chain's result: every answer other than None (the core's console gives none)
            f"watcher end_round {n} returned ['recorder_a', 'recorder_b']",
        ]
        for n in (1, 2)
    ]
    assert calls(tmp_path) == [
        "recorder_a startup",
        "recorder_b startup",
        *rounds[0],
        *rounds[1],
        "recorder_b shutdown",
        "recorder_a shutdown",
    ]


def test_a_plugin_adds_a_command_and_a_broken_one_stops_no_command(
    python: Path, tmp_path: Path
) -> None:
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    for attempt in ("scans the plugins", "reads the cache"):
        hello = flcore(python, "hello", "--name", "tester", env=cache)
        assert hello.returncode == 0, (attempt, hello.stderr)
        assert hello.stdout == "hello, tester, from a plugin\n"
        warnings = hello.stderr.splitlines()
        assert all(w.startswith("warning: plugin ") for w in warnings), (attempt, warnings)
        assert any(
            "plugin 'broken' (distribution flcore-test-plugins 1.2.3" in w
            and "failed to load: ModuleNotFoundError" in w
            for w in warnings
        )
        assert (
            "warning: plugin 'raising_commands' adds no commands: RuntimeError: no commands today"
            in warnings
        )
        assert (
            "warning: plugin 'hijacking_commands' adds no commands: PluginError: it would "
            "replace flcore's own run" in warnings
        )
        assert (tmp_path / "cache" / "flcore" / "commands.json").exists()
    listed = flcore(python, "--help", env=cache)
    assert listed.returncode == 0 and "hello" in listed.stdout
    assert "half-added" not in listed.stdout and "half_added" not in listed.stdout
    # flcore run is still flcore's own
    assert "error: give a JOB_FILE" in flcore(python, "run", env=cache).stderr


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
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    installed = error.split("installed plugins: ", 1)[1].split(", ")
    assert installed == sorted(installed)
    assert {"broken", "crash", "failing", "recorder_a", "recorder_b", "watcher"} <= set(installed)


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
    assert {"recorder_a", "recorder_b", "failing", "broken", "crash", "watcher", "hello"} <= names
    assert not {"swag", "model_selection", "server_validation", "ray"} & names
    where = alone.run("-c", "import flcore_test_plugins as p; print(p.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(alone.root)  # the copy, not the source
    assert not list((ROOT / "tests" / "fixtures" / "test_plugins").glob("*.egg-info"))
