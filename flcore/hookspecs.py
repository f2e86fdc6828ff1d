"""Every event of a federated training, as one documented pluggy hookspec.

This module is the list a plugin author reads. Each hook takes the run's context
``ctx`` first: a :class:`flcore.ServerContext` on the server, a :class:`flcore.ClientContext`
in a client (``register_commands`` alone takes none). An implementation may accept any
subset of the arguments, by name. Names follow NVIDIA Clara Train's handler events and the
DLR demonstrator's trainer.

Two kinds of hook, both called by pluggy:

* **Handler hooks** react to an event. They run in the order of the job's
  ``[plugins] chain`` (``shutdown`` in reverse), then the core's defaults. When anything
  fails during a round, every plugin that handled any event of that round gets
  ``rollback`` once, in reverse order of first handling, and the round is restored to its
  snapshot.
* **Strategy hooks** (``firstresult``) answer a question; the first plugin in the
  chain that returns something other than ``None`` wins, the core answers last.

pluggy's options work as pluggy documents them: ``@hookimpl(wrapper=True)`` wraps the
whole chain's call of a hook and sees its result or exception (the first wrapper in the
chain is outermost); ``tryfirst`` implementations run before all others, in chain order,
``trylast`` ones after the core's defaults, in reverse chain order (pluggy's own rule). An
implementation named after no hook, or taking an argument its hook does not have, is an
error when the plugin loads.

``side`` says where a hook runs: on the server, or in the client's process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from flcore.markers import hookspec

if TYPE_CHECKING:
    import click
    import torch

    from flcore.context import ClientContext, ServerContext
    from flcore.contribution import Contribution
    from flcore.runtime.base import Runtime
    from flcore.trainer import ModelTrainer

    Weights = Mapping[str, torch.Tensor]
    FLContext: TypeAlias = ServerContext | ClientContext


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
    one place that sees every contribution with its weights, and the server's update
    filter: a handler may replace entries of ``contribution.weights`` (clip, unmask,
    decompress), and each later handler in the chain sees the replaced tensors. Never edit
    a tensor in place (it may be a view of the received bytes). What the chain leaves is
    checked again (names, shapes, dtypes, finite values), then folded into the mean::

        @hookimpl
        def receive_contribution(self, ctx, contribution):
            for name, w in contribution.weights.items():
                contribution.weights[name] = w.clamp(-1.0, 1.0)
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
    """Undo what this plugin did in the round that just failed.

    Side: server. When anything fails during a round (a handler, a strategy hook, the
    runtime), every plugin that handled any event of that round gets ``rollback`` once,
    in reverse order of first handling, the one that raised included (Clara's per-event
    rule is the special case of a round that failed in its first event). The core then
    restores ``ctx``'s round state; a plugin restores what it keeps outside ``ctx``
    (files). An error in ``rollback`` is logged and the others still run.
    """


@hookspec
def save_state(ctx: FLContext) -> Any:
    """Return what this plugin needs to continue a resumed run, or ``None``.

    Side: server. Fires when a round is committed, after ``end_round``. The answer is
    JSON (dicts, lists, strings, finite numbers) with ``torch.Tensor`` values anywhere in
    it: the JSON travels in the checkpoint, the tensors in a safetensors file committed
    with it, atomically with the round's global model. ``flcore run --resume`` and
    ``flcore server --resume`` hand it back to ``resume`` (tensors as tensors). A plugin
    whose state is derived from the round alone needs neither hook: a resumed run gives
    the same final weights as an uninterrupted one.
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
def after_optimizer_step(ctx: FLContext, model: torch.nn.Module, optimizer: Any, step: int) -> None:
    """The default local loop just took optimizer step ``step`` (1-based within the round).

    Side: client. Act on the model after each step without replacing the loop: SCAFFOLD's
    correction, clipping weights, a projection. Handlers run in chain order, each seeing
    what the one before did::

        @hookimpl
        def after_optimizer_step(self, ctx, model):
            with torch.no_grad():
                for p in model.parameters():
                    p.clamp_(-1.0, 1.0)
    """


@hookspec
def local_loss_term(
    ctx: FLContext,
    model: torch.nn.Module,
    inputs: Any,
    targets: Any,
    outputs: Any,
    loss: torch.Tensor,
) -> torch.Tensor | None:
    """A term to add to the default loop's loss for this batch, or ``None``.

    Side: client. ``loss`` is the task's loss of the batch; every handler's term is added
    to it, in chain order, before ``backward``. FedProx's proximal term reads the round's
    global model from ``ctx.global_model``::

        @hookimpl
        def local_loss_term(self, ctx, model):
            return 0.5 * self.mu * sum(
                (p - ctx.global_model[n]).pow(2).sum() for n, p in model.named_parameters()
            )
    """


@hookspec
def send_update(ctx: FLContext, weights: dict[str, torch.Tensor]) -> None:
    """The client's update is about to leave: the client's update filter.

    Side: client. ``weights`` maps every name of the model to a copy of the trained
    tensor; a handler replaces entries (clip, add noise, mask, compress) and each later
    handler in the chain sees what the earlier ones left. The result is what the
    contribution carries; the client's own model keeps its trained weights. The round's
    global model is ``ctx.global_model`` (for the update as a difference)::

        @hookimpl
        def send_update(self, ctx, weights):
            for name, w in weights.items():
                weights[name] = w + 0.01 * torch.randn_like(w)
    """


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

    Side: server. Asked once per run, before any training; one instance of the class
    runs the whole training. The core answers ``ModelTrainer``; the swag plugin answers
    ``SWAGModelTrainer``. Two plugins in a chain that both answer are an error naming both.
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
def select_clients(ctx: FLContext, clients: Sequence[str]) -> Sequence[str] | None:
    """Which of ``clients`` take part in round ``ctx.round`` (the round's cohort).

    Side: server. ``clients`` are the federation's members, in client order. Return a
    non-empty subset of them, without repeats; the round's global model goes to them alone
    and only their contributions are accepted. The core answers ``[job] clients_per_round``
    clients drawn uniformly without replacement, seeded by the job's seed and the round
    (every client when it is unset), so every runtime trains the same cohort. The cohort
    is listed in ``metrics.jsonl`` as ``cohort``; ``[job] min_clients`` counts within it.
    """


@hookspec(firstresult=True)
def server_update(
    ctx: FLContext, previous: Weights, aggregate: Weights
) -> dict[str, torch.Tensor] | None:
    """The round's new global model, from the previous one and the round's aggregate.

    Side: server. Server optimizers live here (FedAdam, FedYogi, FedAvgM: the pseudo-
    gradient is ``previous - aggregate``); keep their state in ``ctx.state`` or return it
    from ``save_state`` (tensors allowed). The answer is checked like any aggregate: the
    global model's names, shapes and dtypes. The core answers ``aggregate``::

        @hookimpl
        def server_update(self, ctx, previous, aggregate):
            return {n: previous[n] + 1.5 * (aggregate[n] - previous[n]) for n in previous}
    """


@hookspec(firstresult=True)
def local_optimizer(ctx: FLContext, model: torch.nn.Module) -> Any:
    """The ``torch.optim.Optimizer`` the default local loop steps for this round.

    Side: client. Called once per client and round, before training; a fresh optimizer
    each time (keep state that must last across rounds in ``ctx.state``). The core answers
    SGD over ``model.parameters()`` with ``[local] lr``, ``momentum`` and
    ``weight_decay``::

        @hookimpl
        def local_optimizer(self, ctx, model):
            return torch.optim.Adam(model.parameters(), lr=ctx.job.local.lr)
    """


@hookspec(firstresult=True)
def local_train(ctx: FLContext, model: torch.nn.Module, data: Any) -> dict[str, Any] | None:
    """Train ``model`` in place on the client's training split ``data`` (a Dataset).

    Side: client. Return ``{"num_samples": int, "local_iterations": int, "metrics":
    {...}}``. The core answers a plain torch loop with the job's ``[local]`` settings,
    whose optimizer, loss and steps plugins shape through ``local_optimizer``,
    ``local_loss_term`` and ``after_optimizer_step`` without replacing it.
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


# -- the command line --------------------------------------------------------------


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to ``flcore``: ``cli.add_command(...)`` or ``@cli.command()``.

    Side: command line. Called once when ``flcore`` starts, on every installed plugin that
    implements it (no job, so no ``ctx``); a plugin that fails to load or raises here is
    reported on stderr and the other commands still work::

        @hookimpl
        def register_commands(cli):
            @cli.command()
            def hello():
                click.echo("hello")
    """
