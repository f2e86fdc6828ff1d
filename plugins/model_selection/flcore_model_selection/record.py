"""What is known about the best model: the content of ``best_model.json`` and of the hook's
``best`` argument. Plain JSON values only, so it can sit in ``ctx.state`` (restored on
rollback) and be written as it is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class BestModel:
    """Which round's global model is the best so far, and how it scored."""

    #: The round that produced this global model; 0 is the initial model.
    round: int
    #: Its score: the weighted mean of the clients' values, or the server's value.
    metric: float
    #: The metric read, e.g. ``initial_validation_metric`` or ``server.accuracy``.
    metric_name: str
    mode: str
    source: str
    #: The round during which it was scored: with ``source = "clients"`` the round after the
    #: one that produced it, since clients score the model they receive.
    scored_in_round: int
    #: Scored by the extra client validation after the last round (the final model).
    final: bool = False
    #: Client id -> ``{"value", "weight"}`` of the clients that counted.
    clients: Mapping[str, Mapping[str, float]] = attrs.field(factory=dict)
    #: Client id -> why its value did not count.
    skipped: Mapping[str, str] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "metric": self.metric,
            "metric_name": self.metric_name,
            "mode": self.mode,
            "source": self.source,
            "scored_in_round": self.scored_in_round,
            "final": self.final,
            # sorted: clients answer in any order, and the same run must give the same file
            "clients": {c: dict(self.clients[c]) for c in sorted(self.clients)},
            "skipped": {c: self.skipped[c] for c in sorted(self.skipped)},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BestModel:
        fields = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})
