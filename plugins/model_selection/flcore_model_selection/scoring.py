"""Turning what clients report into one score: read each metric, weigh it, take the mean.

Pure functions over plain values, so that the arithmetic can be checked by hand. A client's value that cannot count (missing, not a number, not finite) is skipped with
a reason, never guessed: one bad client must not decide which model is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs


class Unusable(ValueError):
    """A reported metric that cannot be counted; the message is the reason that is logged."""


def read_metric(metrics: Mapping[str, Any], name: str, key: str | None = None) -> float:
    """The number ``metrics[name]`` (or ``metrics[name][key]`` when it is a mapping).

    Raises :class:`Unusable` saying why when it is missing, not a number or not finite.
    """
    if name not in metrics:
        present = ", ".join(sorted(map(str, metrics))) or "none"
        raise Unusable(f"metric {name!r} missing (reported: {present})")
    value = metrics[name]
    where = name
    if isinstance(value, Mapping):
        if key is None:
            entries = ", ".join(sorted(map(str, value))) or "none"
            raise Unusable(
                f"metric {name!r} is a mapping; set key_metric to one of its entries ({entries})"
            )
        if key not in value:
            entries = ", ".join(sorted(map(str, value))) or "none"
            raise Unusable(f"metric {name!r} has no entry {key!r} (entries: {entries})")
        value, where = value[key], f"{name}.{key}"
    return as_number(value, where)


def as_number(value: Any, where: str) -> float:
    """``value`` as a finite float; booleans and numeric strings do not count as numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unusable(f"metric {where!r} is not a number: {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise Unusable(f"metric {where!r} is not finite: {number}")
    return number


@attrs.frozen
class ClientScore:
    """One client's metric and the weight it gets in the mean."""

    client_id: str
    value: float
    weight: float


@attrs.frozen
class Score:
    """The weighted mean of the clients' metrics (``None`` when no client counted), the
    clients that counted, and who was left out and why."""

    value: float | None
    clients: tuple[ClientScore, ...]
    skipped: Mapping[str, str] = attrs.field(factory=dict)

    def per_client(self) -> dict[str, dict[str, float]]:
        return {c.client_id: {"value": c.value, "weight": c.weight} for c in self.clients}


def client_weight(base: float, local_iterations: int | None, weigh_by_local_iter: bool) -> float:
    """Clara's weight: the client's aggregation weight, times its local iterations when
    ``weigh_by_local_iter``."""
    if not weigh_by_local_iter:
        return base
    if local_iterations is None:
        raise Unusable("no local iteration count to weigh by")
    return base * local_iterations


def weighted_score(
    clients: Iterable[ClientScore], skipped: Mapping[str, str] | None = None
) -> Score:
    """``sum(weight * value) / sum(weight)`` over the clients with a positive weight (a value
    of ``None`` when none has one); clients with weight 0 are added to ``skipped``."""
    skipped = dict(skipped or {})
    counted = []
    for score in clients:
        if score.weight > 0:
            counted.append(score)
        else:
            skipped[score.client_id] = f"weight {score.weight:g} (aggregation weight x iterations)"
    if not counted:
        return Score(value=None, clients=(), skipped=skipped)
    total = math.fsum(c.weight for c in counted)
    mean = math.fsum(c.weight * c.value for c in counted) / total
    return Score(value=mean, clients=tuple(counted), skipped=skipped)


def is_better(candidate: float, best: float | None, higher_is_better: bool) -> bool:
    """Strictly better than the best so far: a tie keeps the earlier model."""
    if best is None:
        return True
    return candidate > best if higher_is_better else candidate < best
