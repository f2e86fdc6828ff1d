"""The chain: the job's plugins in order, then the core's defaults, behind one PluginManager.

Handler events are fired here rather than through ``pm.hook.X()`` because Clara's
rollback needs to know which handlers already ran when one raises, and ``shutdown``
runs in reverse order. Strategy questions go to the first plugin that answers.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from flcore import hookspecs
from flcore.errors import HandlerFailed, JobError
from flcore.markers import PROJECT_NAME
from flcore.plugins import DEFAULT_PLUGINS, find_plugin, instantiate

if TYPE_CHECKING:
    from flcore.context import FLContext
    from flcore.job import Job

#: Handler events that run in reverse chain order.
REVERSED_EVENTS = frozenset({"shutdown"})


class Chain:
    """An ordered list of named plugins registered with one :class:`pluggy.PluginManager`."""

    def __init__(
        self,
        plugins: Sequence[tuple[str, Any]],
        settings: Mapping[str, Any] | None = None,
        with_defaults: bool = True,
        origins: Mapping[str, str] | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        ordered = list(plugins)
        if with_defaults:
            ordered += [(n, importlib.import_module(m)) for n, m in DEFAULT_PLUGINS.items()]
        for _, plugin in ordered:
            extra_specs = getattr(plugin, "flcore_hookspecs", None)
            if extra_specs is not None:
                self.pm.add_hookspecs(extra_specs)
        # pluggy calls the last registered first: register in reverse so that
        # pm.hook.X() also follows the chain.
        for name, plugin in reversed(ordered):
            self.pm.register(plugin, name=name)
        self.names: tuple[str, ...] = tuple(name for name, _ in ordered)
        self.settings: dict[str, Any] = dict(settings or {})
        #: Where each plugin of the job came from: "entry point" or "python" (given in code).
        self.origins: dict[str, str] = dict(origins or {})
        self._position = {name: i for i, name in enumerate(self.names)}
        self._impls: dict[tuple[str, bool], list[tuple[str, Any]]] = {}

    @classmethod
    def for_job(cls, job: Job, extra: Mapping[str, Any] | None = None) -> Chain:
        """Load, configure and order the plugins ``job`` names. ``extra`` maps names to plugin
        objects that need no installation (tests, stacks composed in Python)."""
        plugins, settings, origins = [], {}, {}
        for name in job.chain:
            if name.startswith("core."):
                raise JobError(f"{job.where('plugins')}: {name!r} is a core default, always active")
            obj = find_plugin(name, extra)
            plugin, plugin_settings = instantiate(
                name, obj, job.plugin_sections.get(name, {}), job.where(f"plugins.{name}")
            )
            plugins.append((name, plugin))
            settings[name] = plugin_settings
            origins[name] = "python" if extra and name in extra else "entry point"
        return cls(plugins, settings, origins=origins)

    def plugin(self, name: str) -> Any:
        """The registered plugin object called ``name``."""
        return self.pm.get_plugin(name)

    def implementations(self, hook: str, reverse: bool = False) -> list[tuple[str, Any]]:
        """``(plugin name, HookImpl)`` of ``hook`` in chain order (or reversed)."""
        key = (hook, reverse)
        if key not in self._impls:
            caller = getattr(self.pm.hook, hook)
            impls = [(impl.plugin_name, impl) for impl in caller.get_hookimpls()]
            impls.sort(key=lambda item: self._position.get(item[0], len(self._position)))
            self._impls[key] = impls[::-1] if reverse else impls
        return self._impls[key]

    def fire(self, hook: str, ctx: FLContext, **kwargs: Any) -> list[tuple[str, Any]]:
        """Fire a handler event; return ``(plugin, result)`` for every handler.

        When a handler raises, every handler that already handled this event gets
        ``rollback(ctx)`` in reverse order, and :class:`HandlerFailed` names the plugin.
        """
        kwargs["ctx"] = ctx
        done: list[str] = []
        results = []
        impls = self.implementations(hook, reverse=hook in REVERSED_EVENTS)
        if impls:  # the event log records events that something handled
            ctx.log.debug("event", hook=hook, round=ctx.round, handlers=[n for n, _ in impls])
        for name, impl in impls:
            try:
                results.append((name, _call(impl, kwargs)))
            except Exception as err:
                ctx.log.error(
                    "handler_failed",
                    plugin=name,
                    hook=hook,
                    round=ctx.round,
                    error=f"{type(err).__name__}: {err}",
                )
                self.roll_back(ctx, done)
                raise HandlerFailed(name, hook, err) from err
            done.append(name)
        return results

    def roll_back(self, ctx: FLContext, handled: Sequence[str]) -> None:
        """Call ``rollback(ctx)`` on the named plugins, last first; their errors are logged."""
        rollbacks = dict(self.implementations("rollback"))
        for name in reversed(handled):
            impl = rollbacks.get(name)
            if impl is None:
                continue
            try:
                _call(impl, {"ctx": ctx})
                ctx.log.info("rolled_back", plugin=name, round=ctx.round)
            except Exception as err:
                ctx.log.error("rollback_failed", plugin=name, error=f"{type(err).__name__}: {err}")

    def ask(self, hook: str, ctx: FLContext, **kwargs: Any) -> Any:
        """Ask a strategy hook: the first answer other than ``None``, in chain order."""
        kwargs["ctx"] = ctx
        for name, impl in self.implementations(hook):
            try:
                answer = _call(impl, kwargs)
            except Exception as err:
                ctx.log.error(
                    "strategy_failed", plugin=name, hook=hook, error=f"{type(err).__name__}: {err}"
                )
                raise HandlerFailed(name, hook, err) from err
            if answer is not None:
                return answer
        return None


def _call(impl: Any, kwargs: Mapping[str, Any]) -> Any:
    return impl.function(*[kwargs[arg] for arg in impl.argnames])
