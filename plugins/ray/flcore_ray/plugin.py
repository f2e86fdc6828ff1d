"""The ``ray`` plugin: answers ``get_runtime`` when the job says ``[job] runtime = "ray"``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flcore import JobError, hookimpl
from flcore_ray.settings import RaySettings

if TYPE_CHECKING:
    from flcore import ServerContext
    from flcore_ray.runtime import RayRuntime

#: The runtime name this plugin provides in ``[job] runtime``.
RUNTIME_NAME = "ray"


class RayPlugin:
    """Name ``ray`` in ``[plugins] chain`` and set ``[job] runtime = "ray"``."""

    Settings = RaySettings

    def __init__(self, settings: RaySettings | None = None) -> None:
        self.settings = settings if settings is not None else RaySettings()

    @hookimpl
    def check_job(self, ctx: ServerContext) -> None:
        job = ctx.job
        if job.job.runtime == RUNTIME_NAME and job.job.workers > 0:
            raise JobError(
                f"{job.where('job')}.workers = {job.job.workers}: worker processes belong to the "
                "embedded runtime; on Ray set [plugins.ray] actors (or leave it out)"
            )

    @hookimpl
    def startup(self, ctx: ServerContext) -> None:
        # a warning, not a refusal: --set job.runtime=embedded compares runtimes on one file
        if ctx.job.job.runtime != RUNTIME_NAME:
            ctx.log.warning(
                "ray_not_used",
                message=f"'ray' is in the chain but {ctx.job.where('job')}.runtime is "
                f"{ctx.job.job.runtime!r}: the clients run there, not on Ray",
            )

    @hookimpl
    def get_runtime(self, ctx: ServerContext) -> RayRuntime | None:
        if ctx.job.job.runtime != RUNTIME_NAME:
            return None
        from flcore_ray.runtime import RayRuntime

        return RayRuntime(self.settings)
