"""The SWAG round's own events. A SWAG round is not a training round (it changes no global
model), so it fires these instead of ``start_round`` / ``after_aggregation`` / ``end_round``,
through the same chain and with the same rollback. Any plugin in the chain may implement them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flcore import hookspec

if TYPE_CHECKING:
    from flcore import ServerContext
    from flcore_swag.moments import ClientMoments
    from flcore_swag.posterior import Posterior


@hookspec
def start_swag_round(ctx: ServerContext, swag_round: int) -> None:
    """A SWAG collection round begins (the DLR ``SWAGModelTrainer``'s SWAG round).

    Side: server. Fires after the round's snapshot was taken and ``ctx.round`` was advanced
    (SWAG rounds are numbered on after the training rounds); ``swag_round`` counts SWAG rounds
    from 1. The clients then collect from ``ctx.global_model``. The return value is ignored.
    """


@hookspec
def receive_swag_moments(ctx: ServerContext, moments: ClientMoments) -> bool | str | None:
    """A client's SWAG moments arrived and passed the plugin's validation.

    Side: server. ``moments`` holds the client's mean, variance and deviation columns by
    parameter name (float64). Return ``False`` or a reason (``str``) to refuse them: they are
    logged and left out of the posterior. ``None`` or ``True`` accepts them.
    """


@hookspec
def after_swag_aggregation(ctx: ServerContext, posterior: Posterior) -> None:
    """The accepted moments were aggregated: ``posterior`` is the run's posterior so far.

    Side: server. Fires once per SWAG round, after moment matching (and the BatchNorm pass).
    Treat ``posterior`` as read-only; it is written to the run directory when the round ends.
    """


@hookspec
def end_swag_round(ctx: ServerContext) -> None:
    """The SWAG round is complete: ``ctx.metrics`` holds its line of ``metrics.jsonl``.

    Side: server. Handlers may add entries to ``ctx.metrics``. After this event the posterior
    (``swag.safetensors``) and the round's metrics are written.
    """
