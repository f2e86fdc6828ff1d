"""``[plugins.swag]``: how clients collect SWAG moments and how the posterior is sampled."""

from __future__ import annotations

from typing import Any, Literal

import attrs


def _at_least(minimum: float) -> Any:
    def check(_instance: object, attribute: Any, value: float | None) -> None:
        if value is not None and value < minimum:
            raise ValueError(f"{attribute.name} must be at least {minimum}, got {value}")

    return check


def _positive(_instance: object, attribute: Any, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _rank(_instance: object, attribute: Any, value: int) -> None:
    # D z / sqrt(K - 1) needs K >= 2 columns; K = 0 is SWAG-Diag.
    if value < 0 or value == 1:
        raise ValueError(f"{attribute.name} must be 0 (SWAG-Diag) or at least 2, got {value}")


@attrs.frozen
class Settings:
    """Every key of ``[plugins.swag]``; the defaults follow Maddox et al. (2019)."""

    #: SWAG collection rounds after the training rounds; each one restarts every client from the
    #: global model with a fresh seed, and the posterior pools all of them.
    rounds: int = attrs.field(default=1, validator=_at_least(1))
    #: Collection epochs per client and round (ignored when ``steps`` is set).
    epochs: int = attrs.field(default=20, validator=_at_least(1))
    #: Collection SGD steps per client and round, instead of ``epochs``.
    steps: int | None = attrs.field(default=None, validator=_at_least(1))
    #: SGD steps between two snapshots; ``None`` takes one snapshot per epoch, as the paper does.
    snapshot_every: int | None = attrs.field(default=None, validator=_at_least(1))
    #: The constant learning rate of the collection; ``None`` uses ``[local] lr``.
    lr: float | None = attrs.field(default=None, validator=_positive)
    #: K: the most deviation columns a client sends and the posterior keeps (0: SWAG-Diag).
    rank: int = attrs.field(default=20, validator=_rank)
    #: S: posterior samples of the Bayesian model average (``flcore predict --samples`` overrides).
    samples: int = attrs.field(default=30, validator=_at_least(1))
    #: Covariance scale of the draws: 0.5 for full SWAG, 1 for SWAG-Diag, 0 for the SWA mean.
    scale: float = attrs.field(default=0.5, validator=_at_least(0.0))
    #: The smallest variance kept; a smaller (or negative, rounded) variance is raised to it.
    var_clamp: float = attrs.field(default=1e-30, validator=_at_least(0.0))
    #: Recompute BatchNorm statistics for every posterior sample (a federated pass over the
    #: clients' training data); without it every sample keeps the global model's statistics.
    bn_update: bool = True
    #: How clients are weighted in the mixture: by training samples or by snapshots taken.
    weight_by: Literal["samples", "snapshots"] = "samples"

    def __attrs_post_init__(self) -> None:
        steps, every = self.steps, self.snapshot_every
        if steps is not None and every is not None and every > steps:
            raise ValueError(
                f"snapshot_every ({every}) is above steps ({steps}): no snapshot would be taken"
            )
