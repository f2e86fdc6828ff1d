"""Read the hook list out of hookspecs (for ``flcore hooks`` and the docs): the core's
:mod:`flcore.hookspecs`, and the hooks installed plugins declare as ``flcore_hookspecs``."""

from __future__ import annotations

import inspect
import re
from typing import Any, NamedTuple

from flcore import hookspecs
from flcore.markers import PROJECT_NAME


class HookSummary(NamedTuple):
    """One row of ``flcore hooks``."""

    name: str
    kind: str  # "handler" or "strategy"
    side: str
    line: str  # the docstring's first line


def hook_names(specs: Any = hookspecs) -> list[str]:
    """Every hookspec of ``specs`` (a module or class), in the order it defines them."""
    found = []
    for name, fn in vars(specs).items():
        if callable(fn) and hasattr(fn, f"{PROJECT_NAME}_spec"):
            try:
                line = inspect.getsourcelines(fn)[1]
            except (OSError, TypeError):  # defined without source: after those with one
                line = 1 << 30
            found.append((line, name))
    return [name for _, name in sorted(found)]


def hook_summaries(specs: Any = hookspecs) -> list[HookSummary]:
    """A :class:`HookSummary` for every hook of ``specs``, in the order it defines them."""
    rows = []
    for name in hook_names(specs):
        fn = getattr(specs, name)
        opts = getattr(fn, f"{PROJECT_NAME}_spec")
        doc = inspect.getdoc(fn) or ""
        side = re.search(r"Side: (\w+)", doc)
        rows.append(
            HookSummary(
                name,
                "strategy" if opts.get("firstresult") else "handler",
                side.group(1) if side else "?",
                doc.splitlines()[0] if doc else "",
            )
        )
    return rows


def every_hook() -> list[tuple[str, HookSummary]]:
    """``(declared by, summary)``: the core's hooks (``"core"``), then those of each installed
    plugin that declares its own, by plugin name. Loads every installed plugin; one that
    fails to load declares nothing here (``flcore plugins`` says why)."""
    from flcore.plugins import installed_hookspecs

    rows = [("core", row) for row in hook_summaries()]
    for plugin, specs in installed_hookspecs():
        rows += [(plugin, row) for row in hook_summaries(specs)]
    return rows
