"""``pip install ./plugins/swag`` beside the core: found, fast to list, and it runs a job and
``flcore predict`` from the command line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from swag_helpers import EXAMPLE_JOB, ROOT

from flcore.testing import isolated_python


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An environment with everything this one has except the editable flcore-swag, and
    flcore-swag installed from its directory (a real, non-editable install)."""
    return isolated_python(
        tmp_path_factory.mktemp("env") / "venv",
        exclude=["flcore-swag"],
        install=[ROOT / "plugins" / "swag"],
    )


def _run(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=ROOT)


def test_installed_it_is_listed_with_its_hooks(python: Path) -> None:
    where = _run(python, "-c", "import flcore_swag; print(flcore_swag.__file__)")
    assert "site-packages" in where.stdout and "plugins/swag" not in where.stdout
    listed = json.loads(_run(python, "-m", "flcore", "plugins", "--json").stdout)
    swag = next(p for p in listed if p["name"] == "swag")
    assert swag["distribution"] == "flcore-swag" and swag["error"] is None
    assert {"get_trainer_class", "client_request", "predict", "end_swag_round"} <= set(
        swag["hooks"]
    )


def test_importing_the_plugin_does_not_load_torch(python: Path) -> None:
    done = _run(python, "-c", "import sys, flcore_swag; print('torch' in sys.modules)")
    assert done.stdout.strip() == "False", done.stderr


def test_installed_it_trains_and_predicts_from_the_command_line(
    python: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    quick = ["--set", "job.rounds=2", "--set", "plugins.swag.epochs=3", "--set", "task.hidden=16"]
    done = _run(python, "-m", "flcore", "run", str(EXAMPLE_JOB), "--out", str(run_dir), *quick)
    assert done.returncode == 0, done.stderr
    assert "swag round 1/1  clients 4/4  snapshots=12" in done.stderr
    assert (run_dir / "swag.safetensors").is_file() and (run_dir / "swag.json").is_file()
    inputs = tmp_path / "noise.npy"
    np.save(inputs, np.random.default_rng(0).random((6, 64), dtype=np.float32))
    done = _run(python, "-m", "flcore", "predict", str(run_dir), str(inputs), "--samples", "4")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 6 and all(r["mutual_information"] >= 0 for r in rows)
