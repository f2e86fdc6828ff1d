"""Finding plugins: the ``flcore.plugins`` entry points and the core's own defaults.

Only plugins a job names are imported for a run; ``flcore plugins`` imports all of them,
recording (not raising) the ones that fail. Every plugin's hooks are checked against the
hookspecs when it loads (:func:`check_hooks`), so a misspelt hook or a wrong argument is an
error naming the plugin, not a hook that is silently never called.

This module is imported by ``flcore --help`` (the commands plugins add, see
:func:`add_plugin_commands`), so it imports ``importlib.metadata``, attrs and the settings
machinery only where they are used.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypedDict

import pluggy

from flcore import hookspecs
from flcore.errors import JobError, PluginError
from flcore.markers import PROJECT_NAME

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    import click

ENTRY_POINT_GROUP: Final = "flcore.plugins"

#: The core's defaults: ordinary plugins, always active, answering after the job's chain.
DEFAULT_PLUGINS: Final[Mapping[str, str]] = {
    "core.console": "flcore.defaults.console",
    "core.trainer": "flcore.defaults.trainer_class",
    "core.runtime": "flcore.defaults.runtime",
    "core.selection": "flcore.defaults.selection",
    "core.fedavg": "flcore.defaults.fedavg",
    "core.local_training": "flcore.defaults.local_training",
    "core.evaluation": "flcore.defaults.evaluation",
}


class PluginInfo(NamedTuple):
    """What ``flcore plugins`` shows about one plugin."""

    name: str
    distribution: str
    version: str
    target: str
    hooks: tuple[str, ...] = ()
    error: str | None = None
    builtin: bool = False


# -- entry points -------------------------------------------------------------------------


def installed_entry_points() -> dict[str, list[EntryPoint]]:
    """Every entry point in the ``flcore.plugins`` group, by plugin name."""
    from importlib.metadata import entry_points

    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


def distribution_of(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or dist.name, dist.version


def load_entry_point(name: str, ep: EntryPoint) -> Any:
    """Import a plugin; an import failure becomes a :class:`PluginError` naming everything."""
    try:
        return ep.load()
    except Exception as err:  # a plugin may fail in any way while importing
        raise _load_failure(name, " ".join(distribution_of(ep)), ep.value, err) from err


def find_plugin(
    name: str,
    extra: Mapping[str, Any] | None = None,
    installed: Mapping[str, list[EntryPoint]] | None = None,
) -> Any:
    """The object registered as ``name``: from ``extra`` (tests, custom stacks) or an entry
    point (of ``installed``, when the caller scanned them already)."""
    if extra and name in extra:
        return extra[name]
    if installed is None:
        installed = installed_entry_points()
    eps = installed.get(name)
    if not eps:
        known = sorted(set(installed) | set(extra or {}))
        raise PluginError(
            f"unknown plugin {name!r} in the chain; installed plugins: "
            f"{', '.join(known) if known else 'none'}"
        )
    if len(eps) > 1:
        dists = ", ".join(distribution_of(ep)[0] for ep in eps)
        raise PluginError(f"plugin name {name!r} is provided by several distributions: {dists}")
    return load_entry_point(name, eps[0])


def instantiate(name: str, obj: Any, section: Mapping[str, Any], where: str) -> tuple[Any, Any]:
    """Return ``(plugin, settings)``: a class is instantiated per run, with its settings if it
    declares a ``Settings`` attrs class; a module or an instance is used as it is."""
    import attrs

    from flcore.settings import build_settings

    settings_cls = getattr(obj, "Settings", None)
    if settings_cls is not None and attrs.has(settings_cls):
        settings = build_settings(settings_cls, section, where)
    elif section:
        raise JobError(f"{where}: plugin {name!r} takes no settings, got {sorted(section)}")
    else:
        settings = None
    if inspect.isclass(obj):
        factory: Any = obj
        try:
            plugin = factory(settings) if settings is not None else factory()
        except JobError:
            raise
        except Exception as err:
            raise PluginError(
                f"plugin {name!r} could not be created: {type(err).__name__}: {err}"
            ) from err
        return plugin, settings
    return obj, settings


# -- hooks --------------------------------------------------------------------------------


def declared_hookspecs(plugin: Any) -> Any | None:
    """The hookspecs (a module or class) ``plugin`` adds to the chain, if it declares any."""
    return getattr(plugin, f"{PROJECT_NAME}_hookspecs", None)


def check_hooks(
    name: str, plugin: Any, specs: Iterable[Any], distribution: str | None = None
) -> tuple[str, ...]:
    """The hooks ``plugin`` implements, checked against ``specs`` (hookspec modules or classes)
    as :func:`register_checked` checks them."""
    known = pluggy.PluginManager(PROJECT_NAME)
    for namespace in specs:
        with contextlib.suppress(ValueError):  # a hook declared twice: a chain refuses it
            known.add_hookspecs(namespace)
    return register_checked(known, name, plugin, distribution)


def register_checked(
    pm: pluggy.PluginManager, name: str, plugin: Any, distribution: str | None = None
) -> tuple[str, ...]:
    """Register ``plugin`` as ``name`` with ``pm`` once its hooks pass ``pm``'s hookspecs;
    return the hooks it implements.

    An implementation named after no hook would never be called, and one taking an argument
    its hook lacks would fail at its first call: both are a :class:`PluginError` naming the
    plugin (and ``distribution``), now; so is anything else pluggy refuses.
    ``@hookimpl(optionalhook=True)`` may implement a hook nobody declares.
    """
    who = f"plugin {name!r}" + (f" (distribution {distribution})" if distribution else "")
    loose = pluggy.PluginManager(PROJECT_NAME)  # without specs, pluggy registers unchecked
    loose.register(plugin, name=name)
    hooks = []
    for caller in loose.get_hookcallers(plugin) or ():
        hook = caller.name
        declared: pluggy.HookCaller | None = getattr(pm.hook, hook, None)
        spec = declared.spec if declared is not None else None
        for impl in caller.get_hookimpls():
            if spec is None and not impl.optionalhook:
                raise PluginError(
                    f"{who} implements {hook!r}, which is no flcore hook{_closest(hook, pm)}"
                )
            if spec is None:
                continue
            extra = [a for a in impl.argnames if a not in (*spec.argnames, *spec.kwargnames)]
            if extra:
                raise PluginError(
                    f"{who} implements {hook!r} with argument {', '.join(map(repr, extra))}, "
                    f"which {hook!r} does not have (its arguments: {', '.join(spec.argnames)})"
                )
        if spec is not None:
            hooks.append(hook)
    try:  # what else pluggy refuses: a wrapper that is no generator, ...
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as err:
        raise PluginError(f"{who}{_reworded(err)}") from None
    return tuple(sorted(hooks))


def implemented_hooks(obj: Any) -> tuple[str, ...]:
    """The names of the hooks ``obj`` implements (methods marked with ``hookimpl``)."""
    names = []
    for attr in dir(obj):  # on a class, the marked functions carry the marker too
        try:
            member = getattr(obj, attr)
        except Exception:
            continue
        if hasattr(member, f"{PROJECT_NAME}_impl"):
            names.append(attr)
    known = set(_spec_names(hookspecs)) | set(_spec_names(declared_hookspecs(obj)))
    return tuple(n for n in sorted(names) if n in known)


# -- every installed plugin ---------------------------------------------------------------


def load_installed() -> list[tuple[str, EntryPoint, Any]]:
    """``(name, entry point, plugin object or the PluginError it failed with)`` for every
    installed plugin, by name."""
    loaded = []
    for name, eps in sorted(installed_entry_points().items()):
        for ep in eps:
            try:
                loaded.append((name, ep, load_entry_point(name, ep)))
            except PluginError as err:
                loaded.append((name, ep, err))
    return loaded


def installed_hookspecs(
    loaded: Iterable[tuple[str, Any, Any]] | None = None,
) -> list[tuple[str, Any]]:
    """``(plugin name, hookspecs)`` for every installed plugin that declares hooks of its own
    (of ``loaded``, when the caller loaded them already); one entry per hookspecs object."""
    seen: dict[int, tuple[str, Any]] = {}
    for name, _, obj in loaded if loaded is not None else load_installed():
        specs = None if isinstance(obj, PluginError) else declared_hookspecs(obj)
        if specs is not None:
            seen.setdefault(id(specs), (name, specs))
    return list(seen.values())


def list_plugins() -> list[PluginInfo]:
    """Every installed plugin (and the core's defaults), loading each and recording failures.

    Hooks are checked against the core's and every installed plugin's declared hooks: a
    plugin implementing another plugin's hook is fine here, and refused in a chain that lacks
    the declaring plugin."""
    loaded = load_installed()
    specs = [hookspecs, *(s for _, s in installed_hookspecs(loaded))]
    infos = [
        PluginInfo(
            name=name,
            distribution="flcore",
            version=_flcore_version(),
            target=module,
            hooks=check_hooks(name, importlib.import_module(module), specs),
            builtin=True,
        )
        for name, module in DEFAULT_PLUGINS.items()
    ]
    for name, ep, obj in loaded:
        dist, version = distribution_of(ep)
        hooks: tuple[str, ...] = ()
        error = str(obj) if isinstance(obj, PluginError) else None
        if error is None:
            try:
                hooks = check_hooks(name, obj, specs, f"{dist} {version}")
            except PluginError as err:
                error = str(err)
        infos.append(PluginInfo(name, dist, version, ep.value, hooks, error))
    return infos


# -- commands that plugins add ------------------------------------------------------------


def add_plugin_commands(cli: click.Group, report: Callable[[str], None]) -> None:
    """Let every installed plugin that implements ``register_commands`` add its commands.

    Each plugin is called through its own PluginManager with the core's hookspecs, so one that
    fails to load, raises, or would replace one of flcore's own commands is reported (one
    line) and skipped, and every other command still works.
    """
    core = dict(cli.commands)
    for name, plugin in _command_plugins(report):
        before = dict(cli.commands)
        try:
            pm = pluggy.PluginManager(PROJECT_NAME)
            pm.add_hookspecs(hookspecs)
            pm.register(plugin, name=name)
            pm.hook.register_commands(cli=cli)
            replaced = sorted(n for n in core if cli.commands.get(n) is not core[n])
            if replaced:
                raise PluginError(f"it would replace flcore's own {', '.join(replaced)}")
        except Exception as err:  # a plugin may fail in any way; the CLI must still start
            cli.commands.clear()
            cli.commands.update(before)
            report(f"warning: plugin {name!r} adds no commands: {_describe(err)}")


class _CommandCache(TypedDict):
    """Which installed plugins add commands, as the last full scan in one environment found.

    Valid while every stamp is unchanged: the mtime of each ``sys.path`` folder (where
    installing or removing a distribution shows) and of each module a plugin's import loaded.
    """

    path: list[str]
    written: float
    stamps: dict[str, int]
    #: ``[name, entry point, distribution]`` of the plugins that implement register_commands.
    commands: list[list[str]]
    #: The same for plugins that failed to load: tried (and reported) again on every start.
    failed: list[list[str]]


#: Environments the cache file remembers (test suites make many); the oldest are dropped.
_CACHED_ENVIRONMENTS: Final = 8


def _command_plugins(report: Callable[[str], None]) -> list[tuple[str, Any]]:
    """``(name, plugin)`` of the installed plugins that implement ``register_commands``.

    Scanning entry points imports ``importlib.metadata`` and every plugin, several times what
    ``flcore --help`` costs otherwise, so the scan's outcome is cached (:class:`_CommandCache`)
    and a start with a valid cache imports only the plugins that add commands.
    """
    cache = _read_cache()
    if cache is None:
        return _scan_commands(report)
    found = []
    for name, value, dist in [*cache["commands"], *cache["failed"]]:
        try:
            plugin = _load_value(value)
        except Exception as err:
            report(f"warning: {_load_failure(name, dist, value, err)}")
            continue
        if _implements_commands(plugin):
            found.append((name, plugin))
    return found


def _scan_commands(report: Callable[[str], None]) -> list[tuple[str, Any]]:
    import sysconfig
    import time

    before = set(sys.modules)
    found, commands, failed = [], [], []
    for name, ep, obj in load_installed():
        entry = [name, ep.value, " ".join(distribution_of(ep))]
        if isinstance(obj, PluginError):
            report(f"warning: {obj}")
            failed.append(entry)
        elif _implements_commands(obj):
            found.append((name, obj))
            commands.append(entry)
    stdlib = sysconfig.get_path("stdlib")
    files = [getattr(sys.modules[m], "__file__", None) for m in set(sys.modules) - before]
    watched = [p for p in sys.path if os.path.isdir(p)]
    watched += sorted(f for f in files if f and not f.startswith(stdlib))
    cache = _CommandCache(
        path=list(sys.path),
        written=time.time(),
        stamps=_stamps(watched),
        commands=commands,
        failed=failed,
    )
    path = _cache_file()
    with contextlib.suppress(OSError, ValueError):  # no cache: the next start scans again
        kept = json.loads(path.read_text()) if path.exists() else {}
        kept = dict(sorted(kept.items(), key=lambda item: item[1]["written"]))
        kept.pop(_environment(), None)
        kept = dict(list(kept.items())[-(_CACHED_ENVIRONMENTS - 1) :])
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({**kept, _environment(): cache}))
        os.replace(partial, path)
    return found


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flcore" / "commands.json"


def _environment() -> str:
    """This interpreter and its import path, as a short key."""
    return f"{zlib.crc32(json.dumps([sys.executable, sys.path]).encode()):08x}"


def _read_cache() -> _CommandCache | None:
    try:
        cache: _CommandCache = json.loads(_cache_file().read_text())[_environment()]
        valid = cache["path"] == sys.path and _stamps(cache["stamps"]) == cache["stamps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return cache if valid else None


def _stamps(paths: Iterable[str]) -> dict[str, int]:
    stamps = {}
    for p in paths:
        try:
            stamps[p] = os.stat(p).st_mtime_ns
        except OSError:
            stamps[p] = -1
    return stamps


def _load_value(value: str) -> Any:
    """What the entry point ``value`` (``module:attr.attr``) names, without importlib.metadata."""
    module, _, attrs_path = value.partition(":")
    obj: Any = importlib.import_module(module.strip())
    for attr in attrs_path.split("[")[0].strip().split(".") if attrs_path else ():
        obj = getattr(obj, attr)
    return obj


def _implements_commands(plugin: Any) -> bool:
    return (
        pluggy.PluginManager(PROJECT_NAME).parse_hookimpl_opts(plugin, "register_commands")
        is not None
    )


# -- helpers ------------------------------------------------------------------------------


def _load_failure(name: str, dist: str, value: str, err: BaseException) -> PluginError:
    return PluginError(
        f"plugin {name!r} (distribution {dist}, entry point {value!r}) failed to load: "
        f"{_describe(err)}"
    )


def _describe(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _reworded(err: pluggy.PluginValidationError) -> str:
    """pluggy's multi-line message as the end of one line: `` implements 'hook': reason``."""
    lines = str(err).splitlines()
    hook = re.search(r"hook '(\w+)'", lines[0])
    return f"{f' implements {hook.group(1)!r}' if hook else ''}: {lines[-1]}"


def _closest(hook: str, known: pluggy.PluginManager) -> str:
    import difflib

    names = [n for n, caller in vars(known.hook).items() if caller.has_spec()]
    near = difflib.get_close_matches(hook, names, n=1, cutoff=0.8)  # a typo, not a cousin
    return f" (did you mean {near[0]!r}?)" if near else ""


def _spec_names(namespace: Any) -> list[str]:
    if namespace is None:
        return []
    return [n for n in dir(namespace) if hasattr(getattr(namespace, n), f"{PROJECT_NAME}_spec")]


def _flcore_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flcore")
    except PackageNotFoundError:
        return "unknown"
