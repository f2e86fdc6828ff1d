"""The core's ``local_train``: a plain torch loop with the job's ``[local]`` settings.

Plugins shape it without replacing it: ``local_optimizer`` picks the optimizer,
``local_loss_term`` adds to each batch's loss, ``after_optimizer_step`` acts after each
step. Each hook is asked once per round whether anything implements it, so a plain job
runs the bare loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flcore.markers import hookimpl

if TYPE_CHECKING:
    import torch


@hookimpl
def local_optimizer(ctx: Any, model: torch.nn.Module) -> Any:
    import torch

    settings = ctx.job.local
    return torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )


@hookimpl
def local_train(ctx: Any, model: torch.nn.Module, data: Any) -> dict[str, Any]:
    import torch  # imported on use, so that listing plugins stays fast

    from flcore.data import as_tensors, batches, derive_seed, seed_torch
    from flcore.defaults.evaluation import loss_function
    from flcore.errors import FLCoreError

    settings = ctx.job.local
    seed = derive_seed(ctx.job.job.seed, "train", ctx.round, ctx.client_id)
    seed_torch(seed)  # dropout and other random layers
    generator = torch.Generator().manual_seed(seed)
    loss_fn = loss_function(ctx.task, data)
    optimizer = ctx.ask("local_optimizer", model=model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise FLCoreError(f"local_optimizer answered {optimizer!r}, not a torch optimizer")
    extra_terms = ctx.handles("local_loss_term")
    after_step = ctx.handles("after_optimizer_step")
    tensors = as_tensors(data)
    model.train()
    iterations, loss_sum = 0, 0.0
    for _ in range(settings.epochs):
        for inputs, targets in batches(data, settings.batch_size, generator, tensors):
            optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            total = loss
            if extra_terms:
                for _plugin, term in ctx.fire(
                    "local_loss_term",
                    model=model,
                    inputs=inputs,
                    targets=targets,
                    outputs=outputs,
                    loss=loss,
                ):
                    if term is not None:
                        total = total + term
            total.backward()
            optimizer.step()
            iterations += 1
            if after_step:
                ctx.fire("after_optimizer_step", model=model, optimizer=optimizer, step=iterations)
            loss_sum += loss.item()
    return {
        "num_samples": len(data),
        "local_iterations": iterations,
        "metrics": {"train_loss": loss_sum / max(iterations, 1)},
    }
