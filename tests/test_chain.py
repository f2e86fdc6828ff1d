from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import pytest

from flcore import hookimpl, hookspec
from flcore.chain import Chain
from flcore.errors import HandlerFailed, JobError, PluginError
from flcore.testing import RecordingPlugin
from tests.conftest import small_job


class Log:
    """A logger that records ``(level, event, fields)``."""

    def __init__(self, records: list[Any]) -> None:
        self.records = records

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.records.append((level, event, fields))


class Ctx:
    """What the chain reads of a context: its round and its logger."""

    def __init__(self, records: list[Any] | None = None, round: int = 1) -> None:
        self.round = round
        self.records = records if records is not None else []
        self.log = Log(self.records)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.records if name == event]


def plugin(name: str, calls: list[Any], **opts: Any) -> tuple[str, Any]:
    """A plugin that records ``(name, hook)`` for a few handler hooks, with hookimpl ``opts``."""

    class Plugin:
        @hookimpl(**opts)
        def client_register(self, ctx: Any, client_id: str) -> str:
            calls.append((name, "client_register"))
            return name

        @hookimpl(**opts)
        def shutdown(self, ctx: Any) -> None:
            calls.append((name, "shutdown"))

    return name, Plugin()


# -- order --------------------------------------------------------------------------------


def test_handlers_run_in_chain_order_then_the_defaults() -> None:
    calls: list[Any] = []
    chain = Chain([plugin("b", calls), plugin("a", calls)])
    ctx = Ctx(calls)  # the core's console default logs client_register into the same list
    chain.fire("client_register", ctx, client_id="c1")
    assert [c[:2] for c in calls if c[1] != "event"] == [
        ("b", "client_register"),
        ("a", "client_register"),
        ("info", "client_register"),  # core.console, registered first, runs last
    ]
    assert chain.names[:2] == ("b", "a") and chain.names[2].startswith("core.")
    # pluggy's own call follows the chain: the order is pluggy's, not a loop of ours
    calls.clear()
    chain.pm.hook.shutdown(ctx=ctx)
    assert calls == [("b", "shutdown"), ("a", "shutdown")]


def test_shutdown_runs_in_reverse_chain_order() -> None:
    calls: list[Any] = []
    chain = Chain([plugin("a", calls), plugin("b", calls), plugin("c", calls)])
    assert chain.fire("shutdown", Ctx()) == [("c", None), ("b", None), ("a", None)]
    assert calls == [("c", "shutdown"), ("b", "shutdown"), ("a", "shutdown")]


def test_tryfirst_and_trylast_move_an_implementation_within_pluggys_order() -> None:
    calls: list[Any] = []
    chain = Chain(
        [
            plugin("last1", calls, trylast=True),
            plugin("a", calls),
            plugin("first1", calls, tryfirst=True),
            plugin("last2", calls, trylast=True),
            plugin("first2", calls, tryfirst=True),
        ]
    )
    ctx = Ctx(calls)
    chain.fire("client_register", ctx, client_id="c1")
    # tryfirst: before everything, in chain order among themselves (so one later in the chain
    # runs before an earlier plain one); trylast: after the core's defaults, and, as pluggy
    # inserts each trylast in front of the ones registered before it, in reverse chain order.
    assert [c[0] for c in calls if c[1] != "event"] == [
        "first1",
        "first2",
        "a",
        "info",  # core.console
        "last2",
        "last1",
    ]
    calls.clear()
    chain.fire("shutdown", ctx)
    # shutdown reverses each group: tryfirst still runs first, trylast last
    assert [c[0] for c in calls if c[1] != "event"] == ["first2", "first1", "a", "last1", "last2"]


# -- wrappers -----------------------------------------------------------------------------


class Wrapper:
    """A new-style wrapper of ``client_register`` and ``shutdown`` that records what it saw."""

    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen

    @hookimpl(wrapper=True)
    def client_register(self, ctx: Any, client_id: str) -> Generator[None, Any, Any]:
        self.seen.append(("before", client_id))
        try:
            result = yield
        except Exception as err:
            self.seen.append(("raised", repr(err)))
            raise
        self.seen.append(("after", result))
        return result

    @hookimpl(wrapper=True)
    def shutdown(self, ctx: Any) -> Generator[None, Any, Any]:
        self.seen.append(("before", "shutdown"))
        result = yield
        self.seen.append(("after", "shutdown"))
        return result


class Raiser:
    @hookimpl
    def client_register(self, ctx: Any, client_id: str) -> None:
        raise KeyError("nope")

    @hookimpl
    def rollback(self, ctx: Any) -> None:
        pass


def test_a_wrapper_sees_every_call_and_the_chains_result() -> None:
    seen: list[Any] = []
    chain = Chain([plugin("a", seen), plugin("b", seen), ("w", Wrapper(seen))])
    results = chain.fire("client_register", Ctx(), client_id="c1")
    chain.fire("client_register", Ctx(), client_id="c2")
    assert seen[:4] == [
        ("before", "c1"),  # outermost, although it is last in the chain
        ("a", "client_register"),
        ("b", "client_register"),
        ("after", ["a", "b"]),  # pluggy's result: every answer other than None
    ]
    assert seen[4:] == [
        ("before", "c2"),
        ("a", "client_register"),
        ("b", "client_register"),
        ("after", ["a", "b"]),
    ]
    # fire's own list: what each handler returned (the core's console returns None)
    assert results == [("a", "a"), ("b", "b"), ("core.console", None)]
    seen.clear()
    chain.fire("shutdown", Ctx())
    assert seen == [
        ("before", "shutdown"),  # still outermost when the handlers run backwards
        ("b", "shutdown"),
        ("a", "shutdown"),
        ("after", "shutdown"),
    ]


def test_a_wrapper_sees_a_handlers_error_and_the_raiser_keeps_the_blame() -> None:
    seen: list[Any] = []
    chain = Chain([("w", Wrapper(seen)), plugin("a", seen), ("bad", Raiser())])
    ctx = Ctx()
    with pytest.raises(HandlerFailed) as err:
        chain.fire("client_register", ctx, client_id="c1")
    assert seen == [("before", "c1"), ("a", "client_register"), ("raised", "KeyError('nope')")]
    assert (err.value.plugin, err.value.event) == ("bad", "client_register")
    assert isinstance(err.value.error, KeyError)
    assert ctx.events("handler_failed") == [
        {"plugin": "bad", "hook": "client_register", "round": 1, "error": "KeyError: 'nope'"}
    ]


def test_a_wrapper_that_raises_its_own_error_is_named() -> None:
    class Refuses:
        @hookimpl(wrapper=True)
        def client_register(self, ctx: Any) -> Generator[None, Any, Any]:
            yield
            raise RuntimeError("refused after the fact")

    calls: list[Any] = []
    chain = Chain([plugin("a", calls), ("refuses", Refuses())])
    with pytest.raises(HandlerFailed, match="plugin 'refuses' raised in 'client_register'"):
        chain.fire("client_register", Ctx(), client_id="c1")
    assert chain.handled == ("refuses", "a", "core.console")  # the wrapper was entered first


def test_a_wrapper_may_swallow_an_error() -> None:
    class Forgiving:
        @hookimpl(wrapper=True)
        def client_register(self, ctx: Any) -> Generator[None, Any, Any]:
            with contextlib.suppress(KeyError):
                yield
            return []

    chain = Chain([("forgiving", Forgiving()), ("bad", Raiser())])
    assert chain.fire("client_register", Ctx(), client_id="c1") == []
    assert chain.handled == ("forgiving", "bad")


def test_an_old_style_hookwrapper_sees_the_outcome() -> None:
    seen: list[Any] = []

    class OldStyle:
        @hookimpl(hookwrapper=True)
        def client_register(self, ctx: Any) -> Generator[None, Any, None]:
            outcome = yield
            seen.append(("outcome", outcome.exception or outcome.get_result()))

    chain = Chain([("old", OldStyle()), plugin("a", seen)])
    chain.fire("client_register", Ctx(), client_id="c1")
    assert seen == [("a", "client_register"), ("outcome", ["a"])]
    seen.clear()
    chain = Chain([("old", OldStyle()), ("bad", Raiser())])
    with pytest.raises(HandlerFailed) as err:
        chain.fire("client_register", Ctx(), client_id="c1")
    assert err.value.plugin == "bad" and isinstance(seen[0][1], KeyError)


def test_pluggys_tracing_sees_the_chains_calls() -> None:
    traced: list[Any] = []
    calls: list[Any] = []
    chain = Chain([plugin("a", calls)])
    chain.pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: traced.append((hook, [i.plugin_name for i in impls][::-1])),
        lambda outcome, hook, impls, kwargs: None,
    )
    chain.fire("client_register", Ctx(), client_id="c1")
    chain.fire("shutdown", Ctx())
    assert traced == [("client_register", ["a", "core.console"]), ("shutdown", ["a"])]


# -- strategies ---------------------------------------------------------------------------


class Answers:
    def __init__(self, value: str | None) -> None:
        self.value = value

    @hookimpl
    def aggregate(self, ctx: Any, contributions: Any) -> str | None:
        return self.value


def test_a_strategy_answer_comes_from_the_first_plugin_that_gives_one() -> None:
    chain = Chain([("s", Answers(None)), ("x", Answers("x")), ("y", Answers("y"))])
    assert chain.ask("aggregate", Ctx(), contributions=[]) == "x"
    chain = Chain([("y", Answers("y")), ("x", Answers("x"))])
    assert chain.ask("aggregate", Ctx(), contributions=[]) == "y"


def test_a_wrapper_of_a_strategy_sees_and_may_replace_the_answer() -> None:
    class Doubles:
        @hookimpl(wrapper=True)
        def aggregate(self, ctx: Any) -> Generator[None, Any, Any]:
            answer = yield
            return answer * 2

    chain = Chain([("x", Answers("x")), ("doubles", Doubles())])
    assert chain.ask("aggregate", Ctx(), contributions=[]) == "xx"


def test_answers_lists_every_answer_with_its_plugin() -> None:
    plugins = [("s", Answers(None)), ("x", Answers("x")), ("y", Answers("y"))]
    chain = Chain(plugins)
    assert [name for name, _ in chain.answers("get_trainer_class", Ctx())] == ["core.trainer"]
    chain = Chain(plugins, with_defaults=False)
    assert chain.answers("aggregate", Ctx(), contributions=[]) == [("x", "x"), ("y", "y")]


def test_a_raising_strategy_names_the_plugin() -> None:
    class Raises:
        @hookimpl
        def aggregate(self, ctx: Any, contributions: Any) -> None:
            raise ZeroDivisionError("bad maths")

    chain = Chain([("r", Raises())])
    ctx = Ctx()
    with pytest.raises(HandlerFailed, match="plugin 'r' raised in 'aggregate': ZeroDivisionError"):
        chain.ask("aggregate", ctx, contributions=[])
    assert ctx.events("strategy_failed")[0]["plugin"] == "r"
    with pytest.raises(HandlerFailed, match="plugin 'r' raised in 'aggregate'"):
        chain.answers("aggregate", ctx, contributions=[])


# -- the round's record and its rollback --------------------------------------------------


def test_handled_lists_who_handled_any_event_since_the_round_began() -> None:
    calls: list[Any] = []
    chain = Chain(
        [
            ("a", RecordingPlugin("a", calls)),
            ("b", RecordingPlugin("b", calls)),
            ("x", Answers("x")),
        ],
        with_defaults=False,
    )
    ctx = Ctx()
    chain.fire("startup", ctx)
    chain.begin_round()
    assert chain.handled == ()
    chain.fire("after_aggregation", ctx)
    chain.ask("aggregate", ctx, contributions=[])
    chain.fire("start_round", ctx)
    assert chain.handled == ("a", "b", "x")
    chain.begin_round()
    assert chain.handled == ()


def test_a_failed_round_rolls_back_everyone_who_handled_it_once_in_reverse() -> None:
    calls: list[Any] = []

    class Fails(RecordingPlugin):
        @hookimpl
        def before_aggregation(self, ctx: Any) -> None:
            super().before_aggregation(ctx)
            raise ValueError("x")

    chain = Chain(
        [
            ("a", RecordingPlugin("a", calls)),
            ("late", Answers("late")),  # handled the round, has no rollback
            ("fails", Fails("fails", calls)),
            ("b", RecordingPlugin("b", calls)),
        ],
        with_defaults=False,
    )
    ctx = Ctx()
    chain.begin_round()
    chain.fire("start_round", ctx)  # a, fails, b
    chain.ask("aggregate", ctx, contributions=[])  # late
    with pytest.raises(HandlerFailed, match="plugin 'fails' raised in 'before_aggregation'"):
        chain.fire("before_aggregation", ctx)
    assert ("a", "rollback") not in calls  # fire itself rolls back nothing
    assert chain.handled == ("a", "fails", "b", "late")
    calls.clear()
    chain.roll_back_round(ctx)
    assert calls == [("b", "rollback"), ("fails", "rollback"), ("a", "rollback")]
    assert [e["plugin"] for e in ctx.events("rolled_back")] == ["b", "fails", "a"]
    assert chain.handled == ()  # rollback calls are no handling; the record starts over


def test_a_failing_rollback_is_logged_and_the_others_still_roll_back() -> None:
    calls: list[Any] = []

    class BadRollback(RecordingPlugin):
        @hookimpl
        def rollback(self, ctx: Any) -> None:
            raise RuntimeError("cannot undo")

    chain = Chain(
        [("a", RecordingPlugin("a", calls)), ("b", BadRollback("b", calls))],
        with_defaults=False,
    )
    ctx = Ctx()
    chain.fire("start_round", ctx)
    chain.roll_back_round(ctx)
    assert calls[-1] == ("a", "rollback")
    assert ctx.events("rollback_failed") == [
        {"plugin": "b", "round": 1, "error": "RuntimeError: cannot undo"}
    ]
    assert [e["plugin"] for e in ctx.events("rolled_back")] == ["a"]


def test_each_rollback_goes_through_pluggy_with_rollbacks_wrappers() -> None:
    calls: list[Any] = []

    class Watch:
        @hookimpl(wrapper=True)
        def rollback(self, ctx: Any) -> Generator[None, Any, Any]:
            calls.append(("watch", "before"))
            result = yield
            calls.append(("watch", "after"))
            return result

    chain = Chain(
        [("a", RecordingPlugin("a", calls)), ("b", RecordingPlugin("b", calls)), ("w", Watch())],
        with_defaults=False,
    )
    chain.fire("start_round", Ctx())
    calls.clear()
    chain.roll_back_round(Ctx())
    assert calls == [
        ("watch", "before"),
        ("b", "rollback"),
        ("watch", "after"),
        ("watch", "before"),
        ("a", "rollback"),
        ("watch", "after"),
    ]


def test_a_failure_in_a_nested_event_names_the_inner_plugin() -> None:
    class Specs:
        @hookspec
        def best_model_found(self, ctx: Any) -> None:
            """Side: server."""

    class Announcer:
        flcore_hookspecs = Specs

        @hookimpl
        def after_aggregation(self, ctx: Any) -> None:
            chain.fire("best_model_found", ctx)

    class Listener:
        @hookimpl
        def best_model_found(self, ctx: Any) -> None:
            raise OSError("disk full")

    chain = Chain([("announcer", Announcer()), ("listener", Listener())])
    ctx = Ctx()
    with pytest.raises(HandlerFailed) as err:
        chain.fire("after_aggregation", ctx)
    assert (err.value.plugin, err.value.event) == ("listener", "best_model_found")
    assert len(ctx.events("handler_failed")) == 1  # logged once, where it happened
    assert chain.handled == ("announcer", "listener")


# -- checked at load ----------------------------------------------------------------------


def test_a_misspelt_hook_is_refused_with_the_closest_name() -> None:
    class Typo:
        @hookimpl
        def end_rond(self, ctx: Any) -> None: ...

    with pytest.raises(PluginError) as err:
        Chain([("typo", Typo())])
    assert str(err.value) == (
        "plugin 'typo' implements 'end_rond', which is no flcore hook (did you mean 'end_round'?)"
    )


def test_an_optional_hook_may_have_no_spec() -> None:
    class Optional:
        @hookimpl(optionalhook=True)
        def best_model_found(self, ctx: Any) -> None: ...

    chain = Chain([("optional", Optional())])
    assert chain.handles("best_model_found")


def test_an_implementation_with_an_unknown_argument_is_refused() -> None:
    class Wrong:
        @hookimpl
        def client_register(self, ctx: Any, client_id: str, colour: str) -> None: ...

    with pytest.raises(PluginError) as err:
        Chain([("w", Wrong())])
    assert str(err.value) == (
        "plugin 'w' implements 'client_register' with argument 'colour', which "
        "'client_register' does not have (its arguments: ctx, client_id)"
    )


def test_a_wrapper_that_does_not_yield_is_refused() -> None:
    class NotAGenerator:
        @hookimpl(wrapper=True)
        def end_round(self, ctx: Any) -> None: ...

    with pytest.raises(PluginError, match=r"plugin 'ng' implements 'end_round': .*not a generator"):
        Chain([("ng", NotAGenerator())])


def test_plugins_may_bring_their_own_hookspecs() -> None:
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
    chain.fire("best_model_found", Ctx(), round=4)
    assert seen == [4]
    # without the plugin that declares it, the hook is no hook of this chain
    with pytest.raises(PluginError, match="'listener' implements 'best_model_found', which is"):
        Chain([("listener", Listener())])


def test_firing_a_hook_nobody_declares_is_an_error() -> None:
    chain = Chain([])
    with pytest.raises(PluginError, match="no hook 'end_rond'"):
        chain.fire("end_rond", Ctx())
    assert not chain.handles("end_rond")


def test_name_of_and_implementations() -> None:
    calls: list[Any] = []
    a, b = RecordingPlugin("a", calls), RecordingPlugin("b", calls)
    chain = Chain([("b", b), ("a", a)])
    assert chain.name_of(a) == "a" and chain.name_of(object()) is None
    assert chain.plugin("b") is b
    assert [name for name, _ in chain.implementations("start_round")] == ["b", "a"]
    assert chain.handles("start_round") and not chain.handles("send_best_model")


# -- for_job ------------------------------------------------------------------------------


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
    assert chain.origins == {"conf": "python"}
    bad = small_job(["conf"], **{"plugins.conf": {"every": "x"}})
    with pytest.raises(JobError, match=r"small.toml: \[plugins.conf\].every: expected int"):
        Chain.for_job(bad, {"conf": Configured})
    unknown = small_job(["conf"], **{"plugins.conf": {"evry": 3}})
    with pytest.raises(JobError, match=r"\[plugins.conf\]: unknown key 'evry'; known keys: every"):
        Chain.for_job(unknown, {"conf": Configured})


def test_a_fresh_chain_has_plugins_of_its_own() -> None:
    import attrs

    class Counter:
        @attrs.frozen
        class Settings:
            step: int = 1

        def __init__(self, settings: Any) -> None:
            self.settings = settings
            self.count = 0

        @hookimpl
        def start_round(self, ctx: Any) -> None:
            self.count += self.settings.step

    shared = RecordingPlugin("shared", [])
    job = small_job(["counter", "shared"], **{"plugins.counter": {"step": 2}})
    chain = Chain.for_job(job, {"counter": Counter, "shared": shared})
    fresh = chain.fresh()
    fresh.fire("start_round", Ctx())
    assert fresh.plugin("counter").count == 2 and chain.plugin("counter").count == 0
    assert fresh.plugin("shared") is shared  # an object given as it is cannot be created again
    assert fresh.names == chain.names and fresh.origins == chain.origins
    assert fresh.fresh().plugin("counter") is not fresh.plugin("counter")


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
