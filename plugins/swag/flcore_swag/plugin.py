"""The ``swag`` plugin: the hooks that put federated SWAG into a chain."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flcore import JobError, hookimpl
from flcore_swag import hookspecs
from flcore_swag.settings import Settings as SWAGSettings

if TYPE_CHECKING:  # torch: not imported to list plugins
    from flcore import ClientContext, Payload, ServerContext


class SWAGPlugin:
    """Federated SWAG: ``SWAGModelTrainer`` on the server, moment collection on the clients,
    and a Bayesian model average for ``predict``. Heavy modules load on first use, so
    ``flcore plugins`` stays fast."""

    Settings = SWAGSettings
    flcore_hookspecs = hookspecs

    def __init__(self, settings: SWAGSettings | None = None) -> None:
        self.settings = settings or SWAGSettings()
        self._loaded: tuple[Any, Any] | None = None  # (file key, posterior) of predict

    @hookimpl
    def check_job(self, ctx: ServerContext) -> None:
        where = ctx.job.where(f"plugins.{ctx.name_of(self) or 'swag'}")
        if self.settings.lr is None and not ctx.job.local.lr > 0:
            raise JobError(
                f"{where}.lr: SWAG collects at a constant, positive learning rate; "
                f"[local] lr is {ctx.job.local.lr}, so set lr in [plugins.swag]"
            )
        if not any(True for _ in ctx.task.model().parameters()):
            raise JobError(f"{where}: the task's model has no parameters to put a posterior on")

    @hookimpl
    def get_trainer_class(self, ctx: ServerContext) -> type:
        from flcore_swag.trainer import SWAGModelTrainer

        return SWAGModelTrainer

    @hookimpl
    def client_request(self, ctx: ClientContext, request: str, payload: Payload) -> Payload | None:
        from flcore_swag import batchnorm, collect

        if request == collect.REQUEST:
            return collect.collect(ctx, payload, self.settings)
        if request == batchnorm.REQUEST:
            return batchnorm.answer(ctx, payload)
        return None

    @hookimpl
    def predict(
        self, ctx: ServerContext | ClientContext, model: Any, inputs: Any, samples: int | None
    ) -> Any:
        posterior = self.posterior(ctx)
        if posterior is None:
            return None
        from flcore_swag.predict import bayesian_model_average

        return bayesian_model_average(model, posterior, inputs, samples or posterior.samples)

    @hookimpl
    def end_swag_round(self, ctx: ServerContext) -> None:
        from flcore_swag.report import swag_round_line

        swag = ctx.metrics.get("swag", {})
        ctx.log.info("swag_round_end", round=ctx.round, **swag)
        if ctx.console == "console":  # "json" has the event above, "quiet" nothing
            import sys

            print(swag_round_line(ctx, self.settings.rounds), file=sys.stderr, flush=True)

    def posterior(self, ctx: ServerContext | ClientContext) -> Any:
        """The run's posterior: the one this run built, else ``swag.safetensors`` in the run
        directory (read once per file version), else ``None``."""
        built = ctx.state.get("swag", {}).get("posterior")
        if built is not None:
            return built
        if ctx.run_dir is None:
            return None
        from flcore_swag.posterior import FILE, Posterior

        path = Path(ctx.run_dir) / FILE
        if not path.exists():
            ctx.log.warning("swag_no_posterior", path=str(path))
            return None
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = (key, Posterior.load(path))
        return self._loaded[1]
