"""``[plugins.model_selection]``: Clara's settings plus ``key_metric``, ``mode`` and ``source``.

Everything that can be wrong with them is refused here, when the job is loaded (and by
``flcore validate``), because a wrong choice here does not fail: it silently keeps the
wrong model. Clara's users learnt that with a loss selected as if higher were better.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final, Literal

import attrs

#: Name parts that mark a metric where lower is better; such a metric needs an explicit ``mode``.
LOWER_IS_BETTER: Final = frozenset(
    {
        "loss",
        "error",
        "err",
        "mse",
        "mae",
        "rmse",
        "nll",
        "perplexity",
        "ppl",
        "cost",
        "distance",
        "regret",
        "risk",
        "wer",
        "cer",
    }
)


def looks_lower_is_better(name: str) -> bool:
    """Whether a metric name reads as lower-is-better: ``val_loss``, ``error_rate``, ``MSE``,
    ``trainLoss``. Names are split at non-letters and camel-case humps."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    parts = [p for p in re.split(r"[^A-Za-z]+", spaced.lower()) if p]
    return any(p in LOWER_IS_BETTER or p.endswith(("loss", "error")) for p in parts)


MODES: Final = ("max", "min")


def _mode_is_valid(_instance: object, attribute: Any, value: str | None) -> None:
    # typed ``str | None`` rather than a Literal so that a typo gets this message
    if value is not None and value not in MODES:
        raise ValueError(f"{attribute.name} must be 'max' or 'min', got {value!r}")


def _not_empty(_instance: object, attribute: Any, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ValueError(f"{attribute.name} must name a metric, got {value!r}")


def _weights_are_valid(_instance: object, attribute: Any, value: dict[str, float]) -> None:
    for client, weight in value.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"{attribute.name}.{client} must be a finite number >= 0 "
                f"(0 leaves the client out of the score), got {weight}"
            )


@attrs.frozen
class ModelSelectionSettings:
    """What Clara's ``ModelSelectionHandler(weigh_by_local_iter, validation_metric_name,
    aggregation_weights)`` took, and what its users were missing."""

    #: Multiply each client's weight by the local iterations it reported this round.
    weigh_by_local_iter: bool = False
    #: The contribution metric that scores the global model the client received.
    validation_metric_name: str = attrs.field(
        default="initial_validation_metric", validator=_not_empty
    )
    #: Client id -> weight of its metric in the mean; a client not named weighs 1.0.
    aggregation_weights: dict[str, float] = attrs.field(factory=dict, validator=_weights_are_valid)
    #: Which entry to read when the metric is a mapping (``initial_validation`` holds ``loss``
    #: and ``accuracy``); with ``source = "server"``, the entry of ``ctx.metrics["server"]``.
    key_metric: str | None = attrs.field(default=None, validator=_not_empty)
    #: ``max``: higher is better; ``min``: lower is better. Unset means ``max``, which is refused
    #: when the metric's name looks lower-is-better (a loss, an error).
    mode: str | None = attrs.field(default=None, validator=_mode_is_valid)
    #: ``clients``: the clients' validation of the model they received (``before_aggregation``);
    #: ``server``: ``ctx.metrics["server"][key_metric]`` of the new model (``after_aggregation``),
    #: written by the server_validation plugin, which must come first in the chain.
    source: Literal["clients", "server"] = "clients"

    def __attrs_post_init__(self) -> None:
        # A ValueError here becomes a JobError naming the section, before anything trains.
        if self.source == "server":
            if self.key_metric is None:
                raise ValueError(
                    "key_metric must be set with source = 'server': it names the entry of the "
                    "server's metrics to select by (e.g. key_metric = 'accuracy')"
                )
            if self.aggregation_weights or self.weigh_by_local_iter:
                raise ValueError(
                    "aggregation_weights and weigh_by_local_iter weigh the clients' metrics; "
                    "with source = 'server' there are none to weigh: remove them"
                )
        if self.mode is None:
            for setting in self.metric_settings():
                name = getattr(self, setting)
                if looks_lower_is_better(name):
                    raise ValueError(
                        f"mode must be set explicitly: {setting} = {name!r} looks "
                        f"lower-is-better, and the default mode 'max' would keep the worst "
                        f"model; set mode = 'min' (or mode = 'max' if higher really is better)"
                    )

    def metric_settings(self) -> tuple[str, ...]:
        """The settings that name the metric actually read."""
        if self.source == "server":
            return ("key_metric",)
        if self.key_metric is None:
            return ("validation_metric_name",)
        return ("validation_metric_name", "key_metric")

    @property
    def higher_is_better(self) -> bool:
        return self.mode != "min"

    @property
    def metric_label(self) -> str:
        """How the metric is named in logs and ``best_model.json``."""
        if self.source == "server":
            return f"server.{self.key_metric}"
        if self.key_metric is None:
            return self.validation_metric_name
        return f"{self.validation_metric_name}.{self.key_metric}"

    def weight_of(self, client_id: str) -> float:
        return self.aggregation_weights.get(client_id, 1.0)
