"""Meta-tests: every hookspec is documented and has a test of its own."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from flcore import hookspecs
from flcore.hookspec_docs import hook_names, hook_summaries

TESTS = Path(__file__).parent

STRATEGIES = {
    "select_clients",
    "server_update",
    "local_optimizer",
    "get_trainer_class",
    "get_runtime",
    "aggregate",
    "local_train",
    "evaluate",
    "predict",
    "client_request",
}
CLARA_AND_DLR = {
    "startup",
    "shutdown",
    "client_register",
    "client_quit",
    "start_round",
    "send_global_model",
    "receive_model",
    "receive_contribution",
    "before_aggregation",
    "after_aggregation",
    "end_round",
    "receive_validation_models",
    "send_validation_results",
    "send_best_model",
    "rollback",
    "test_round",
    "finish",
}


def test_every_event_of_the_contract_is_a_hookspec() -> None:
    assert set(hook_names()) >= CLARA_AND_DLR | STRATEGIES


def test_strategy_hooks_are_firstresult_and_handlers_are_not() -> None:
    for name in hook_names():
        opts = getattr(hookspecs, name).flcore_spec
        assert bool(opts.get("firstresult")) == (name in STRATEGIES), name


@pytest.mark.parametrize("name", hook_names())
def test_every_hookspec_takes_ctx_first_and_is_documented(name: str) -> None:
    fn = getattr(hookspecs, name)
    first = "cli" if name == "register_commands" else "ctx"  # no job, no context
    assert next(iter(inspect.signature(fn).parameters)) == first
    doc = inspect.getdoc(fn) or ""
    assert len(doc.splitlines()) >= 3, f"{name}: document when, where, arguments, return value"
    assert "Side: " in doc, f"{name}: say on which side it fires"


def test_every_hookspec_has_a_test_of_its_own() -> None:
    tested = set()
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_hook_"):
                tested.add(node.name.removeprefix("test_hook_"))
    missing = [n for n in hook_names() if n not in tested]
    assert not missing, f"hooks without a test_hook_<name> test: {missing}"


def test_flcore_hooks_prints_every_hook_with_its_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flcore", "hooks"], capture_output=True, text=True, check=True
    )
    lines = [line for line in result.stdout.splitlines() if line.split()[3] == "core"]
    assert len(lines) == len(hook_names())  # then the hooks installed plugins declare
    for (name, kind, side, doc), line in zip(hook_summaries(), lines, strict=True):
        assert line.split()[:3] == [name, kind, side]
        assert line.endswith(doc)


def test_the_readme_lists_every_hook() -> None:
    readme = (TESTS.parent / "README.md").read_text()
    missing = [name for name in hook_names() if f"\n{name} " not in readme]
    assert not missing, f"README's hook list lacks {missing}"
