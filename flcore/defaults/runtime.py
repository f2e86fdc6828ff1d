"""The core's answer to ``get_runtime``: the embedded runtime, clients in this process."""

from __future__ import annotations

from typing import Any

from flcore.markers import hookimpl


@hookimpl
def get_runtime(ctx: Any) -> Any:
    if ctx.job.job.runtime != "embedded":
        return None
    from flcore.runtime.embedded import EmbeddedRuntime

    return EmbeddedRuntime()
