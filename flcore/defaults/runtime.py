"""The core's answer to ``get_runtime``: clients on this machine, in this process or, with
``[job] workers = N``, in a pool of N worker processes."""

from __future__ import annotations

from typing import Any

from flcore.markers import hookimpl


@hookimpl
def get_runtime(ctx: Any) -> Any:
    if ctx.job.job.runtime != "embedded":
        return None
    if ctx.job.job.workers > 0:
        from flcore.runtime.pool import ProcessPoolRuntime

        return ProcessPoolRuntime(ctx.job.job.workers)
    from flcore.runtime.embedded import EmbeddedRuntime

    return EmbeddedRuntime()
