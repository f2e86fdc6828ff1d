"""The contexts every hook receives first: one for the server, one for a client.

A plugin reads the job, its round and its state here and asks the core for work through
the context's methods; it never needs the plugin manager, the trainer or the runtime.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

if TYPE_CHECKING:
    import torch

    from flcore.chain import Chain
    from flcore.contribution import Contribution
    from flcore.job import Job
    from flcore.runtime.base import ClientResult
    from flcore.task import Task

    Weights = dict[str, torch.Tensor]


@attrs.define(eq=False)
class FLContext:
    """What both sides share: the job, the task, the round, a logger, and the chain.

    ``log`` is a bound structlog logger: ``ctx.log.info("event", key=value)`` goes to the run's
    ``events.jsonl``. ``fire``/``ask`` call the chain's hooks (a plugin's own hookspecs too).
    """

    job: Job
    task: Task
    _chain: Chain = attrs.field(alias="chain", repr=False)
    log: Any = attrs.field(repr=False)
    #: 1-based number of the round in progress (0 before the first).
    round: int = 0
    #: The run directory on the server (``None`` for a run without one, and on a client).
    run_dir: Path | None = None

    side: Literal["server", "client"] = attrs.field(default="server", init=False)

    @property
    def is_last_round(self) -> bool:
        return self.round >= self.job.job.rounds

    def settings(self, plugin: str) -> Any:
        """The validated settings of the chain's plugin ``plugin`` (``None`` when it has none)."""
        return self._chain.settings.get(plugin)

    def name_of(self, plugin: object) -> str | None:
        """The name ``plugin`` (a registered plugin object, usually ``self``) has in the chain."""
        return self._chain.name_of(plugin)

    def fire(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Fire a handler event through the chain: ``(plugin, result)`` for each handler."""
        return self._chain.fire(hook, self, **kwargs)

    def ask(self, hook: str, **kwargs: Any) -> Any:
        """Ask a strategy hook through the chain: the first answer, ``None`` when none."""
        return self._chain.ask(hook, self, **kwargs)

    def handles(self, hook: str) -> bool:
        """Whether a plugin in the chain implements ``hook``. Firing an event that nothing
        handles does nothing, so a caller need not build costly arguments for it."""
        return self._chain.handles(hook)


@attrs.define(eq=False)
class ServerContext(FLContext):
    """The server's context: the global model, the round's contributions, metrics and state.

    ``state`` and ``metrics`` follow the round: a failed round restores them with the global
    model. Plugins keep their round state in ``state[name]``.
    """

    #: The federation's members, in client order: at check time the job's names
    #: (``[job] allowed_clients``, else ``client-0`` ...), once the runtime started the
    #: clients that joined.
    clients: tuple[str, ...] = ()
    #: The clients taking part in this round (``select_clients``), in client order.
    cohort: tuple[str, ...] = ()
    global_model: dict[str, torch.Tensor] = attrs.field(factory=dict, repr=False)
    #: The round's accepted contributions (without weights once FedAvg folded them).
    contributions: list[Contribution] = attrs.field(factory=list, repr=False)
    #: Each client's test of this round's global model: client id -> metrics (with
    #: ``num_samples``); filled by the trainer's ``test_round``.
    client_tests: dict[str, dict[str, float]] = attrs.field(factory=dict)
    #: Plugin state that follows the round: restored on rollback.
    state: dict[str, Any] = attrs.field(factory=dict)
    #: This round's metrics line (``metrics.jsonl``); plugins add their own keys.
    metrics: dict[str, Any] = attrs.field(factory=dict)
    #: How the run talks to the terminal: human-readable lines, JSON lines, or nothing.
    console: Literal["console", "json", "quiet"] = "quiet"
    _training: Any = attrs.field(default=None, alias="training", repr=False)

    def send_to_clients(
        self, request: str, payload: bytes | bytearray, clients: Sequence[str] | None = None
    ) -> Iterator[ClientResult]:
        """Send a request of a plugin's own (answered by ``client_request``) to ``clients``
        (default: the round's cohort); yield each client's reply as it comes."""
        return self._require_training().send_to_clients(request, payload, clients)

    def validate_on_clients(
        self, weights: Mapping[str, torch.Tensor], clients: Sequence[str] | None = None
    ) -> dict[str, dict[str, float]]:
        """Have ``clients`` (default: the round's cohort) score ``weights`` on their held-out
        splits: client id -> metrics with ``num_samples``; failed answers are logged and
        left out."""
        return self._require_training().validate_on_clients(weights, clients)

    def _require_training(self) -> Any:
        if self._training is None:
            from flcore.errors import FLCoreError

            raise FLCoreError("this context belongs to no running training: no clients to ask")
        return self._training


@attrs.define(eq=False)
class ClientContext(FLContext):
    """A client's context: its name, model, data splits and the state it keeps across rounds.

    ``state`` is the client's own (SCAFFOLD's control variate, a personal model, a counter):
    tensors and JSON values that last from one round to the next on every runtime and are
    saved with the run, on the client's side, so a resumed run continues with them.
    """

    client_id: str = ""
    model: torch.nn.Module | None = attrs.field(default=None, repr=False)
    #: The client's training split and held-out validation split (torch Datasets).
    train_data: Any = attrs.field(default=None, repr=False)
    val_data: Any = attrs.field(default=None, repr=False)
    #: The global model this round's request carried (read-only views, valid while the
    #: request is answered): what FedProx's term and an update filter compare against.
    global_model: Weights = attrs.field(factory=dict, repr=False)
    state: dict[str, Any] = attrs.field(factory=dict, repr=False)
    _client: Any = attrs.field(default=None, alias="client", repr=False)

    side: Literal["server", "client"] = attrs.field(default="client", init=False)

    def receive(self, payload: bytes | bytearray | memoryview, what: str) -> Weights:
        """Decode a model the server sent, load it into ``model`` and set ``round``; return
        the model's own state dict (so editing it edits the model)."""
        if self._client is None:
            from flcore.errors import FLCoreError

            raise FLCoreError("this context belongs to no client: nothing to load into")
        weights: Weights = self._client.receive(payload, what)
        return weights
