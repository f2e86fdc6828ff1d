"""The chain: the job's plugins in order, then the core's defaults, behind one PluginManager.

pluggy calls every hook, so ``@hookimpl(wrapper=True)``, old-style ``hookwrapper=True``,
``tryfirst``/``trylast`` and pluggy's tracing work as pluggy documents them. The chain fixes
the order by the order it registers plugins in (pluggy calls the most recently registered
first), and watches each implementation (:class:`_Tracker`) to learn which plugin handled
what and which one raised: that is what a failed round rolls back, and whom an error names.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import pluggy

from flcore import hookspecs
from flcore.errors import HandlerFailed, JobError, PluginError
from flcore.markers import PROJECT_NAME
from flcore.plugins import (
    DEFAULT_PLUGINS,
    declared_hookspecs,
    distribution_of,
    find_plugin,
    installed_entry_points,
    instantiate,
    register_checked,
)

if TYPE_CHECKING:
    from flcore.context import FLContext
    from flcore.job import Job

#: Handler events whose handlers run in reverse chain order (wrappers stay outermost).
REVERSED_EVENTS: Final = frozenset({"shutdown"})

#: The hook a failed round calls; calling it is not "handling" anything.
ROLLBACK: Final = "rollback"

#: Errors a call passes on as they are: a nested call's failure already names its plugin and
#: was logged; a call that lacks an argument is the caller's bug, not a plugin's.
_PASSED_ON: Final = (HandlerFailed, pluggy.HookCallError)


class Chain:
    """An ordered list of named plugins registered with one :class:`pluggy.PluginManager`.

    ``distributions`` names the distribution of each installed plugin (``"NAME VERSION"``),
    for errors about its hooks.
    """

    def __init__(
        self,
        plugins: Sequence[tuple[str, Any]],
        settings: Mapping[str, Any] | None = None,
        with_defaults: bool = True,
        origins: Mapping[str, str] | None = None,
        distributions: Mapping[str, str] | None = None,
    ) -> None:
        ordered = list(plugins)
        if with_defaults:
            ordered += [(n, importlib.import_module(m)) for n, m in DEFAULT_PLUGINS.items()]
        self.names: tuple[str, ...] = tuple(name for name, _ in ordered)
        self.settings: dict[str, Any] = dict(settings or {})
        #: Where each plugin of the job came from: "entry point" or "python" (given in code).
        self.origins: dict[str, str] = dict(origins or {})
        self.pm = _plugin_manager(ordered)
        # pluggy calls the last registered first: register the chain backwards, the defaults
        # first, so that pluggy's own order is the chain's.
        for name, plugin in reversed(ordered):
            if with_defaults and name in DEFAULT_PLUGINS:
                # the core's own modules, whose hooks the core's tests check: pluggy's own
                # validation is enough, and two chains a run need not check them twice more
                self.pm.register(plugin, name=name)
            else:
                register_checked(self.pm, name, plugin, (distributions or {}).get(name))
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:  # register_checked refused these first
            raise PluginError(" ".join(str(err).split())) from None
        self._tracker = _Tracker()
        for caller in vars(self.pm.hook).values():
            for impl in caller.get_hookimpls():
                self._tracker.watch(impl, record=caller.name != ROLLBACK)
        self._position = {name: i for i, name in enumerate(self.names)}
        self._order: dict[str, tuple[str, ...]] = {}
        #: Hook callers by name, and whether anything implements a hook: asked per batch
        #: of the local loop and per client, so looked up once.
        self._callers: dict[str, pluggy.HookCaller] = {}
        self._handles: dict[str, bool] = {}
        self._with_defaults = with_defaults
        self._distributions = dict(distributions or {})
        #: ``(object found, its section, where)`` of each plugin for_job created: fresh() again.
        self._sources: dict[str, tuple[Any, Mapping[str, Any], str]] = {}

    @classmethod
    def for_job(cls, job: Job, extra: Mapping[str, Any] | None = None) -> Chain:
        """Load, configure and order the plugins ``job`` names. ``extra`` maps names to plugin
        objects that need no installation (tests, stacks composed in Python)."""
        plugins, settings, origins, distributions, sources = [], {}, {}, {}, {}
        installed = installed_entry_points() if set(job.chain) - set(extra or {}) else {}
        for name in job.chain:
            if name.startswith("core."):
                raise JobError(f"{job.where('plugins')}: {name!r} is a core default, always active")
            obj = find_plugin(name, extra, installed)
            sources[name] = (obj, job.plugin_sections.get(name, {}), job.where(f"plugins.{name}"))
            plugin, plugin_settings = instantiate(name, *sources[name])
            plugins.append((name, plugin))
            settings[name] = plugin_settings
            if extra and name in extra:
                origins[name] = "python"
            else:
                origins[name] = "entry point"
                distributions[name] = " ".join(distribution_of(installed[name][0]))
        chain = cls(plugins, settings, origins=origins, distributions=distributions)
        chain._sources = sources
        return chain

    def fresh(self) -> Chain:
        """The same chain with plugins of its own: each plugin :meth:`for_job` created from a
        class is created again, with the same settings, so state a plugin keeps on ``self``
        is not shared (a client's chain in this process, as it would be in another one).
        Modules and plugin objects given as they are stay shared."""
        plugins = []
        for name in self.names:
            if name.startswith("core.") and self._with_defaults:
                continue
            source = self._sources.get(name)
            plugins.append((name, instantiate(name, *source)[0] if source else self.plugin(name)))
        chain = Chain(
            plugins,
            self.settings,
            with_defaults=self._with_defaults,
            origins=self.origins,
            distributions=self._distributions,
        )
        chain._sources = self._sources
        return chain

    # -- what is registered -------------------------------------------------------------

    def plugin(self, name: str) -> Any:
        """The registered plugin object called ``name``."""
        return self.pm.get_plugin(name)

    def name_of(self, plugin: object) -> str | None:
        """The chain's name of the registered plugin object ``plugin`` (``None``: not in it)."""
        return self.pm.get_name(plugin)

    def implementations(self, hook: str) -> list[tuple[str, pluggy.HookImpl]]:
        """``(plugin name, HookImpl)`` of ``hook`` in chain order, wrappers included."""
        caller = self._caller(hook)
        impls = [(impl.plugin_name, impl) for impl in caller.get_hookimpls()] if caller else []
        impls.sort(key=lambda item: self._position.get(item[0], len(self._position)))
        return impls

    def handles(self, hook: str) -> bool:
        """Whether any plugin in the chain implements ``hook`` (firing it would call someone)."""
        found = self._handles.get(hook)
        if found is None:
            found = self._handles[hook] = bool(self._call_order(hook))
        return found

    # -- calling hooks ------------------------------------------------------------------

    def fire(self, hook: str, ctx: FLContext, **kwargs: Any) -> list[tuple[str, Any]]:
        """Fire a handler event; ``(plugin, result)`` for every handler that ran, in call order.

        Wrappers wrap the whole call and may change or swallow its outcome; what they return is
        not part of this list. When the call raises, :class:`HandlerFailed` names the plugin
        that raised (the round rolls back, see :meth:`roll_back_round`).
        """
        caller = self._required(hook)
        kwargs["ctx"] = ctx
        order = self._call_order(hook)
        if order:  # the event log records events that something handled
            ctx.log.debug("event", hook=hook, round=ctx.round, handlers=list(order))
        with self._tracker.call() as call:
            try:
                if hook in REVERSED_EVENTS:
                    impls = _handlers_reversed(caller.get_hookimpls())
                    caller._hookexec(hook, impls, kwargs, False)
                else:
                    caller(**kwargs)
            except _PASSED_ON:
                raise
            except Exception as err:
                raise _failure("handler_failed", hook, ctx, call.raiser(err), err) from err
        return call.results

    def ask(self, hook: str, ctx: FLContext, **kwargs: Any) -> Any:
        """Ask a strategy hook: the first answer other than ``None``, in chain order (pluggy's
        ``firstresult``); a wrapper may replace it."""
        caller = self._required(hook)
        stack = self._tracker.stack()
        call = _Call()
        stack.append(call)
        try:
            return caller(ctx=ctx, **kwargs)
        except _PASSED_ON:
            raise
        except Exception as err:
            raise _failure("strategy_failed", hook, ctx, call.raiser(err), err) from err
        finally:
            stack.pop()

    def answers(self, hook: str, ctx: FLContext, **kwargs: Any) -> list[tuple[str, Any]]:
        """Every answer other than ``None`` to a strategy hook, with its plugin, in chain order:
        how the core refuses two plugins that both claim ``get_trainer_class``. Wrappers are
        left out: they were written for the hook's single answer, not this list."""
        caller = self._required(hook)
        impls = [impl for impl in caller.get_hookimpls() if not _is_wrapper(impl)]
        with self._tracker.call() as call:
            try:
                caller._hookexec(hook, impls, {"ctx": ctx, **kwargs}, False)
            except _PASSED_ON:
                raise
            except Exception as err:
                raise _failure("strategy_failed", hook, ctx, call.raiser(err), err) from err
        return [(name, answer) for name, answer in call.results if answer is not None]

    # -- the round's record and its rollback --------------------------------------------

    def begin_round(self) -> None:
        """Forget who handled what: a round starts, and only its handlers would roll back."""
        self._tracker.handled.clear()

    @property
    def handled(self) -> tuple[str, ...]:
        """The plugins that handled any event since :meth:`begin_round`, in order of first
        handling, the one that raised included (``rollback`` calls do not count)."""
        return tuple(self._tracker.handled)

    def roll_back_round(self, ctx: FLContext) -> None:
        """Call ``rollback(ctx)`` once on each plugin of :attr:`handled` that implements it,
        last first, each through pluggy with rollback's wrappers around it; an error is logged
        and the others still roll back. Then :meth:`begin_round`."""
        caller = self._caller(ROLLBACK)
        impls = caller.get_hookimpls() if caller else []
        wrappers = [impl for impl in impls if _is_wrapper(impl)]
        for name in reversed(self.handled):
            own = [i for i in impls if i.plugin_name == name and not _is_wrapper(i)]
            if not own or caller is None:
                continue
            try:
                with self._tracker.call():
                    caller._hookexec(ROLLBACK, [*own, *wrappers], {"ctx": ctx}, False)
            except Exception as err:
                ctx.log.error("rollback_failed", plugin=name, round=ctx.round, error=_describe(err))
            else:
                ctx.log.info("rolled_back", plugin=name, round=ctx.round)
        self.begin_round()

    # -- helpers ------------------------------------------------------------------------

    def _call_order(self, hook: str) -> tuple[str, ...]:
        """The plugins a call of ``hook`` enters, in order (wrappers first), cached: the chain
        registers nothing after it is built."""
        order = self._order.get(hook)
        if order is None:
            caller = self._caller(hook)
            impls = caller.get_hookimpls() if caller else []
            if hook in REVERSED_EVENTS:
                impls = _handlers_reversed(impls)
            order = self._order[hook] = tuple(dict.fromkeys(i.plugin_name for i in impls[::-1]))
        return order

    def _caller(self, hook: str) -> pluggy.HookCaller | None:
        caller: pluggy.HookCaller | None = getattr(self.pm.hook, hook, None)
        return caller

    def _required(self, hook: str) -> pluggy.HookCaller:
        caller = self._callers.get(hook)
        if caller is not None:
            return caller
        caller = self._callers[hook] = self._caller(hook)  # type: ignore[assignment]
        if caller is None:
            del self._callers[hook]
            raise PluginError(
                f"no hook {hook!r}: neither the core nor a plugin in the chain declares it"
            )
        return caller


class _Call:
    """One hook call in progress: what each handler returned and who raised which error."""

    __slots__ = ("entered", "raisers", "results")

    def __init__(self) -> None:
        self.results: list[tuple[str, Any]] = []
        self.raisers: dict[int, tuple[BaseException, str]] = {}
        self.entered: str | None = None

    def raiser(self, err: BaseException) -> str:
        """The plugin that raised ``err`` first (a wrapper re-raising it takes no blame); for
        an error raised by pluggy around an implementation, the last one entered."""
        found = self.raisers.get(id(err))
        return found[1] if found else self.entered or "core"


class _Tracker:
    """Wraps each registered implementation's function to record, per chain, who handled
    what (the round's record) and, per call, what each returned and who raised.

    pluggy computed the implementation's argument names at registration and keeps calling
    ``impl.function`` with them, so a ``*args`` stand-in changes nothing it validated.
    """

    def __init__(self) -> None:
        #: Plugins that handled an event since the round began, as an ordered set.
        self.handled: dict[str, None] = {}
        self._local = _Stacks()  # calls nest per thread (a gRPC server has several)

    def stack(self) -> list[_Call]:
        """This thread's calls in progress, innermost last."""
        return self._local.calls

    def call(self) -> _CallScope:
        return _CallScope(self._local.calls)

    def watch(self, impl: pluggy.HookImpl, record: bool) -> None:
        fn: Callable[..., Any] = impl.function
        name = impl.plugin_name
        local, handled = self._local, self.handled

        def entered() -> _Call | None:
            if record and name not in handled:
                handled[name] = None
            stack = local.calls
            if stack:
                stack[-1].entered = name
                return stack[-1]
            return None

        def blame(call: _Call | None, err: Exception) -> None:
            if call is not None:
                call.raisers.setdefault(id(err), (err, name))

        tracked: Callable[..., Any]
        if _is_wrapper(impl):

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
                call = entered()
                try:
                    return (yield from fn(*args, **kwargs))
                except Exception as err:
                    blame(call, err)
                    raise

            tracked = wrapper
        else:

            @functools.wraps(fn)
            def handler(*args: Any, **kwargs: Any) -> Any:
                if record and name not in handled:  # entered(), inlined: every hook call
                    handled[name] = None
                stack = local.calls
                call = stack[-1] if stack else None
                if call is not None:
                    call.entered = name
                try:
                    result = fn(*args, **kwargs)
                except Exception as err:
                    blame(call, err)
                    raise
                if call is not None:
                    call.results.append((name, result))
                return result

            tracked = handler
        impl.function = tracked  # type: ignore[misc]  # Final in pluggy's stubs, a slot at run time


class _Stacks(threading.local):
    """Each thread's stack of calls in progress, there from the thread's first look."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []


class _CallScope:
    """``with tracker.call() as call``: a :class:`_Call` on this thread's stack for its span."""

    __slots__ = ("_call", "_stack")

    def __init__(self, stack: list[_Call]) -> None:
        self._stack = stack
        self._call = _Call()

    def __enter__(self) -> _Call:
        self._stack.append(self._call)
        return self._call

    def __exit__(self, *exc: object) -> None:
        self._stack.pop()


def _plugin_manager(ordered: Sequence[tuple[str, Any]]) -> pluggy.PluginManager:
    """A PluginManager with the core's hookspecs and those the chain's plugins declare."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name, specs in _declared(ordered):
        try:
            pm.add_hookspecs(specs)
        except ValueError as err:  # a hook name declared twice
            raise PluginError(f"plugin {name!r} declares hooks that clash: {err}") from None
    return pm


def _declared(ordered: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``(plugin name, specs)`` for each distinct ``flcore_hookspecs`` of the chain."""
    seen: dict[int, tuple[str, Any]] = {}
    for name, plugin in ordered:
        specs = declared_hookspecs(plugin)
        if specs is not None:
            seen.setdefault(id(specs), (name, specs))
    return list(seen.values())


def _is_wrapper(impl: pluggy.HookImpl) -> bool:
    return bool(impl.wrapper or impl.hookwrapper)


def _handlers_reversed(impls: list[pluggy.HookImpl]) -> list[pluggy.HookImpl]:
    """pluggy's list (called from its end) with the handlers reversed within their tryfirst,
    plain and trylast groups: the chain runs backwards, ``tryfirst`` still runs first,
    wrappers stay outermost."""
    groups: tuple[list[pluggy.HookImpl], ...] = ([], [], [])  # trylast, plain, tryfirst
    wrappers = []
    for impl in impls:
        if _is_wrapper(impl):
            wrappers.append(impl)
        else:
            groups[0 if impl.trylast else 2 if impl.tryfirst else 1].append(impl)
    return [*(i for group in groups for i in reversed(group)), *wrappers]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _failure(event: str, hook: str, ctx: FLContext, plugin: str, err: Exception) -> HandlerFailed:
    """Log a failed call; the error that names its plugin."""
    ctx.log.error(event, plugin=plugin, hook=hook, round=ctx.round, error=_describe(err))
    return HandlerFailed(plugin, hook, err)
