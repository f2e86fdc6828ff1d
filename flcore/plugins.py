"""Finding plugins: the ``flcore.plugins`` entry points and the core's own defaults.

Only plugins a job names are imported for a run; ``flcore plugins`` imports all of them,
recording (not raising) the ones that fail.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Final

import attrs

from flcore.errors import JobError, PluginError
from flcore.settings import build_settings

ENTRY_POINT_GROUP: Final = "flcore.plugins"

#: The core's defaults: ordinary plugins, always active, answering after the job's chain.
DEFAULT_PLUGINS: Final[Mapping[str, str]] = {
    "core.console": "flcore.defaults.console",
    "core.trainer": "flcore.defaults.trainer_class",
    "core.runtime": "flcore.defaults.runtime",
    "core.fedavg": "flcore.defaults.fedavg",
    "core.local_training": "flcore.defaults.local_training",
    "core.evaluation": "flcore.defaults.evaluation",
}


@attrs.frozen
class PluginInfo:
    """What ``flcore plugins`` shows about one plugin."""

    name: str
    distribution: str
    version: str
    target: str
    hooks: tuple[str, ...] = ()
    error: str | None = None
    builtin: bool = False


def installed_entry_points() -> dict[str, list[EntryPoint]]:
    """Every entry point in the ``flcore.plugins`` group, by plugin name."""
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
        dist, version = distribution_of(ep)
        raise PluginError(
            f"plugin {name!r} (distribution {dist} {version}, entry point {ep.value!r}) "
            f"failed to load: {type(err).__name__}: {err}"
        ) from err


def find_plugin(name: str, extra: Mapping[str, Any] | None = None) -> Any:
    """The object registered as ``name``: from ``extra`` (tests, custom stacks) or an entry point."""
    if extra and name in extra:
        return extra[name]
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


def implemented_hooks(obj: Any) -> tuple[str, ...]:
    """The names of the hooks ``obj`` implements (methods marked with ``hookimpl``)."""
    from flcore import hookspecs
    from flcore.markers import PROJECT_NAME

    names = []
    for attr in dir(obj):  # on a class, the marked functions carry the marker too
        try:
            member = getattr(obj, attr)
        except Exception:
            continue
        if hasattr(member, f"{PROJECT_NAME}_impl"):
            names.append(attr)
    known = set(_spec_names(hookspecs)) | set(_plugin_spec_names(obj))
    return tuple(n for n in sorted(names) if n in known)


def list_plugins() -> list[PluginInfo]:
    """Every installed plugin (and the core's defaults), loading each and recording failures."""
    infos = [
        PluginInfo(
            name=name,
            distribution="flcore",
            version=_flcore_version(),
            target=module,
            hooks=implemented_hooks(importlib.import_module(module)),
            builtin=True,
        )
        for name, module in DEFAULT_PLUGINS.items()
    ]
    for name, eps in sorted(installed_entry_points().items()):
        for ep in eps:
            dist, version = distribution_of(ep)
            try:
                obj = load_entry_point(name, ep)
                hooks, error = implemented_hooks(obj), None
            except PluginError as err:
                hooks, error = (), str(err)
            infos.append(PluginInfo(name, dist, version, ep.value, hooks, error))
    return infos


def _spec_names(module: Any) -> list[str]:
    from flcore.markers import PROJECT_NAME

    return [n for n in dir(module) if hasattr(getattr(module, n), f"{PROJECT_NAME}_spec")]


def _plugin_spec_names(obj: Any) -> list[str]:
    specs = getattr(obj, "flcore_hookspecs", None)
    return _spec_names(specs) if specs is not None else []


def _flcore_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flcore")
    except PackageNotFoundError:
        return "unknown"
