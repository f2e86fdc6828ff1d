"""A client: bytes in, bytes out. Every runtime runs this same code wherever clients live.

The client loads its data once, keeps one model instance, and answers three requests:
``train`` (score the received global model, train locally, send a contribution),
``validate`` (test the models it is sent) and ``best_model`` (send its last local model);
plugins answer other requests through the ``client_request`` hook.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from flcore import codec
from flcore.client_state import ClientStateStore
from flcore.context import ClientContext
from flcore.contribution import MAX_SAMPLES, Contribution, brief, metric_problem
from flcore.data import derive_seed, split_validation
from flcore.defaults.evaluation import primary_metric
from flcore.errors import CodecError, FLCoreError
from flcore.flat_model import flat_model
from flcore.state import state_dict


def failure_reason(err: Exception) -> str:
    """What the server hears of a client's failure: flcore's own errors say what was wrong
    in their message; anything else (the user's code) is named by its type too."""
    return str(err) if isinstance(err, FLCoreError) else f"{type(err).__name__}: {err}"


class Client:
    """One federation member, with its own context, data split, model and per-client state.

    ``state_dir`` is where the client keeps ``ctx.state`` between rounds on its own disk (a
    simulation's ``RUN_DIR/clients/NAME``), so a run resumed after a crash continues with it;
    ``state_root`` is a deployed client's ``--state-dir``, with one folder per server run
    (the run's id comes with each training request). Neither keeps it in memory only.
    """

    def __init__(
        self,
        job: Any,
        task: Any,
        chain: Any,
        index: int,
        log: Any,
        model: Any = None,
        name: str | None = None,
        state_dir: Path | None = None,
        state_root: Path | None = None,
    ) -> None:
        self.index = index
        self.name = name or job.client_names[index]
        data = task.client_data(index, job.job.clients)
        seed = derive_seed(job.job.seed, "split", self.name)
        self.train_data, self.val_data = split_validation(data, job.local.validation_split, seed)
        # Clients that run one after another may share one model instance: every request
        # loads the weights it needs first, so nothing of one client leaks to the next.
        self.model: torch.nn.Module = model if model is not None else task.model()
        self.ctx = ClientContext(
            job=job,
            task=task,
            chain=chain,
            log=log.bind(client=self.name),
            client_id=self.name,
            model=self.model,
            train_data=self.train_data,
            val_data=self.val_data,
            client=self,
        )
        self.last_weights: dict[str, torch.Tensor] | None = None
        #: How requests are decoded; clients that share one loop share a :class:`RequestMemo`.
        self.decoder: RequestMemo | None = None
        self.store = ClientStateStore(state_dir) if state_dir is not None else None
        self.state_root = state_root
        #: The round ``ctx.state`` was last advanced in, and the state as that round found
        #: it: a retried round starts again from there.
        self.state_round = 0
        self.state_before: dict[str, Any] = {}
        self.state_loaded = False
        self.state_saved = False

    def handle(self, request: str, payload: codec.Payload) -> codec.Payload:
        """Answer one request from the server; the reply is a codec payload."""
        try:
            if request == "train":
                return self.train(payload)
            if request == "validate":
                return self.validate(payload)
            if request == "best_model":
                return self.best_model()
            answer = self.ctx.ask("client_request", request=request, payload=payload)
            if answer is None:
                raise CodecError(f"{self.name}: no plugin answers request {request!r}")
            self.keep_state()
            return bytes(answer)
        finally:
            self.ctx.global_model = {}  # views of the request's payload: not kept past it

    def answer(
        self, request: str, payload: codec.Payload
    ) -> tuple[codec.Payload | None, str | None]:
        """:meth:`handle`, as ``(reply, None)`` or ``(None, why)``: the user's code on a client
        may fail in any way, and the runtime hands the server the reason instead of failing
        with it."""
        try:
            return self.handle(request, payload), None
        except Exception as err:
            return None, failure_reason(err)

    def begin_state_round(self, round_: int) -> None:
        """Bring ``ctx.state`` to the start of round ``round_``: read it from disk once (a
        resumed run), and start a retried round from the state the first try found."""
        ctx = self.ctx
        if not self.state_loaded:
            self.state_loaded = True
            if self.store is not None:
                saved = self.store.load(before_round=round_)
                if saved is not None:
                    ctx.state = dict(saved)
        if round_ == self.state_round:
            ctx.state = copy.deepcopy(self.state_before) if self.state_before else {}
            return
        if round_ < self.state_round:  # a server resumed from an earlier round than we saw
            if self.store is None and (ctx.state or self.state_before):
                raise CodecError(
                    f"{self.name}: asked to train round {round_} after round "
                    f"{self.state_round}, with no saved state to go back to"
                )
            saved = self.store.load(before_round=round_) if self.store is not None else None
            ctx.state = dict(saved or {})
        self.state_round = round_
        self.state_before = copy.deepcopy(ctx.state) if ctx.state else {}

    def keep_state(self) -> None:
        """Write ``ctx.state`` for the round just answered (nothing while it is empty)."""
        if self.store is not None and (self.ctx.state or self.state_saved):
            self.store.save(self.ctx.round, self.ctx.state)
            self.state_saved = True

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
        if self.state_root is not None and self.store is None:
            self.store = ClientStateStore(self.state_root / _run_folder(meta.get("run"), where))
        self.load(weights, what, flat)
        self.ctx.global_model = weights

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
        self.begin_state_round(ctx.round)
        if ctx.handles("receive_model"):  # the state dict is built for a handler only
            ctx.fire("receive_model", weights=state_dict(self.model))
        initial = ctx.ask("evaluate", model=self.model, data=self.val_data) or {}
        result = ctx.ask("local_train", model=self.model, data=self.train_data)
        wire = flat_model(self.model)
        flat = None
        if ctx.handles("send_update"):  # the update filter works on copies, never the model
            local = {k: v.detach().clone() for k, v in state_dict(self.model).items()}
            ctx.fire("send_update", weights=local)
            _check_update(local, state_dict(self.model), self.name)
        elif wire is not None and wire.intact(state_dict(self.model, keep_vars=True)):
            local, flat = wire.weights, wire.flat  # sent as the buffer, in one copy
        else:
            local = state_dict(self.model)
        if not ctx.job.trainer.delete_local_models_after_aggregation:
            # kept for send_best_model; cloned since validation reloads the model in place
            self.last_weights = {k: v.detach().clone() for k, v in local.items()}
        metrics = dict(result.get("metrics", {}))
        metrics["initial_validation_metric"] = primary_metric(initial)
        metrics["initial_validation"] = initial
        self.keep_state()
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


def _run_folder(run: Any, where: str) -> str:
    """The server's run id as a folder name; anything that could leave the folder is refused."""
    if (
        not isinstance(run, str)
        or not 0 < len(run) <= 200
        or run in {".", ".."}
        or not all(c.isalnum() or c in "-_." for c in run)
    ):
        raise CodecError(f"{where}: no usable run id ({run!r:.60}) to keep this client's state by")
    return run


def _check_update(update: dict[str, Any], model: dict[str, torch.Tensor], who: str) -> None:
    """What ``send_update`` left must still be the model's tensors (names, shapes, dtypes)."""
    if set(update) != set(model):
        raise CodecError(f"{who}: send_update left tensors {sorted(set(update) ^ set(model))[:5]}")
    for name, tensor in model.items():
        got = update[name]
        if (
            not isinstance(got, torch.Tensor)
            or got.shape != tensor.shape
            or got.dtype != tensor.dtype
        ):
            raise CodecError(
                f"{who}: send_update made {name!r} {getattr(got, 'dtype', type(got).__name__)} "
                f"{tuple(getattr(got, 'shape', ()))}, the model's is {tensor.dtype} {tuple(tensor.shape)}"
            )


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


def read_validation(
    payload: codec.Payload, sender: str, max_samples: int = MAX_SAMPLES
) -> tuple[int, dict[str, dict[str, float]]]:
    """Decode a client's validation results: ``(num_samples, model -> metric -> number)``.

    The server weighs each client's test by ``num_samples`` and selects models by these
    numbers, so each is bounded: the count by ``max_samples`` (``[job]
    max_samples_per_client``; the reply is all the server knows of the validation split's
    size), every metric by :func:`flcore.contribution.metric_problem`, and an accuracy
    (``accuracy`` or a name ending in it) to [0, 1]. A count of 0 passes only with no
    metric at all: a client without validation data has nothing to weigh."""
    where = f"validation results from {sender}"
    _, meta = codec.decode(payload, what=where)
    results, n = meta.get("results"), meta.get("num_samples")
    if meta.get("kind") != "validation" or not isinstance(results, dict):
        raise CodecError(f"{where}: malformed")
    for model, metrics in results.items():
        if not isinstance(metrics, dict):
            raise CodecError(f"{where}: {model!r:.40} is not a mapping")
        for key, value in metrics.items():
            problem = metric_problem(value) or _accuracy_problem(key, value)
            if problem:
                raise CodecError(f"{where}: {model:.40}.{key:.40} {problem}")
    scored = any(results.values())
    if type(n) is not int or not (1 if scored else 0) <= n <= max_samples:
        raise CodecError(
            f"{where}: num_samples {brief(n)} is not a count in [{1 if scored else 0}, "
            f"{max_samples}] ([job] max_samples_per_client)"
        )
    return n, results


def _accuracy_problem(name: str, value: float) -> str | None:
    """An accuracy is a fraction: one above 1 (or below 0) is a forged or a broken one."""
    if name.lower().endswith("accuracy") and not 0.0 <= value <= 1.0:
        return f"is {brief(value)}, not an accuracy in [0, 1]"
    return None
