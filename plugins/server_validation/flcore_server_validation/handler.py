"""Clara's ``ServerValidationHandler``: score the new global model on the server's own data.

Clients' metrics describe their own data; a server that holds a curated validation set wants
the global model scored on it every few rounds, without slowing every round. The handler does
it in ``after_aggregation``, so that plugins later in the chain (model selection reading the
server's metric) see the result in the same event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from flcore import JobError, hookimpl
from flcore_server_validation.evaluator import Evaluator, hook_evaluator, import_evaluator
from flcore_server_validation.settings import ServerValidationSettings

if TYPE_CHECKING:
    from flcore import ServerContext

#: The plugin's name in a job's chain and the key of its state in ``ctx.state``.
PLUGIN_NAME: Final = "server_validation"
#: The key of the server's metrics in ``ctx.metrics``, ``metrics.jsonl`` and the round line.
METRICS_KEY: Final = "server"


def validation_due(round: int, rounds: int, every: int) -> bool:
    """Clara's schedule: every ``every``-th round, and always the last one."""
    return round % every == 0 or round >= rounds


class ServerValidationHandler:
    """Evaluates the global model on the task's ``server_data()`` after aggregation, on every
    ``num_rounds_per_valid``-th round and on the last round.

    On an evaluated round it leaves the metrics (name -> float) in ``ctx.metrics["server"]``,
    which becomes the ``server`` key of that round's line in ``metrics.jsonl`` and the
    ``server.*`` fields of the console's round line, and in ``ctx.state["server_validation"]``
    as ``{"round": r, "metrics": {...}}``: the latest evaluation, kept across rounds.
    """

    Settings = ServerValidationSettings

    def __init__(self, settings: ServerValidationSettings | None = None) -> None:
        self.settings = settings if settings is not None else ServerValidationSettings()
        self.evaluator: Evaluator | None = None
        self.data: Any = None
        # What this round's after_aggregation replaced, for rollback: (round, previous state).
        self._undo: tuple[int, Any] | None = None

    # -- before training ----------------------------------------------------------------

    @hookimpl
    def check_job(self, ctx: ServerContext) -> None:
        """Refuse a job that cannot be validated: no ``server_data()``, an empty one, or an
        evaluator that cannot be imported."""
        where = ctx.job.where(f"plugins.{PLUGIN_NAME}")
        if not ctx.task.has_server_data:
            raise JobError(
                f"{where}: server validation needs held-out data on the server, but task "
                f"{ctx.task.path!r} has no server_data(); add a server_data() returning a "
                f"Dataset of (input, target) to the task, or remove {PLUGIN_NAME!r} from "
                "[plugins] chain"
            )
        self.evaluator = self._resolve_evaluator(ctx)
        self.data = self._load_data(ctx)

    @hookimpl
    def startup(self, ctx: ServerContext) -> None:
        evaluator, data = self._ready(ctx)
        if self.settings.num_rounds_per_valid > ctx.job.job.rounds:
            ctx.log.warning(
                "server_validation_last_round_only",
                num_rounds_per_valid=self.settings.num_rounds_per_valid,
                rounds=ctx.job.job.rounds,
            )
        ctx.log.info(
            "server_validation_ready",
            evaluator=evaluator.name,
            num_rounds_per_valid=self.settings.num_rounds_per_valid,
            samples=_length(data),
        )

    # -- a round ------------------------------------------------------------------------

    @hookimpl
    def after_aggregation(self, ctx: ServerContext) -> None:
        self._undo = None
        if not validation_due(ctx.round, ctx.job.job.rounds, self.settings.num_rounds_per_valid):
            return
        metrics = self.validate(ctx, ctx.global_model)
        # Written only once the evaluator's result passed its checks: a failed evaluation
        # leaves nothing behind.
        self._undo = (ctx.round, ctx.state.get(PLUGIN_NAME))
        ctx.metrics[METRICS_KEY] = metrics
        ctx.state[PLUGIN_NAME] = {"round": ctx.round, "metrics": dict(metrics)}
        ctx.log.info(
            "server_validation",
            round=ctx.round,
            evaluator=self._ready(ctx)[0].name,
            metrics=metrics,
        )

    @hookimpl
    def rollback(self, ctx: ServerContext) -> None:
        """A plugin later in ``after_aggregation`` failed: take this round's metrics back."""
        if self._undo is None:
            return
        round, previous = self._undo
        self._undo = None
        ctx.metrics.pop(METRICS_KEY, None)
        if previous is None:
            ctx.state.pop(PLUGIN_NAME, None)
        else:
            ctx.state[PLUGIN_NAME] = previous
        ctx.log.info("server_validation_rolled_back", round=round)

    @hookimpl
    def shutdown(self, ctx: ServerContext) -> None:
        self.data = None  # the server's data set may be large; the run is over

    # -- the evaluation -----------------------------------------------------------------

    def validate(self, ctx: ServerContext, weights: Any) -> dict[str, float]:
        """Score ``weights`` on the server's data with the evaluator, in a fresh model.

        The evaluation runs under its own seed and restores torch's random state after, so a
        random evaluator (dropout, sampling) is reproducible and adding server validation to
        a chain never changes what the clients train.
        """
        import torch

        from flcore import derive_seed, seed_torch

        evaluator, data = self._ready(ctx)
        with torch.random.fork_rng(devices=[]):
            seed_torch(derive_seed(ctx.job.job.seed, PLUGIN_NAME, ctx.round))
            model = ctx.task.model()
            model.load_state_dict(weights)
            model.eval()
            return evaluator(ctx, model, data)

    def _ready(self, ctx: ServerContext) -> tuple[Evaluator, Any]:
        """The evaluator and the server's data, resolved once: by ``check_job`` on every path
        through :func:`flcore.run_job`, here for a caller that drives a training itself."""
        if self.evaluator is None:
            self.evaluator = self._resolve_evaluator(ctx)
        if self.data is None:
            self.data = self._load_data(ctx)
        return self.evaluator, self.data

    def _resolve_evaluator(self, ctx: ServerContext) -> Evaluator:
        path = self.settings.evaluator
        if path is None:
            return hook_evaluator()
        return import_evaluator(path, f"{ctx.job.where(f'plugins.{PLUGIN_NAME}')}.evaluator")

    def _load_data(self, ctx: ServerContext) -> Any:
        where = ctx.job.where(f"plugins.{PLUGIN_NAME}")
        try:
            data = ctx.task.server_data()
        except JobError:
            raise
        except Exception as err:
            raise JobError(
                f"{where}: the server_data() of task {ctx.task.path!r} failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        if _length(data) == 0:
            raise JobError(
                f"{where}: the server_data() of task {ctx.task.path!r} is empty; server "
                "validation needs at least one (input, target) example"
            )
        return data


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None  # an iterable data set: its size is the evaluator's business
