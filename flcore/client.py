"""A client: bytes in, bytes out. Every runtime runs this same code wherever clients live.

The client loads its data once, keeps one model instance, and answers three requests:
``train`` (score the received global model, train locally, send a contribution),
``validate`` (test the models it is sent) and ``best_model`` (send its last local model);
plugins answer other requests through the ``client_request`` hook.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flcore import codec
from flcore.context import FLContext
from flcore.contribution import Contribution
from flcore.data import derive_seed, split_validation
from flcore.defaults.evaluation import primary_metric
from flcore.errors import CodecError
from flcore.flat_model import flat_model
from flcore.state import state_dict


def client_name(index: int) -> str:
    """The name of the client at ``index`` (0-based) in a simulated federation."""
    return f"client-{index}"


class Client:
    """One federation member, with its own context, data split and model."""

    def __init__(
        self,
        job: Any,
        task: Any,
        chain: Any,
        index: int,
        log: Any,
        model: Any = None,
        name: str | None = None,
    ) -> None:
        self.index = index
        self.name = name or client_name(index)  # a deployment's names may be its own
        self.ctx = FLContext(
            job=job,
            task=task,
            chain=chain,
            log=log.bind(client=self.name),
            side="client",
            client_id=self.name,
        )
        data = task.client_data(index, job.job.clients)
        seed = derive_seed(job.job.seed, "split", self.name)
        self.train_data, self.val_data = split_validation(data, job.local.validation_split, seed)
        # Clients that run one after another may share one model instance: every request
        # loads the weights it needs first, so nothing of one client leaks to the next.
        self.model: torch.nn.Module = model if model is not None else task.model()
        self.ctx.model = self.model
        self.ctx.client = self
        self.last_weights: dict[str, torch.Tensor] | None = None
        #: How requests are decoded; clients that share one loop share a :class:`RequestMemo`.
        self.decoder: RequestMemo | None = None

    def handle(self, request: str, payload: codec.Payload) -> codec.Payload:
        """Answer one request from the server; the reply is a codec payload."""
        if request == "train":
            return self.train(payload)
        if request == "validate":
            return self.validate(payload)
        if request == "best_model":
            return self.best_model()
        answer = self.ctx.ask("client_request", request=request, payload=payload)
        if answer is None:
            raise CodecError(f"{self.name}: no plugin answers request {request!r}")
        return bytes(answer)

    def receive(self, payload: codec.Payload, what: str) -> dict[str, torch.Tensor]:
        """Decode a model sent by the server, load it into ``self.model``, set the round, and
        return the model's own state dict (so a hook that edits it edits the model)."""
        self.take(payload, what)
        return state_dict(self.model)

    def take(self, payload: codec.Payload, what: str) -> None:
        """:meth:`receive` without building the state dict, for when nothing reads it."""
        # Views into the payload, copied once into the model by load: no second copy.
        where = f"{what} sent to {self.name}"
        if self.decoder is not None:
            weights, meta, flat = self.decoder.decode(payload, where)
        else:
            weights, meta, flat = codec.decode_flat(payload, what=where, copy=False)
        round_ = meta.get("round")
        if not isinstance(round_, int):
            raise CodecError(f"{where}: no round number")
        self.ctx.round = round_
        self.load(weights, what, flat)

    def load(
        self, weights: dict[str, torch.Tensor], what: str, flat: codec.Flat | None = None
    ) -> None:
        """Copy ``weights`` into the model: the names, shapes and dtypes must be the model's
        (``load_state_dict`` does the same with more overhead per call). ``flat``, the
        :class:`flcore.codec.Flat` they were decoded with, lets a model in the wire layout
        (:mod:`flcore.flat_model`) take them a dtype at a time; otherwise they are copied
        tensor by tensor."""
        wire = flat_model(self.model)
        target = state_dict(self.model, keep_vars=True)  # the tensors, copied into in place
        if flat is not None and wire is not None and wire.load(flat, weights, target):
            return
        if set(weights) != set(target):
            missing, extra = sorted(set(target) - set(weights)), sorted(set(weights) - set(target))
            raise CodecError(
                f"{what} sent to {self.name}: missing {missing[:5]}, unexpected {extra[:5]} tensors"
            )
        with torch.no_grad():
            for name, tensor in target.items():
                got = weights[name]
                if got.shape != tensor.shape or got.dtype != tensor.dtype:
                    raise CodecError(
                        f"{what} sent to {self.name}: tensor {name!r} is {got.dtype} "
                        f"{tuple(got.shape)}, the model's is {tensor.dtype} {tuple(tensor.shape)}"
                    )
                tensor.copy_(got)

    def train(self, payload: codec.Payload) -> codec.Payload:
        ctx = self.ctx
        self.take(payload, "global model")
        if ctx.handles("receive_model"):  # the state dict is built for a handler only
            ctx.fire("receive_model", weights=state_dict(self.model))
        initial = ctx.ask("evaluate", model=self.model, data=self.val_data) or {}
        result = ctx.ask("local_train", model=self.model, data=self.train_data)
        wire = flat_model(self.model)
        flat = None
        if wire is not None and wire.intact(state_dict(self.model, keep_vars=True)):
            local, flat = wire.weights, wire.flat  # sent as the buffer, in one copy
        else:
            local = state_dict(self.model)
        if not ctx.job.trainer.delete_local_models_after_aggregation:
            # kept for send_best_model; cloned since validation reloads the model in place
            self.last_weights = {k: v.detach().clone() for k, v in local.items()}
        metrics = dict(result.get("metrics", {}))
        metrics["initial_validation_metric"] = primary_metric(initial)
        metrics["initial_validation"] = initial
        return Contribution(
            client_id=self.name,
            round=ctx.round,
            weights=local,
            num_samples=int(result["num_samples"]),
            local_iterations=int(result["local_iterations"]),
            metrics=metrics,
            flat=flat,
        ).encode()

    def validate(self, payload: codec.Payload) -> codec.Payload:
        ctx = self.ctx
        weights = self.receive(payload, "model to validate")
        models: dict[str, Any] = {"global": {k: v.clone() for k, v in weights.items()}}
        ctx.fire("receive_validation_models", models=models)
        results: dict[str, dict[str, float]] = {}
        for name, model_weights in models.items():
            self.load(model_weights, f"model {name!r} to validate")
            results[name] = ctx.ask("evaluate", model=self.model, data=self.val_data) or {}
        ctx.fire("send_validation_results", results=results)
        return codec.encode(
            {},
            {
                "kind": "validation",
                "client_id": self.name,
                "round": ctx.round,
                "num_samples": len(self.val_data),
                "results": results,
            },
        )

    def best_model(self) -> codec.Payload:
        weights = self.last_weights if self.last_weights is not None else state_dict(self.model)
        self.ctx.fire("send_best_model", weights=weights)
        return codec.encode(weights, {"kind": "best_model", "client_id": self.name})


#: What :func:`flcore.codec.decode_flat` returns: weights, metadata and their Flat.
Decoded = tuple[dict[str, torch.Tensor], dict[str, Any], codec.Flat | None]


class RequestMemo:
    """The last request decoded, for clients that run one after another in one process: the
    embedded runtime sends one payload object to every client, and fifty clients need not
    parse and check the same header fifty times. Held only while a request is out."""

    def __init__(self) -> None:
        self.payload: codec.Payload | None = None
        self.decoded: Decoded | None = None

    def decode(self, payload: codec.Payload, what: str) -> Decoded:
        """:func:`flcore.codec.decode_flat` of ``payload`` (``copy=False``), done once."""
        if payload is not self.payload or self.decoded is None:
            self.payload, self.decoded = None, None
            self.decoded = codec.decode_flat(payload, what=what, copy=False)  # errors: not kept
            self.payload = payload
        weights, meta, flat = self.decoded
        return weights, dict(meta), flat

    def clear(self) -> None:
        self.payload = self.decoded = None


def read_validation(payload: codec.Payload, sender: str) -> tuple[int, dict[str, dict[str, float]]]:
    """Decode a client's validation results: ``(num_samples, model -> metric -> number)``."""
    _, meta = codec.decode(payload, what=f"validation results from {sender}")
    results, n = meta.get("results"), meta.get("num_samples")
    if meta.get("kind") != "validation" or not isinstance(results, dict) or not isinstance(n, int):
        raise CodecError(f"validation results from {sender}: malformed")
    for model, metrics in results.items():
        if not isinstance(metrics, dict):
            raise CodecError(f"validation results from {sender}: {model!r} is not a mapping")
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CodecError(f"validation results from {sender}: {model}.{key} not a number")
            if not math.isfinite(value):
                raise CodecError(f"validation results from {sender}: {model}.{key} not finite")
    return n, results
