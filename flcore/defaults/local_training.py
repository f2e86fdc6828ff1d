"""The core's ``local_train``: a plain torch SGD loop with the job's ``[local]`` settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flcore.markers import hookimpl

if TYPE_CHECKING:
    import torch


@hookimpl
def local_train(ctx: Any, model: torch.nn.Module, data: Any) -> dict[str, Any]:
    import torch  # imported on use, so that listing plugins stays fast

    from flcore.data import as_tensors, batches, derive_seed, seed_torch
    from flcore.defaults.evaluation import loss_function

    settings = ctx.job.local
    seed = derive_seed(ctx.job.job.seed, "train", ctx.round, ctx.client_id)
    seed_torch(seed)  # dropout and other random layers
    generator = torch.Generator().manual_seed(seed)
    loss_fn = loss_function(ctx.task, data)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    tensors = as_tensors(data)
    model.train()
    iterations, loss_sum = 0, 0.0
    for _ in range(settings.epochs):
        for inputs, targets in batches(data, settings.batch_size, generator, tensors):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            iterations += 1
    return {
        "num_samples": len(data),
        "local_iterations": iterations,
        "metrics": {"train_loss": loss_sum / max(iterations, 1)},
    }
