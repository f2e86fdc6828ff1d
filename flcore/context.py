"""The run's context: what every hook receives first."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

if TYPE_CHECKING:
    import torch

    from flcore.chain import Chain
    from flcore.contribution import Contribution
    from flcore.job import Job
    from flcore.task import Task


@attrs.frozen
class RoundSnapshot:
    """The round state taken at a round's start; restoring it is what a rollback restores."""

    round: int
    global_model: Mapping[str, torch.Tensor]
    state: dict[str, Any]
    metrics: dict[str, Any]


@attrs.define(eq=False)
class FLContext:
    """Settings, round, global model, the round's contributions, plugin state, logger, run
    directory. Plugins keep their own round state in ``state[plugin_name]`` so that a
    rollback restores it with the rest."""

    job: Job
    task: Task
    chain: Chain
    log: Any
    side: Literal["server", "client"] = "server"
    run_dir: Path | None = None
    client_id: str | None = None
    round: int = 0
    global_model: dict[str, torch.Tensor] = attrs.field(factory=dict, repr=False)
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
    #: The client's torch model (client side only).
    model: Any = None
    #: The :class:`flcore.client.Client` (client side only): its ``train_data``,
    #: ``val_data`` and ``receive(payload, what)`` serve plugins' own client requests.
    client: Any = attrs.field(default=None, repr=False)
    #: The server's :class:`flcore.training.Training` (server side only): plugins may ask it
    #: for more client work, e.g. ``ctx.training.validate_on_clients(weights)``.
    training: Any = attrs.field(default=None, repr=False)
    snapshot_: RoundSnapshot | None = attrs.field(default=None, repr=False)

    @property
    def is_last_round(self) -> bool:
        return self.round >= self.job.job.rounds

    def settings(self, plugin: str) -> Any:
        """The validated settings of ``plugin`` (``None`` when it declares none)."""
        return self.chain.settings.get(plugin)

    def fire(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Fire a handler event through the chain (rollback on failure)."""
        return self.chain.fire(hook, self, **kwargs)

    def ask(self, hook: str, **kwargs: Any) -> Any:
        """Ask a strategy hook through the chain."""
        return self.chain.ask(hook, self, **kwargs)

    def take_snapshot(self) -> RoundSnapshot:
        """Remember the round state; tensors are cloned, so in-place edits cannot leak back."""
        self.snapshot_ = RoundSnapshot(
            round=self.round,
            global_model={k: v.clone() for k, v in self.global_model.items()},
            state=copy.deepcopy(self.state),
            metrics=copy.deepcopy(self.metrics),
        )
        return self.snapshot_

    def restore_snapshot(self) -> None:
        """Put the round state back as it was at the round's start."""
        snap = self.snapshot_
        if snap is None:
            return
        self.round = snap.round
        self.global_model = {k: v.clone() for k, v in snap.global_model.items()}
        self.state = copy.deepcopy(snap.state)
        self.metrics = copy.deepcopy(snap.metrics)
        self.contributions = []
        self.client_tests = {}
