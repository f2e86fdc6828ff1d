"""BatchNorm statistics for every posterior sample, computed federated.

A sampled weight vector needs the BatchNorm statistics of its own activations (Maddox et al.
recompute them on the training data). The training data stay on the clients, so the server
sends the posterior, each client draws the same seeded samples and returns, per sample and
BatchNorm layer, the exact mean and population variance of the layer's input over its training
data, and the server pools them by the law of total variance: the statistics of all clients'
data together.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from flcore import CodecError, FLCoreError, as_tensors, batches, decode_tensors, encode_tensors
from flcore_swag.aggregation import weighted_moments
from flcore_swag.posterior import BN, Posterior

if TYPE_CHECKING:
    from flcore import ClientContext, Payload

REQUEST = "swag_batchnorm"
MODEL = "model/"
_BatchNorm = torch.nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The BatchNorm layers that keep running statistics, by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.track_running_stats
    }


def statistic_names(model: torch.nn.Module) -> list[str]:
    """The buffers a BatchNorm pass recomputes: ``<layer>.running_mean`` and ``.running_var``."""
    return [
        f"{layer}.{stat}"
        for layer in batchnorm_layers(model)
        for stat in ("running_mean", "running_var")
    ]


class _Moments:
    """Per-channel count, mean and centred sum of squares, merged batch by batch (Chan)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = torch.zeros(0, dtype=torch.float64)
        self.m2 = torch.zeros(0, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        values = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        n = values.shape[1]
        mean = values.mean(dim=1)
        m2 = ((values - mean[:, None]) ** 2).sum(dim=1)
        if not self.count:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total


def _no_singletons(data: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    # BatchNorm in training mode refuses a batch of one: fold a last single example into
    # the batch before it.
    pending = None
    for batch in batches(data, batch_size, tensors=as_tensors(data)):
        if pending is not None:
            if len(batch[0]) == 1:
                batch = tuple(torch.cat([a, b]) for a, b in zip(pending, batch, strict=True))
            else:
                yield pending
        pending = batch
    if pending is not None:
        yield pending


def batchnorm_statistics(
    model: torch.nn.Module, data: Any, batch_size: int
) -> dict[str, torch.Tensor]:
    """The mean and population variance (float64) of every BatchNorm layer's input over
    ``data``, with the layers normalising by batch statistics as in training (SWAG's
    ``bn_update``, but pooled exactly instead of a running average); other layers (dropout)
    in evaluation mode. The model's own buffers are left as they were."""
    layers = batchnorm_layers(model)
    moments = {name: _Moments() for name in layers}
    saved = {n: b.clone() for n, b in model.named_buffers()}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, acc=moments[name]: acc.add(args[0]))
        for name, module in layers.items()
    ]
    was_training = model.training
    try:
        model.eval()
        for module in layers.values():
            module.train()
        with torch.no_grad():
            for inputs, *_ in _no_singletons(data, batch_size):
                model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
    stats = {}
    for name, acc in moments.items():
        if not acc.count:
            raise FLCoreError(f"BatchNorm layer {name!r} saw no input")
        stats[f"{name}.running_mean"] = acc.mean
        stats[f"{name}.running_var"] = acc.m2 / acc.count
    return stats


# -- the round trip -------------------------------------------------------------------


def request_payload(
    posterior: Posterior, global_model: Mapping[str, torch.Tensor], round: int
) -> bytearray:
    """What the server sends: the posterior (samples drawn the same way everywhere) and the
    global model (for the buffers a sample does not set)."""
    tensors, meta = posterior.to_payload()
    tensors.update({MODEL + k: v for k, v in global_model.items()})
    return encode_tensors(tensors, {"kind": REQUEST, "round": round, "posterior": meta})


def answer(ctx: ClientContext, payload: Payload) -> Payload:
    """A client's answer: per sample, the statistics of its training data."""
    model = ctx.model
    if model is None:
        raise FLCoreError(f"{REQUEST} runs on a client only")
    what = f"SWAG BatchNorm request sent to {ctx.client_id}"
    tensors, meta = decode_tensors(payload, what=what)
    if meta.get("kind") != REQUEST or not isinstance(meta.get("round"), int):
        raise CodecError(f"{what}: malformed")
    model.load_state_dict(
        {k.removeprefix(MODEL): v for k, v in tensors.items() if k.startswith(MODEL)}
    )
    posterior_meta = meta.get("posterior")
    if not isinstance(posterior_meta, dict):
        raise CodecError(f"{what}: no posterior")
    posterior = Posterior.from_payload(
        {k: v for k, v in tensors.items() if not k.startswith(MODEL)}, posterior_meta, what
    )
    posterior.check_fits(model)
    ctx.round = meta["round"]
    out = {}
    data = ctx.train_data
    for index, theta in enumerate(posterior.draws(posterior.samples)):
        posterior.load_sample(model, theta)
        for key, value in batchnorm_statistics(model, data, ctx.job.local.batch_size).items():
            out[f"{BN}{index}/{key}"] = value
    return encode_tensors(
        out,
        {
            "kind": "swag_batchnorm_statistics",
            "client_id": ctx.client_id,
            "round": ctx.round,
            "num_samples": len(data),
        },
    )


def read_answer(
    payload: Payload,
    sender: str,
    *,
    round: int,
    samples: int,
    shapes: Mapping[str, Sequence[int]],
) -> tuple[int, list[dict[str, torch.Tensor]]]:
    """Check a client's answer: ``(num_samples, statistics of each sample)``."""
    what = f"SWAG BatchNorm statistics from {sender}"
    tensors, meta = decode_tensors(payload, what=what)
    if meta.get("kind") != "swag_batchnorm_statistics" or meta.get("client_id") != sender:
        raise CodecError(f"{what}: not this client's BatchNorm statistics")
    if meta.get("round") != round:
        raise CodecError(f"{what}: round {meta.get('round')!r}, the current round is {round}")
    n = meta.get("num_samples")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise CodecError(f"{what}: bad sample count {n!r}")
    expected = {f"{BN}{i}/{key}" for i in range(samples) for key in shapes}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CodecError(
            f"{what}: missing {missing[:3]}" if missing else f"{what}: unexpected {extra[:3]}"
        )
    stats: list[dict[str, torch.Tensor]] = [{} for _ in range(samples)]
    for key, value in tensors.items():
        index, _, name = key.removeprefix(BN).partition("/")
        if not value.is_floating_point() or tuple(value.shape) != tuple(shapes[name]):
            raise CodecError(
                f"{what}: {key} has dtype {value.dtype} and shape "
                f"{tuple(value.shape)}, expected {tuple(shapes[name])}"
            )
        if not bool(torch.isfinite(value).all()):
            raise CodecError(f"{what}: {key} has NaN or infinite values")
        if name.endswith("running_var") and bool((value < 0).any()):
            raise CodecError(f"{what}: {key} has negative variances")
        stats[int(index)][name] = value.to(torch.float64)
    return n, stats


def pool(
    answers: Sequence[tuple[int, Sequence[Mapping[str, torch.Tensor]]]],
    dtypes: Mapping[str, torch.dtype],
) -> list[dict[str, torch.Tensor]]:
    """Per sample: every layer's statistics over all clients' data, weighted by their sample
    counts (the law of total variance), cast to the model's buffer dtypes."""
    weights = [float(n) for n, _ in answers]
    samples = len(answers[0][1])
    pooled = []
    for index in range(samples):
        stats: dict[str, torch.Tensor] = {}
        for key in answers[0][1][index]:
            if not key.endswith(".running_mean"):
                continue
            layer = key.removesuffix(".running_mean")
            parts = [(s[index][key], s[index][f"{layer}.running_var"]) for _, s in answers]
            mean, var = weighted_moments(parts, weights)
            stats[key] = mean.to(dtypes[key])
            stats[f"{layer}.running_var"] = var.to(dtypes[f"{layer}.running_var"])
        pooled.append(stats)
    return pooled
