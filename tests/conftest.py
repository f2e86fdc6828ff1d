"""Fixtures shared by the core's tests: small, fast digits jobs and run helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flcore.job import Job

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # examples.digits is importable as in a run from the root


def small_job(chain: list[str] | None = None, **sections: dict[str, Any]) -> Job:
    """A digits job small enough for a unit test: 3 clients, 2 rounds, a narrow MLP."""
    data: dict[str, Any] = {
        "job": {"name": "small", "task": "examples.digits", "rounds": 2, "clients": 3, "seed": 0},
        "task": {"hidden": 16},
        "local": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "plugins": {"chain": chain or []},
    }
    for section, values in sections.items():
        if section.startswith("plugins."):
            data["plugins"][section.split(".", 1)[1]] = values
        else:
            data.setdefault(section, {}).update(values)
    return Job.from_dict(data, source="small.toml")


def flcore_in(
    python: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m flcore ARGS`` from the repo root, as a user runs it, with ``env`` added to
    this process's environment."""
    return subprocess.run(
        [str(python), "-m", "flcore", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def three_rounds() -> Job:
    """:func:`small_job` with three rounds: long enough to cut and resume in the middle."""
    return small_job(job={"rounds": 3})


@pytest.fixture(scope="session")
def whole(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The final global model of the uninterrupted :func:`three_rounds` run, which the
    resume tests end on."""
    from flcore.run import run_job

    out = tmp_path_factory.mktemp("whole") / "run"
    return run_job(three_rounds(), out=out).global_model_path.read_bytes()


@pytest.fixture(scope="session")
def plugin_env_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An environment with flcore and tests/fixtures/test_plugins pip-installed (built from
    source, as a third party's distribution), without the repo's own plugins."""
    from flcore.testing import install_alone

    dist = ROOT / "tests" / "fixtures" / "test_plugins"
    return install_alone(dist, "flcore-test-plugins", tmp_path_factory.mktemp("env"), ROOT).python


@pytest.fixture
def job_factory():
    return small_job


@pytest.fixture(autouse=True)
def _run_from_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
