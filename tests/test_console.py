"""The core's progress display: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import io
from typing import Any

import pytest

from flcore.chain import Chain
from flcore.context import ServerContext
from flcore.defaults import console
from flcore.logging import make_logger
from tests.conftest import small_job


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def context(mode: Any, round_: int) -> ServerContext:
    job = small_job(job={"rounds": 4, "clients": 3})
    ctx = ServerContext(job=job, task=None, chain=Chain([]), log=make_logger(), console=mode)  # type: ignore[arg-type]
    ctx.round = round_
    ctx.metrics = {
        "round": round_,
        "clients": ["client-0", "client-1"],
        "refused": ["client-2: NaN"],
        "test": {"accuracy": 0.91234},
    }
    return ctx


def test_a_terminal_gets_a_bar_that_ends_with_the_last_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = Terminal()
    monkeypatch.setattr("sys.stderr", out)
    console.end_round(context("console", 2))
    console.end_round(context("console", 4))
    text = out.getvalue()
    assert text.startswith("\r[############............] round 2/4  clients 2/3  refused 1")
    assert "test.accuracy=0.9123" in text
    assert text.endswith("\n") and text.count("\n") == 1


def test_elsewhere_one_plain_line_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    console.end_round(context("console", 1))
    assert out.getvalue() == "round 1/4  clients 2/3  refused 1  test.accuracy=0.9123\n"


def test_quiet_and_json_print_no_round_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    console.end_round(context("quiet", 1))
    console.end_round(context("json", 1))
    assert out.getvalue() == ""
