"""Every event of a federated training, as one documented pluggy hookspec.

This module is the list a plugin author reads. Each hook takes the run's context
``ctx`` (:class:`flcore.context.FLContext`) first; an implementation may accept any
subset of the arguments, by name. Names follow NVIDIA Clara Train's handler events
and the DLR demonstrator's trainer.

Two kinds of hook:

* **Handler hooks** react to an event. They run in the order of the job's
  ``[plugins] chain`` (``shutdown`` in reverse), then the core's defaults. When one
  raises, every handler that already handled the same event gets ``rollback``
  in reverse order and the round is restored to its snapshot.
* **Strategy hooks** (``firstresult``) answer a question; the first plugin in the
  chain that returns something other than ``None`` wins, the core answers last.

``side`` says where a hook runs: on the server, or in the client's process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from flcore.markers import hookspec

if TYPE_CHECKING:
    import torch

    from flcore.context import FLContext
    from flcore.contribution import Contribution
    from flcore.runtime.base import Runtime
    from flcore.trainer import ModelTrainer

    Weights = Mapping[str, torch.Tensor]


# -- lifecycle (server) -------------------------------------------------------------


@hookspec
def check_job(ctx: FLContext) -> None:
    """Refuse a job that cannot run, before any training (and in ``flcore validate``).

    Side: server. Fires once, after settings were validated and the task loaded.
    Raise :class:`flcore.errors.JobError` with a message that says what is missing.
    The return value is ignored.
    """


@hookspec
def startup(ctx: FLContext) -> None:
    """The run starts: reset state, open resources.

    Side: server. Fires once, before the first round (and again on a resumed run).
    The return value is ignored.
    """


@hookspec
def client_register(ctx: FLContext, client_id: str) -> None:
    """A client joined the federation.

    Side: server. Fires once per client, after ``startup`` (or when a client
    connects to a networked server). ``client_id`` is the client's name.
    """


@hookspec
def client_quit(ctx: FLContext, client_id: str) -> None:
    """A client left the federation or was dropped.

    Side: server. Fires at the end of the run for every registered client, or
    when a networked client disconnects or times out.
    """


@hookspec
def shutdown(ctx: FLContext) -> None:
    """The run ends, successfully or not: release resources.

    Side: server. Fires once, in *reverse* chain order, also after a failed run.
    """


# -- a training round (server) ------------------------------------------------------


@hookspec
def start_round(ctx: FLContext) -> None:
    """A round begins; ``ctx.round`` is its 1-based number.

    Side: server. Fires after the round's snapshot was taken, before the global
    model is sent.
    """


@hookspec
def send_global_model(ctx: FLContext, weights: Weights) -> None:
    """The global model is about to be sent to the round's clients.

    Side: server. ``weights`` is the state dict that is serialized and sent;
    treat it as read-only.
    """


@hookspec
def receive_contribution(ctx: FLContext, contribution: Contribution) -> bool | str | None:
    """A client's contribution arrived and passed the core's validation.

    Side: server. Return ``False`` or a reason (``str``) to refuse it: it is
    logged and left out of the round. ``None`` or ``True`` accepts it. This is the
    one place that sees every contribution with its weights (clip or inspect them
    here): they are folded into the mean right after.
    """


@hookspec
def before_aggregation(ctx: FLContext) -> None:
    """The round's accepted contributions (``ctx.contributions``) are about to be aggregated.

    Side: server. Clara's ``ModelSelectionHandler`` reads the clients' validation
    metrics here. The core's FedAvg folds each contribution into its mean as it
    arrives, so here contributions carry their metrics but no weights, unless a
    plugin answers ``aggregate``; a plugin that must see or change weights does so
    in ``receive_contribution``.
    """


@hookspec
def after_aggregation(ctx: FLContext) -> None:
    """``ctx.global_model`` now holds the round's new global model.

    Side: server. Clara's ``ServerValidationHandler`` evaluates it here.
    """


@hookspec
def test_round(ctx: FLContext) -> None:
    """The global model is about to be tested by the clients (the DLR ``test_round``).

    Side: server. Fires after the round's aggregation when model tests are due
    (``[trainer]`` options); the clients' results land in ``ctx.metrics["test"]``.
    """


@hookspec
def end_round(ctx: FLContext) -> None:
    """The round is complete: ``ctx.metrics`` holds what is written to ``metrics.jsonl``.

    Side: server. Handlers may add entries to ``ctx.metrics``. After this event the
    round is committed: the global model and checkpoint are written.
    """


@hookspec
def finish(ctx: FLContext) -> None:
    """The training finished all its rounds (the DLR trainer's ``finish``).

    Side: server. Fires once, before ``shutdown``; ``ctx.global_model`` is final.
    """


@hookspec
def rollback(ctx: FLContext) -> None:
    """Undo what this plugin did for the event that just failed.

    Side: server. Fires, in reverse order, on every handler that already handled
    the event in which another handler raised. The core restores ``ctx``'s round
    state afterwards; a plugin restores what it keeps outside ``ctx`` (files).
    """


@hookspec
def save_state(ctx: FLContext) -> Any:
    """Return what this plugin needs to continue a resumed run, or ``None``.

    Side: server. Fires when a round is committed, after ``end_round``. The answer must
    be JSON (dicts, lists, strings, numbers); it is written atomically with the round's
    global model and handed back to ``resume`` by ``flcore run --resume`` and
    ``flcore server --resume``. A plugin whose state is derived from the round alone
    needs neither hook: a resumed run gives the same final weights as an uninterrupted one.
    """


@hookspec
def resume(ctx: FLContext, state: Mapping[str, Any]) -> None:
    """The run continues from a checkpoint: restore what ``save_state`` returned.

    Side: server. Fires once, after ``startup``, before the first resumed round;
    ``ctx.round`` is the last committed round and ``ctx.global_model`` its model.
    ``state`` maps each plugin's name in the chain to what its ``save_state`` returned
    (plugins that returned ``None`` are absent).
    """


# -- the client side ----------------------------------------------------------------


@hookspec
def receive_model(ctx: FLContext, weights: Weights) -> None:
    """The client received the global model for a training round.

    Side: client. Fires before the client scores the model on its validation
    split and trains; ``weights`` are already loaded into ``ctx.model``.
    """


@hookspec
def receive_validation_models(ctx: FLContext, models: dict[str, Weights]) -> None:
    """The client received models to validate (``{"global": weights}`` in a test round).

    Side: client. Handlers may add models to ``models``; each is evaluated on the
    client's held-out split.
    """


@hookspec
def send_validation_results(ctx: FLContext, results: dict[str, dict[str, float]]) -> None:
    """The client is about to send its validation results (model name -> metrics).

    Side: client. Handlers may add or change entries; values must be finite numbers.
    """


@hookspec
def send_best_model(ctx: FLContext, weights: Weights) -> None:
    """The client submits its best local model at the end of the run.

    Side: client. Fires once per client after the last round, when the server
    collects the clients' models (``[trainer] delete_local_models_after_aggregation
    = false``); ``weights`` is the model the client trained last. The server keeps
    it in the run directory's ``best_local/``.
    """


# -- strategies (firstresult) -------------------------------------------------------


@hookspec(firstresult=True)
def get_trainer_class(ctx: FLContext) -> type[ModelTrainer] | None:
    """Which :class:`~flcore.trainer.ModelTrainer` subclass runs this training.

    Side: server. The core answers ``ModelTrainer``; the swag plugin answers
    ``SWAGModelTrainer``.
    """


@hookspec(firstresult=True)
def get_runtime(ctx: FLContext) -> Runtime | None:
    """Where the clients' work runs (``[job] runtime``).

    Side: server. Return a :class:`~flcore.runtime.base.Runtime` for the job's
    runtime name, or ``None`` to let another plugin answer. The core answers
    ``"embedded"``.
    """


@hookspec(firstresult=True)
def aggregate(ctx: FLContext, contributions: Iterable[Contribution]) -> dict[str, Any] | None:
    """Combine the round's accepted contributions into the new global weights.

    Side: server. Return a state dict with the global model's names, shapes and
    dtypes. The core answers FedAvg, the sample-weighted mean.
    """


@hookspec(firstresult=True)
def local_train(ctx: FLContext, model: torch.nn.Module, data: Any) -> dict[str, Any] | None:
    """Train ``model`` in place on the client's training split ``data`` (a Dataset).

    Side: client. Return ``{"num_samples": int, "local_iterations": int, "metrics":
    {...}}``. The core answers a plain torch loop with the job's ``[local]`` settings.
    """


@hookspec(firstresult=True)
def client_request(
    ctx: FLContext, request: str, payload: bytes | bytearray
) -> bytes | bytearray | None:
    """Answer a request the core's client does not know (a plugin's own round).

    Side: client. The core's client answers ``train``, ``validate`` and ``best_model``;
    a trainer subclass may send other requests through the runtime (the swag plugin's
    collection round) and a plugin answers them here with a codec payload. ``None``
    means "not mine"; an unanswered request fails that client with a clear error.
    """


@hookspec(firstresult=True)
def evaluate(ctx: FLContext, model: torch.nn.Module, data: Any) -> dict[str, float] | None:
    """Score ``model`` on ``data`` (a Dataset); return metric name -> number.

    Side: both. The core answers loss and accuracy for classification, loss for
    regression.
    """


@hookspec(firstresult=True)
def predict(
    ctx: FLContext, model: torch.nn.Module, inputs: torch.Tensor, samples: int | None
) -> dict[str, Any] | None:
    """Predict with uncertainty: ``{"probabilities": Tensor, ...}`` for ``inputs``.

    Side: both (``flcore predict`` runs it anywhere). ``model`` holds the run's global model;
    ``samples`` is how many posterior samples the caller wants (``None``: the method's
    default; callers always pass it). Return one row per input: ``prediction``,
    ``probabilities``, uncertainty fields, and ``method`` (a line saying what answered). The
    core answers the plain model's softmax probabilities and their entropy; an uncertainty
    method (SWAG) answers with more fields.
    """
