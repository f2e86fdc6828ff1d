"""The server-side state machine of a training, in the DLR demonstrator's design and names.

``start`` -> ``start_round`` -> clients work -> ``TrainingRoundFinished`` is dispatched and
processed (``process_trainer_task``) -> ``handle`` aggregates and fires the chain's events
-> ``test_round`` / ``ModelTestFinished`` -> the next round or ``finish``. Events are queued,
never called recursively, so a thousand rounds need no deeper stack than one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from flcore import codec
from flcore.aggregation import OrderedFold, WeightedMean
from flcore.contribution import Contribution, validate
from flcore.errors import CodecError, ContributionRefused, FLCoreError, RoundFailed
from flcore.options import TrainerOptions

if TYPE_CHECKING:
    from flcore.context import FLContext
    from flcore.runtime.base import Runtime
    from flcore.training import Training


class ModelTrainerEvent:
    """A trainer event: ``handle`` does the work, ``next`` moves the training on."""

    registry: ClassVar[dict[str, type[ModelTrainerEvent]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ModelTrainerEvent.registry[f"{cls.__module__}.{cls.__qualname__}"] = cls
        ModelTrainerEvent.registry.setdefault(cls.__name__, cls)

    def __init__(self, trainer: ModelTrainer) -> None:
        self.trainer = trainer
        self.training = trainer.training
        self.ctx = trainer.ctx

    def handle(self) -> None:
        """Process the event."""

    def next(self) -> None:
        """Continue the training after the event."""


class TrainingRoundFinished(ModelTrainerEvent):
    """All clients of the round answered: validate, aggregate, then test or end the round."""

    def handle(self) -> None:
        self.trainer.aggregate()

    def next(self) -> None:
        if self.trainer.tests_due():
            self.trainer.test_round()
        else:
            self.trainer.end_round()


class ModelTestFinished(ModelTrainerEvent):
    """The clients tested the global model: their sample-weighted metrics go into ``ctx.metrics``."""

    def handle(self) -> None:
        self.trainer.collect_test_results()

    def next(self) -> None:
        self.trainer.end_round()


def resolve_event(event_cls: type[ModelTrainerEvent] | str) -> type[ModelTrainerEvent]:
    """An event class, or its registered name; never an import of an arbitrary name."""
    if isinstance(event_cls, str):
        try:
            return ModelTrainerEvent.registry[event_cls]
        except KeyError:
            raise FLCoreError(f"unknown trainer event {event_cls!r}") from None
    if not (isinstance(event_cls, type) and issubclass(event_cls, ModelTrainerEvent)):
        raise FLCoreError(f"{event_cls!r} is not a trainer event")
    return event_cls


def process_trainer_task(training_id: str, event_cls: type[ModelTrainerEvent] | str) -> None:
    """Process one dispatched trainer event of the training ``training_id``.

    Both arguments are plain values (the event may be given by its registered name), so a
    worker that can open the training by id can run this as well as the embedded loop.
    """
    from flcore.training import Training

    training = Training.get(training_id)
    trainer = ModelTrainer(training, training.options)
    trainer.handle_cls(resolve_event(event_cls))


class ModelTrainer:
    """Runs one training. ``ModelTrainer(training)`` returns an instance of the class the
    chain's ``get_trainer_class`` picks, so plugins (SWAG) bring their own trainer."""

    def __new__(cls, training: Training, options: TrainerOptions | None = None) -> ModelTrainer:
        chosen = training.ctx.ask("get_trainer_class") or ModelTrainer
        if not (isinstance(chosen, type) and issubclass(chosen, ModelTrainer)):
            raise FLCoreError(f"get_trainer_class answered {chosen!r}, not a ModelTrainer class")
        return super().__new__(chosen)

    def __init__(self, training: Training, options: TrainerOptions | None = None) -> None:
        self.training = training
        self.options = options or training.options
        self.ctx: FLContext = training.ctx
        #: The layout this round's global model was sent in (contributions are checked
        #: against it, :func:`flcore.contribution.validate`).
        self.sent: codec.Layout | None = None

    @property
    def runtime(self) -> Runtime:
        return self.training.runtime

    # -- the DLR interface --------------------------------------------------------

    def start(self) -> None:
        """Start the training: the first round (the caller fired ``startup``)."""
        self.start_round()

    def handle(self, event: ModelTrainerEvent) -> None:
        event.handle()
        event.next()

    def handle_cls(self, event_cls: type[ModelTrainerEvent]) -> None:
        self.handle(event_cls(self))

    def dispatch(self, event_cls: type[ModelTrainerEvent]) -> None:
        self.training.dispatch(event_cls)

    def start_round(self) -> None:
        """Snapshot the round state, send the global model, collect the contributions."""
        ctx = self.ctx
        ctx.metrics = {}
        ctx.contributions = []
        ctx.client_tests = {}  # this round's tests only
        ctx.take_snapshot()
        ctx.round += 1
        self.training.round_started = time.perf_counter()
        ctx.fire("start_round")
        ctx.fire("send_global_model", weights=ctx.global_model)
        self.train_clients()
        self.dispatch(TrainingRoundFinished)

    def streams(self) -> bool:
        """FedAvg folds contributions in as they arrive unless a plugin answers ``aggregate``
        (then it gets every contribution, weights included)."""
        return all(n.startswith("core.") for n, _ in self.ctx.chain.implementations("aggregate"))

    def train_clients(self) -> None:
        """Run the clients' local training; keep the contributions that pass validation.

        A client's first reply in a round is the one that counts: accepted or refused, a
        later one is refused as a duplicate.
        """
        ctx = self.ctx
        clients = self.training.clients
        keep = not self.options.delete_local_models_after_aggregation
        fold = OrderedFold(
            clients,
            WeightedMean(ctx.job.job.exact_mean) if self.streams() else None,
            (lambda c: self.training.save_local_model(ctx.round, c.client_id, c.weights))
            if keep
            else None,
        )
        known = set(clients)
        settled: set[str] = set()
        refused: list[str] = []
        payload = codec.encode(ctx.global_model, {"kind": "global_model", "round": ctx.round})
        self.sent = codec.layout_of(ctx.global_model)
        replies = self.runtime.run(ctx, "train", payload, clients)
        del payload  # the runtime holds it only as long as it needs it
        for result in replies:
            try:
                contribution = self.accept(result, settled)
            except (ContributionRefused, CodecError) as err:
                refused.append(str(err))
                ctx.log.warning(
                    "contribution_refused",
                    client=result.client_id,
                    round=ctx.round,
                    reason=str(err),
                )
                if result.client_id in known and result.client_id not in settled:
                    settled.add(result.client_id)
                    fold.settle(result.client_id, None)
            else:
                settled.add(contribution.client_id)
                fold.settle(contribution.client_id, contribution)
                del contribution
            del result  # a reply is the size of the model: never hold two
        ctx.contributions = fold.finish()
        self.training.round_mean = fold.mean
        ctx.metrics["clients"] = [c.client_id for c in ctx.contributions]
        if refused:
            ctx.metrics["refused"] = refused

    def accept(self, result: Any, received: set[str]) -> Contribution:
        """Decode and validate one reply; ask the chain's ``receive_contribution``."""
        if result.payload is None:
            raise ContributionRefused(f"{result.client_id}: client failed: {result.error}")
        contribution = Contribution.decode(result.payload, sender=result.client_id)
        if contribution.client_id != result.client_id:
            raise ContributionRefused(
                f"{result.client_id}: claims to be {contribution.client_id!r}"
            )
        validate(
            contribution,
            reference=self.ctx.global_model,
            round=self.ctx.round,
            clients=frozenset(self.training.clients),
            received=received,
            sent=self.sent,
        )
        for plugin, answer in self.ctx.fire("receive_contribution", contribution=contribution):
            if answer is False or isinstance(answer, str):
                reason = answer if isinstance(answer, str) else "refused"
                raise ContributionRefused(f"{contribution.client_id}: {plugin}: {reason}")
        return contribution

    def aggregate(self) -> None:
        """Aggregate the accepted contributions into the new global model."""
        ctx = self.ctx
        needed = ctx.job.job.required_clients
        if len(ctx.contributions) < needed:
            raise RoundFailed(
                f"round {ctx.round}: {len(ctx.contributions)} of {len(self.training.clients)} "
                f"contributions accepted, {needed} needed ([job] min_clients); "
                f"refused: {ctx.metrics.get('refused', [])}"
            )
        ctx.fire("before_aggregation")
        mean, self.training.round_mean = self.training.round_mean, None
        if mean is not None:
            new = mean.result()  # FedAvg, folded while the contributions arrived
        else:
            new = ctx.ask("aggregate", contributions=list(ctx.contributions))
        if new is None:
            raise RoundFailed(f"round {ctx.round}: no plugin answered 'aggregate'")
        problems = _mismatches(new, ctx.global_model)
        if problems:
            raise RoundFailed(f"round {ctx.round}: aggregate returned a bad model: {problems}")
        ctx.global_model = dict(new)
        ctx.fire("after_aggregation")
        if self.options.delete_local_models_after_aggregation:
            ctx.contributions = [c.evolve_without_weights() for c in ctx.contributions]

    def tests_due(self) -> bool:
        if self.options.skip_model_tests:
            return False
        return self.options.model_test_after_each_round or self.ctx.is_last_round

    def test_round(self) -> None:
        """Ask the clients to test the new global model (DLR ``test_round``)."""
        ctx = self.ctx
        ctx.fire("test_round")
        ctx.client_tests = self.training.validate_on_clients(ctx.global_model)
        self.dispatch(ModelTestFinished)

    def collect_test_results(self) -> None:
        """The sample-weighted mean of the clients' tests goes to ``ctx.metrics["test"]``."""
        ctx = self.ctx
        sums: dict[str, float] = {}
        total = 0
        for metrics in ctx.client_tests.values():
            n = metrics["num_samples"]
            for key, value in metrics.items():
                if key != "num_samples":
                    sums[key] = sums.get(key, 0.0) + value * n
            total += int(n)
        if total:
            ctx.metrics["test"] = {k: v / total for k, v in sums.items()}

    def end_round(self) -> None:
        """Fire ``end_round``, commit the round, then go on or finish."""
        ctx = self.ctx
        ctx.metrics["round"] = ctx.round
        ctx.metrics["seconds"] = round(time.perf_counter() - self.training.round_started, 4)
        ctx.fire("end_round")
        self.training.commit_round()
        if ctx.is_last_round:
            self.finish()
        else:
            self.start_round()

    def finish(self) -> None:
        """The last round is committed: collect the clients' best models if they are kept."""
        ctx = self.ctx
        if not self.options.delete_local_models_after_aggregation:
            for result in self.runtime.run(ctx, "best_model", b"", self.training.clients):
                if result.payload is None:
                    ctx.log.warning(
                        "best_model_missing", client=result.client_id, reason=result.error
                    )
                    continue
                try:
                    weights, _ = codec.decode(result.payload, f"best model of {result.client_id}")
                except CodecError as err:
                    ctx.log.warning("best_model_refused", client=result.client_id, reason=str(err))
                    continue
                self.training.save_local_model(None, result.client_id, weights)
        ctx.fire("finish")
        self.training.finished = True


def _mismatches(new: Any, reference: Any) -> str:
    if not isinstance(new, dict) or set(new) != set(reference):
        return "names differ from the global model's"
    for name, tensor in new.items():
        ref = reference[name]
        if (
            getattr(tensor, "shape", None) != ref.shape
            or getattr(tensor, "dtype", None) != ref.dtype
        ):
            return f"tensor {name!r} has a different shape or dtype"
    return ""
