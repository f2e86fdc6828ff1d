"""FedAvg, the core's ``aggregate``: the sample-weighted mean of the contributions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flcore.markers import hookimpl


@hookimpl
def aggregate(ctx: Any, contributions: Iterable[Any]) -> dict[str, Any]:
    from flcore.aggregation import weighted_mean  # torch: imported on use, not on listing

    exact = ctx is None or ctx.job.job.exact_mean
    # all in hand: averaged a block at a time across them, each weight read once
    return weighted_mean([(c.weights, c.num_samples) for c in contributions], exact)


@hookimpl
def server_update(ctx: Any, aggregate: dict[str, Any]) -> dict[str, Any]:
    """Plain FedAvg's server step: the aggregate is the new global model."""
    return aggregate
