"""Installed alone beside the core (no swag, no model_selection), the plugin works and its
tests pass: what a user gets from ``pip install ./plugins/server_validation``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from flcore.testing import install_alone

TESTS = Path(__file__).resolve().parent
PLUGIN = TESTS.parent
REPO = PLUGIN.parents[1]


def test_installed_alone_its_tests_pass(tmp_path: Path) -> None:
    alone = install_alone(PLUGIN, "flcore-server-validation", tmp_path, cwd=REPO)
    run = alone.run

    where = run("-c", "import flcore_server_validation as p; print(p.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(alone.root)  # the installed copy

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
