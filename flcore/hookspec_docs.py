"""Read the hook list out of :mod:`flcore.hookspecs` (for ``flcore hooks`` and the docs)."""

from __future__ import annotations

import inspect
import re

from flcore import hookspecs
from flcore.markers import PROJECT_NAME


def hook_names() -> list[str]:
    """Every hookspec, in the order the module defines them."""
    specs = [
        (inspect.getsourcelines(fn)[1], name)
        for name, fn in vars(hookspecs).items()
        if callable(fn) and hasattr(fn, f"{PROJECT_NAME}_spec")
    ]
    return [name for _, name in sorted(specs)]


def hook_summaries() -> list[tuple[str, str, str, str]]:
    """``(name, "handler" | "strategy", side, first docstring line)`` for every hook."""
    rows = []
    for name in hook_names():
        fn = getattr(hookspecs, name)
        opts = getattr(fn, f"{PROJECT_NAME}_spec")
        doc = inspect.getdoc(fn) or ""
        side = re.search(r"Side: (\w+)", doc)
        rows.append(
            (
                name,
                "strategy" if opts.get("firstresult") else "handler",
                side.group(1) if side else "?",
                doc.splitlines()[0] if doc else "",
            )
        )
    return rows
