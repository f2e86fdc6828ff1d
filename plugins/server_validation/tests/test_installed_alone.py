"""Installed alone beside the core (no swag, no model_selection), the plugin works and its
tests pass: what a user gets from ``pip install ./plugins/server_validation``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from flcore.testing import isolated_python

TESTS = Path(__file__).resolve().parent
PLUGIN = TESTS.parent
REPO = PLUGIN.parents[1]


def test_installed_alone_its_tests_pass(tmp_path: Path) -> None:
    # Install a copy, so the build leaves nothing in the source tree other sessions share.
    source = tmp_path / "src"
    shutil.copytree(
        PLUGIN, source, ignore=shutil.ignore_patterns("*.egg-info", "build", "tests", "__pycache__")
    )
    python = isolated_python(
        tmp_path / "env", exclude=["flcore-server-validation"], only_plugins=[], install=[source]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )

    where = run("-c", "import flcore_server_validation as p; print(p.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "env")  # the installed copy

    listed = run("-m", "flcore", "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout) if not p["builtin"]}
    assert set(plugins) == {"server_validation"}
    assert plugins["server_validation"]["distribution"] == "flcore-server-validation"
    assert plugins["server_validation"]["error"] is None
    assert "after_aggregation" in plugins["server_validation"]["hooks"]

    tests = run(
        "-m",
        "pytest",
        str(TESTS),
        "-q",
        "-p",
        "no:cacheprovider",
        "-rs",
        "--ignore",
        str(Path(__file__)),
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    summary = tests.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed, 1 skipped in .*", summary), summary
    # The one skipped module is the composed stack: model_selection is not installed.
    assert "could not import 'flcore_model_selection'" in tests.stdout
