"""Make the tests' own task/evaluator module and the repository's ``examples`` importable.

Jobs name tasks and evaluators by import path, exactly as a user's job file does, so the
modules they name must be on ``sys.path`` (also when these tests run in an environment where
the plugin was installed alone).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parents[2]

for path in (str(REPO), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Train on one thread: these models are tiny, and on a small, shared machine torch's
    thread pool spins against other processes and makes a job tens of times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
