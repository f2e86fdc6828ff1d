"""Fixtures of the swag plugin's tests; the helpers they share are in ``swag_helpers``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parents[2]
for path in (ROOT, TESTS):  # examples.digits, swag_helpers and swag_tasks import from here
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from swag_helpers import EXAMPLE_JOB  # noqa: E402

from flcore import Job, RunResult, run_job  # noqa: E402


@pytest.fixture(autouse=True)
def _run_from_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunResult]:
    """The example job ``examples/digits/swag.toml``, run once for every test that needs a
    finished SWAG run on real data."""
    out = tmp_path_factory.mktemp("example") / "run"
    yield run_job(Job.load(EXAMPLE_JOB), out=out)
