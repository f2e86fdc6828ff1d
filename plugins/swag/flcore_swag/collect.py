"""The client's side of a SWAG round: constant-learning-rate SGD from the global model,
snapshots, and their moments sent back by parameter name."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from flcore import FLCoreError, as_tensors, batches, derive_seed, loss_function, seed_torch
from flcore_swag.moments import ClientMoments, SnapshotMoments
from flcore_swag.settings import Settings

if TYPE_CHECKING:
    from flcore import ClientContext, Payload

REQUEST = "swag_collect"


def schedule(settings: Settings, num_samples: int, batch_size: int) -> tuple[int, int]:
    """``(steps, snapshot_every)`` for a client with ``num_samples`` training samples."""
    per_epoch = math.ceil(num_samples / batch_size)
    steps = settings.steps if settings.steps is not None else settings.epochs * per_epoch
    every = settings.snapshot_every if settings.snapshot_every is not None else per_epoch
    return steps, every


def sgd_snapshots(
    model: torch.nn.Module,
    data: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    steps: int,
    snapshot_every: int,
    generator: torch.Generator,
    losses: list[float] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Run ``steps`` SGD steps at the constant ``lr`` from ``model``'s current weights,
    reshuffling every epoch; yield the named parameters after every ``snapshot_every``-th
    step (live tensors: copy what you keep). Each step's loss goes to ``losses``."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    tensors = as_tensors(data)
    model.train()
    step = 0
    while step < steps:
        for inputs, targets in batches(data, batch_size, generator, tensors):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            step += 1
            if losses is not None:
                losses.append(float(loss.detach()))
            if step % snapshot_every == 0:
                yield dict(model.named_parameters())
            if step == steps:
                return


def collect(ctx: ClientContext, payload: Payload, settings: Settings) -> Payload:
    """Answer a ``swag_collect`` request on a client: the reply is :class:`ClientMoments`."""
    model = ctx.model
    if model is None:
        raise FLCoreError("swag_collect runs on a client only")
    ctx.receive(payload, "global model for SWAG")
    data = ctx.train_data
    if len(data) == 0:
        raise FLCoreError(f"{ctx.client_id}: no training data to collect SWAG moments on")
    local = ctx.job.local
    steps, every = schedule(settings, len(data), local.batch_size)
    seed = derive_seed(ctx.job.job.seed, "swag", ctx.round, ctx.client_id)
    seed_torch(seed)  # dropout and other random layers
    moments = SnapshotMoments(settings.rank)
    losses: list[float] = []
    for params in sgd_snapshots(
        model,
        data,
        loss_function(ctx.task, data),
        lr=settings.lr if settings.lr is not None else local.lr,
        momentum=local.momentum,
        weight_decay=local.weight_decay,
        batch_size=local.batch_size,
        steps=steps,
        snapshot_every=every,
        generator=torch.Generator().manual_seed(seed),
        losses=losses,
    ):
        moments.add(params)
    if not moments.count:
        raise FLCoreError(f"{ctx.client_id}: {steps} steps gave no snapshot (every {every})")
    return ClientMoments(
        client_id=ctx.client_id,
        round=ctx.round,
        num_samples=len(data),
        num_snapshots=moments.count,
        gaussian=moments.result(),
        metrics={"swag_train_loss": sum(losses) / len(losses), "steps": steps},
    ).encode()
