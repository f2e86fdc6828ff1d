from __future__ import annotations

from typing import Any

import pytest

from flcore import hookimpl
from flcore.chain import Chain
from flcore.context import FLContext
from flcore.errors import HandlerFailed, JobError, PluginError
from flcore.logging import make_logger
from flcore.testing import RecordingPlugin
from tests.conftest import small_job


def context(chain: Chain) -> FLContext:
    job = small_job()
    return FLContext(job=job, task=None, chain=chain, log=make_logger())  # type: ignore[arg-type]


def test_handlers_run_in_chain_order_then_the_defaults() -> None:
    calls: list[tuple[str, str]] = []
    chain = Chain([("b", RecordingPlugin("b", calls)), ("a", RecordingPlugin("a", calls))])
    ctx = context(chain)
    chain.fire("start_round", ctx)
    chain.fire("shutdown", ctx)
    assert calls == [
        ("b", "start_round"),
        ("a", "start_round"),
        ("a", "shutdown"),
        ("b", "shutdown"),
    ]
    assert chain.names[:2] == ("b", "a") and chain.names[2].startswith("core.")
    # pm.hook calls follow the chain as well
    calls.clear()
    chain.pm.hook.start_round(ctx=ctx)
    assert calls == [("b", "start_round"), ("a", "start_round")]


def test_a_strategy_answer_comes_from_the_first_plugin_that_gives_one() -> None:
    class Silent:
        @hookimpl
        def aggregate(self, ctx: Any, contributions: Any) -> None:
            return None

    class Answers:
        def __init__(self, value: str) -> None:
            self.value = value

        @hookimpl
        def aggregate(self, ctx: Any, contributions: Any) -> str:
            return self.value

    chain = Chain([("s", Silent()), ("x", Answers("x")), ("y", Answers("y"))])
    assert chain.ask("aggregate", context(chain), contributions=[]) == "x"
    chain = Chain([("y", Answers("y")), ("x", Answers("x"))])
    assert chain.ask("aggregate", context(chain), contributions=[]) == "y"


def test_a_raising_handler_rolls_back_those_that_ran_in_reverse() -> None:
    calls: list[tuple[str, str]] = []

    class Raiser:
        @hookimpl
        def start_round(self, ctx: Any) -> None:
            raise KeyError("nope")

    chain = Chain(
        [
            ("a", RecordingPlugin("a", calls)),
            ("b", RecordingPlugin("b", calls)),
            ("bad", Raiser()),
            ("c", RecordingPlugin("c", calls)),
        ]
    )
    with pytest.raises(HandlerFailed) as err:
        chain.fire("start_round", context(chain))
    assert err.value.plugin == "bad" and err.value.event == "start_round"
    assert calls == [
        ("a", "start_round"),
        ("b", "start_round"),
        ("b", "rollback"),
        ("a", "rollback"),
    ]


def test_a_failing_rollback_is_logged_and_the_others_still_roll_back(capsys: Any) -> None:
    calls: list[tuple[str, str]] = []

    class BadRollback(RecordingPlugin):
        @hookimpl
        def rollback(self, ctx: Any) -> None:
            raise RuntimeError("cannot undo")

    class Raiser:
        @hookimpl
        def start_round(self, ctx: Any) -> None:
            raise ValueError("x")

    chain = Chain(
        [("a", RecordingPlugin("a", calls)), ("b", BadRollback("b", calls)), ("bad", Raiser())]
    )
    with pytest.raises(HandlerFailed):
        chain.fire("start_round", context(chain))
    assert calls[-1] == ("a", "rollback")
    assert "rollback_failed" in capsys.readouterr().err


def test_a_raising_strategy_names_the_plugin() -> None:
    class Raiser:
        @hookimpl
        def aggregate(self, ctx: Any, contributions: Any) -> None:
            raise ZeroDivisionError("bad maths")

    chain = Chain([("r", Raiser())])
    with pytest.raises(HandlerFailed, match="plugin 'r' raised in 'aggregate': ZeroDivisionError"):
        chain.ask("aggregate", context(chain), contributions=[])


def test_an_implementation_with_an_unknown_argument_is_refused() -> None:
    class Wrong:
        @hookimpl
        def start_round(self, ctx: Any, colour: str) -> None: ...

    with pytest.raises(Exception, match="colour"):
        Chain([("w", Wrong())])


def test_plugins_may_bring_their_own_hookspecs() -> None:
    from flcore import hookspec

    class Specs:
        @hookspec
        def best_model_found(self, ctx: Any, round: int) -> None:
            """Side: server."""

    seen = []

    class Announcer:
        flcore_hookspecs = Specs

    class Listener:
        @hookimpl
        def best_model_found(self, ctx: Any, round: int) -> None:
            seen.append(round)

    chain = Chain([("announcer", Announcer()), ("listener", Listener())])
    chain.fire("best_model_found", context(chain), round=4)
    assert seen == [4]


def test_for_job_configures_plugins_from_their_sections() -> None:
    import attrs

    class Configured:
        @attrs.frozen
        class Settings:
            every: int = 1

        def __init__(self, settings: Any) -> None:
            self.settings = settings

    job = small_job(["conf"], **{"plugins.conf": {"every": 3}})
    chain = Chain.for_job(job, {"conf": Configured})
    assert chain.plugin("conf").settings.every == 3
    assert chain.settings["conf"].every == 3
    bad = small_job(["conf"], **{"plugins.conf": {"every": "x"}})
    with pytest.raises(JobError, match=r"small.toml: \[plugins.conf\].every: expected int"):
        Chain.for_job(bad, {"conf": Configured})
    unknown = small_job(["conf"], **{"plugins.conf": {"evry": 3}})
    with pytest.raises(JobError, match=r"\[plugins.conf\]: unknown key 'evry'; known keys: every"):
        Chain.for_job(unknown, {"conf": Configured})


def test_a_plugin_without_settings_refuses_a_section() -> None:
    job = small_job(["plain"], **{"plugins.plain": {"x": 1}})
    with pytest.raises(JobError, match="plugin 'plain' takes no settings"):
        Chain.for_job(job, {"plain": object()})


def test_a_plugin_whose_constructor_raises_is_named() -> None:
    class Fails:
        def __init__(self) -> None:
            raise OSError("no device")

    with pytest.raises(PluginError, match="plugin 'f' could not be created: OSError: no device"):
        Chain.for_job(small_job(["f"]), {"f": Fails})


def test_core_defaults_cannot_be_named_in_the_chain() -> None:
    with pytest.raises(JobError, match=r"'core\.fedavg' is a core default"):
        Chain.for_job(small_job(["core.fedavg"]))


def test_an_unknown_plugin_lists_what_is_installed() -> None:
    with pytest.raises(
        PluginError, match="unknown plugin 'nosuch' in the chain; installed plugins: "
    ):
        Chain.for_job(small_job(["nosuch"]))
