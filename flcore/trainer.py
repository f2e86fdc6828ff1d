"""The server-side state machine of a training, in the DLR demonstrator's design and names.

``start`` -> ``start_round`` -> clients work -> ``TrainingRoundFinished`` is dispatched and
processed (``process_trainer_task``) -> ``handle`` aggregates and fires the chain's events
-> ``test_round`` / ``ModelTestFinished`` -> the next round or ``finish``. One trainer runs a
whole training and owns its round's state; events hold the trainer, and are queued, never
called recursively, so a thousand rounds need no deeper stack than one.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from flcore import codec
from flcore.aggregation import OrderedFold, WeightedMean
from flcore.contribution import Contribution, validate
from flcore.errors import CodecError, ContributionRefused, FLCoreError, RoundFailed
from flcore.options import TrainerOptions

if TYPE_CHECKING:
    import torch

    from flcore.context import ServerContext
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


def process_trainer_task(trainer: ModelTrainer, event_cls: type[ModelTrainerEvent] | str) -> None:
    """Process one dispatched trainer event of ``trainer``'s training (the DLR name).

    The event may be given by its registered name, so a queue that carries plain values can
    dispatch it as well as the embedded loop.
    """
    event = resolve_event(event_cls)
    trainer.handle_cls(event)


@attrs.frozen
class RoundSnapshot:
    """The round state taken at a round's start; restoring it is what a rollback restores.

    With a run directory the global model is held by reference, not copied (a copy per
    round is memory the server need not spend): the trainer replaces the global model, it
    never edits it. Should a plugin have edited it in place anyway (its version counter
    moved), the model is read back from the last committed ``global_model.safetensors``,
    which is the round's starting model.
    """

    round: int
    global_model: Mapping[str, torch.Tensor]
    state: dict[str, Any]
    metrics: dict[str, Any]
    versions: Mapping[str, int] | None = None


class ModelTrainer:
    """Runs one training: one instance per run, made by :class:`flcore.training.Training`
    from the class the chain's ``get_trainer_class`` answers (SWAG brings its own)."""

    def __init__(self, training: Training, options: TrainerOptions | None = None) -> None:
        self.training = training
        self.options = options or training.options
        self.ctx: ServerContext = training.ctx
        #: Dispatched events, processed in order by the training's loop.
        self.queue: deque[type[ModelTrainerEvent] | str] = deque()
        #: The layout this round's global model was sent in (contributions are checked
        #: against it, :func:`flcore.contribution.validate`).
        self.sent: codec.Layout | None = None
        #: The round's streaming FedAvg, folded while contributions arrive (None: batch).
        self.round_mean: WeightedMean | None = None
        self.round_started = 0.0
        self.snapshot: RoundSnapshot | None = None

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

    def dispatch(self, event_cls: type[ModelTrainerEvent] | str) -> None:
        self.queue.append(event_cls)

    def begin_round(self) -> None:
        """What every round does first (a trainer's own rounds too): clear the round's
        metrics, take the snapshot a failure restores, count the round."""
        ctx = self.ctx
        ctx.metrics = {}
        ctx.contributions = []
        ctx.client_tests = {}  # this round's tests only
        self.take_snapshot()
        ctx._chain.begin_round()
        ctx.round += 1
        self.round_started = time.perf_counter()

    def start_round(self) -> None:
        """Snapshot the round state, pick the cohort, send it the global model, collect the
        contributions."""
        ctx = self.ctx
        self.begin_round()
        ctx.cohort = tuple(self.select_cohort())
        ctx.metrics["cohort"] = list(ctx.cohort)
        ctx.fire("start_round")
        ctx.fire("send_global_model", weights=ctx.global_model)
        self.train_clients()
        self.dispatch(TrainingRoundFinished)

    def select_cohort(self) -> list[str]:
        """The chain's ``select_clients`` answer, checked, in client order."""
        ctx = self.ctx
        members = list(ctx.clients)
        answer = ctx.ask("select_clients", clients=members)
        if isinstance(answer, str) or not isinstance(answer, Sequence | set | frozenset):
            raise RoundFailed(f"round {ctx.round}: select_clients answered {answer!r}, not names")
        chosen = list(answer)
        unknown = [c for c in chosen if c not in set(members)]
        if not chosen or unknown or len(set(chosen)) != len(chosen):
            raise RoundFailed(
                f"round {ctx.round}: select_clients must answer distinct names of the "
                f"federation's clients, got {chosen[:10]!r}"
                + (f" (unknown: {unknown[:5]})" if unknown else "")
            )
        picked = set(chosen)
        return [c for c in members if c in picked]

    def streams(self) -> bool:
        """FedAvg folds contributions in as they arrive unless a plugin answers ``aggregate``
        (then it gets every contribution, weights included)."""
        return all(n.startswith("core.") for n, _ in self.ctx._chain.implementations("aggregate"))

    def train_clients(self) -> None:
        """Run the cohort's local training; keep the contributions that pass validation.

        A client's first reply in a round is the one that counts: accepted or refused, a
        later one is refused as a duplicate.
        """
        ctx = self.ctx
        clients = list(ctx.cohort)
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
        meta = {"kind": "global_model", "round": ctx.round, "run": self.training.run_id}
        payload = codec.encode(ctx.global_model, meta)
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
        self.round_mean = fold.mean
        ctx.metrics["clients"] = [c.client_id for c in ctx.contributions]
        if refused:
            ctx.metrics["refused"] = refused

    def accept(self, result: Any, received: set[str]) -> Contribution:
        """Decode and validate one reply; ask the chain's ``receive_contribution``, whose
        handlers may replace weights (checked again) or refuse it."""
        if result.payload is None:
            raise ContributionRefused(f"{result.client_id}: client failed: {result.error}")
        contribution = Contribution.decode(result.payload, sender=result.client_id)
        if contribution.client_id != result.client_id:
            raise ContributionRefused(
                f"{result.client_id}: claims to be {contribution.client_id!r}"
            )
        cohort = frozenset(self.ctx.cohort)
        reference, round_ = self.ctx.global_model, self.ctx.round
        most = self.ctx.job.job.max_samples_per_client
        validate(
            contribution,
            reference=reference,
            round=round_,
            clients=cohort,
            received=received,
            sent=self.sent,
            max_samples=most,
        )
        if not self.ctx.handles("receive_contribution"):
            return contribution
        before = dict(contribution.weights)
        for plugin, answer in self.ctx.fire("receive_contribution", contribution=contribution):
            if answer is False or isinstance(answer, str):
                reason = answer if isinstance(answer, str) else "refused"
                raise ContributionRefused(f"{contribution.client_id}: {plugin}: {reason}")
        if any(contribution.weights.get(k) is not v for k, v in before.items()) or set(
            contribution.weights
        ) != set(before):
            try:  # a filter replaced tensors: what it left must still fit the global model
                validate(
                    contribution,
                    reference=reference,
                    round=round_,
                    clients=cohort,
                    received=set(),
                    max_samples=most,
                )
            except ContributionRefused as err:
                raise ContributionRefused(f"after receive_contribution: {err}") from None
        return contribution

    def aggregate(self) -> None:
        """Aggregate the accepted contributions, then apply the server update."""
        ctx = self.ctx
        needed = ctx.job.job.required_clients(len(ctx.cohort))
        if len(ctx.contributions) < needed:
            raise RoundFailed(
                f"round {ctx.round}: {len(ctx.contributions)} of {len(ctx.cohort)} "
                f"contributions accepted, {needed} needed ([job] min_clients); "
                f"refused: {ctx.metrics.get('refused', [])}"
            )
        ctx.fire("before_aggregation")
        mean, self.round_mean = self.round_mean, None
        if mean is not None:
            new = mean.result()  # FedAvg, folded while the contributions arrived
        else:
            new = ctx.ask("aggregate", contributions=list(ctx.contributions))
        if new is None:
            raise RoundFailed(f"round {ctx.round}: no plugin answered 'aggregate'")
        problems = _mismatches(new, ctx.global_model) or _non_finite(new)
        if problems:
            raise RoundFailed(f"round {ctx.round}: aggregate returned a bad model: {problems}")
        updated = ctx.ask("server_update", previous=ctx.global_model, aggregate=new)
        problems = _mismatches(updated, ctx.global_model) or _non_finite(updated)
        if problems:
            raise RoundFailed(f"round {ctx.round}: server_update returned a bad model: {problems}")
        ctx.global_model = dict(updated)
        ctx.fire("after_aggregation")
        if self.options.delete_local_models_after_aggregation:
            ctx.contributions = [c.evolve_without_weights() for c in ctx.contributions]

    def tests_due(self) -> bool:
        if self.options.skip_model_tests:
            return False
        return self.options.model_test_after_each_round or self.ctx.is_last_round

    def test_round(self) -> None:
        """Ask the round's cohort to test the new global model (DLR ``test_round``)."""
        ctx = self.ctx
        ctx.fire("test_round")
        ctx.client_tests = self.training.validate_on_clients(ctx.global_model, ctx.cohort)
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
        ctx.metrics["seconds"] = round(time.perf_counter() - self.round_started, 4)
        ctx.fire("end_round")
        self.commit_round()
        if ctx.is_last_round:
            self.finish()
        else:
            self.start_round()

    def commit_round(self) -> None:
        """The round is done and is never rolled back: the training writes it (a plugin's
        ``save_state`` may still fail it, and then it is rolled back)."""
        self.training.commit_round()
        self.snapshot = None

    def finish(self) -> None:
        """The last round is committed: collect the clients' best models if they are kept."""
        ctx = self.ctx
        if not self.options.delete_local_models_after_aggregation:
            for result in self.runtime.run(ctx, "best_model", b"", ctx.clients):
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

    # -- the round's snapshot -----------------------------------------------------------

    def take_snapshot(self) -> RoundSnapshot:
        """Remember the round state (see :class:`RoundSnapshot` for how the model is kept)."""
        ctx = self.ctx
        by_reference = ctx.run_dir is not None
        self.snapshot = RoundSnapshot(
            round=ctx.round,
            global_model=dict(ctx.global_model)
            if by_reference
            else {k: v.clone() for k, v in ctx.global_model.items()},
            state=copy.deepcopy(ctx.state),
            metrics=copy.deepcopy(ctx.metrics),
            versions={k: v._version for k, v in ctx.global_model.items()} if by_reference else None,
        )
        return self.snapshot

    def restore_snapshot(self) -> None:
        """Put the round state back as it was at the round's start; forget queued events."""
        self.queue.clear()
        self.round_mean = None
        snap = self.snapshot
        if snap is None:
            return
        ctx = self.ctx
        ctx.round = snap.round
        ctx.global_model = self._snapshot_model(snap)
        ctx.state = copy.deepcopy(snap.state)
        ctx.metrics = copy.deepcopy(snap.metrics)
        ctx.contributions = []
        ctx.client_tests = {}

    def _snapshot_model(self, snap: RoundSnapshot) -> dict[str, torch.Tensor]:
        if snap.versions is None:
            return {k: v.clone() for k, v in snap.global_model.items()}
        if all(v._version == snap.versions[k] for k, v in snap.global_model.items()):
            return dict(snap.global_model)
        return self.training.reload_committed_model(snap.round)


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


def _non_finite(model: dict[str, Any]) -> str:
    """Colluding clients whose every contribution is finite can still average to ``inf``:
    a global model is checked as a whole before it replaces the last one."""
    from flcore.contribution import all_finite

    bad = [name for name, tensor in model.items() if not all_finite(tensor)]
    return f"NaN or infinite values in {bad[:5]}" if bad else ""
