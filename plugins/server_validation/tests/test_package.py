"""The distribution: its entry point, its public surface, and a light import."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import flcore_server_validation
from flcore_server_validation import ServerValidationHandler, ServerValidationSettings

from flcore.plugins import implemented_hooks


def test_the_entry_point_is_the_handler_class() -> None:
    (ep,) = [ep for ep in entry_points(group="flcore.plugins") if ep.name == "server_validation"]
    assert ep.load() is ServerValidationHandler
    assert ServerValidationHandler.Settings is ServerValidationSettings
    assert set(implemented_hooks(ServerValidationHandler)) == {
        "check_job",
        "startup",
        "after_aggregation",
        "rollback",
        "shutdown",
    }


def test_the_public_surface_is_what_all_lists() -> None:
    for name in flcore_server_validation.__all__:
        assert getattr(flcore_server_validation, name) is not None


def test_importing_the_plugin_does_not_load_torch() -> None:
    # `flcore plugins` imports every installed plugin; it must answer without loading torch.
    code = "import sys, flcore_server_validation; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    )
    assert done.stdout.strip() == "False"
