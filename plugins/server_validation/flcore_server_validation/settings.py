"""``[plugins.server_validation]``: Clara's two settings, checked before anything trains."""

from __future__ import annotations

from typing import Any

import attrs


def _at_least_one(_instance: object, attribute: Any, value: int) -> None:
    # A ValueError here becomes a JobError naming the section, before training.
    if value < 1:
        raise ValueError(
            f"{attribute.name} must be at least 1 (validate on every N-th round and on the "
            f"last one), got {value}"
        )


@attrs.frozen
class ServerValidationSettings:
    """What Clara's ``ServerValidationHandler(evaluator, num_rounds_per_valid)`` took."""

    #: An evaluator named by import path, ``"package.module:function"``: called as
    #: ``function(model, data)``, it returns a mapping of metric name to number. Unset: the
    #: chain's ``evaluate`` hook (the core's loss and accuracy, or loss for regression).
    evaluator: str | None = None
    #: Validate on every N-th round (N, 2N, ...) and always on the last round.
    num_rounds_per_valid: int = attrs.field(default=1, validator=_at_least_one)
