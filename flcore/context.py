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

    def handles(self, hook: str) -> bool:
        """Whether a plugin in the chain implements ``hook``. Firing an event that nothing
        handles does nothing, so a caller need not build costly arguments for it."""
        return bool(self.chain.implementations(hook))

    def take_snapshot(self) -> RoundSnapshot:
        """Remember the round state (see :class:`RoundSnapshot` for how the model is kept)."""
        by_reference = self.run_dir is not None
        self.snapshot_ = RoundSnapshot(
            round=self.round,
            global_model=dict(self.global_model)
            if by_reference
            else {k: v.clone() for k, v in self.global_model.items()},
            state=copy.deepcopy(self.state),
            metrics=copy.deepcopy(self.metrics),
            versions={k: v._version for k, v in self.global_model.items()}
            if by_reference
            else None,
        )
        return self.snapshot_

    def restore_snapshot(self) -> None:
        """Put the round state back as it was at the round's start."""
        snap = self.snapshot_
        if snap is None:
            return
        self.round = snap.round
        self.global_model = self._snapshot_model(snap)
        self.state = copy.deepcopy(snap.state)
        self.metrics = copy.deepcopy(snap.metrics)
        self.contributions = []
        self.client_tests = {}

    def _snapshot_model(self, snap: RoundSnapshot) -> dict[str, torch.Tensor]:
        if snap.versions is None:
            return {k: v.clone() for k, v in snap.global_model.items()}
        if all(v._version == snap.versions[k] for k, v in snap.global_model.items()):
            return dict(snap.global_model)
        from flcore import codec
        from flcore.errors import RoundFailed

        assert self.run_dir is not None
        if self.training is not None:
            self.training.writer.wait()  # the committed model may still be on its way to disk
        path = self.run_dir / "global_model.safetensors"
        weights, meta = codec.load_file(path)
        if meta.get("round") != snap.round:
            raise RoundFailed(
                f"the global model was edited in place during round {snap.round + 1} and "
                f"{path} holds round {meta.get('round')}, not {snap.round}: cannot restore it"
            )
        self.log.warning("global_model_reloaded", round=snap.round, reason="edited in place")
        return weights
