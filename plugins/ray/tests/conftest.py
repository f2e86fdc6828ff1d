"""Fixtures of the ray plugin's tests: a local Ray instance of two CPUs per test module.
The helpers the tests share are in ``ray_helpers``."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parents[2]
for path in (ROOT, TESTS):  # examples.digits, ray_helpers and ray_tasks import from here
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """``ray.init(num_cpus=2)``, shut down after the module. Its workers start in the repo
    root with this directory on their path, so that they import the test tasks."""
    import ray

    before = Path.cwd()
    os.chdir(ROOT)
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}},
        )
        yield
    finally:
        ray.shutdown()
        os.chdir(before)


@pytest.fixture(autouse=True)
def _run_from_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
