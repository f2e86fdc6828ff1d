"""What a client sends back after a round, and the checks it passes before aggregation."""

from __future__ import annotations

import cmath
import math
from collections.abc import Mapping
from typing import Any, cast

import attrs
import torch

from flcore import codec
from flcore.errors import CodecError, ContributionRefused
from flcore.options import JobSettings

#: The default bound on a reported ``num_samples``: ``[job] max_samples_per_client``'s.
MAX_SAMPLES = cast(int, attrs.fields(JobSettings).max_samples_per_client.default)
#: The largest ``local_iterations`` a contribution may report: no round takes a billion
#: optimizer steps, and plugins weigh or schedule by the count (FedNova, SWAG).
MAX_LOCAL_ITERATIONS = 10**9
#: The largest absolute value of a reported metric: far above any loss or accuracy, far
#: below what overflows a mean of them, or lets one client's number decide a selection.
MAX_METRIC = 1e12


@attrs.frozen
class Contribution:
    """One client's result of one round: its weights and what it reports about them."""

    client_id: str
    round: int
    weights: Mapping[str, torch.Tensor] = attrs.field(repr=False)
    num_samples: int
    local_iterations: int
    metrics: Mapping[str, Any] = attrs.field(factory=dict)
    #: The payload's data, when decoded from one this process's codec laid out: what the
    #: NaN check and the FedAvg fold read, a dtype at a time, while ``weights`` holds the
    #: tensors decoded (:meth:`flcore.codec.Flat.covers`). On the client, the buffer of a
    #: model in the wire layout (:mod:`flcore.flat_model`), which is sent in one copy.
    flat: codec.Flat | None = attrs.field(default=None, repr=False, eq=False, kw_only=True)

    def evolve_without_weights(self) -> Contribution:
        """The same contribution with its weights dropped (``delete_local_models_after_aggregation``)."""
        return Contribution(  # attrs.evolve, without its per-call introspection
            self.client_id,
            self.round,
            {},
            self.num_samples,
            self.local_iterations,
            self.metrics,
        )

    def encode(self) -> bytearray:
        meta = {
            "kind": "contribution",
            "client_id": self.client_id,
            "round": self.round,
            "num_samples": self.num_samples,
            "local_iterations": self.local_iterations,
            "metrics": dict(self.metrics),
        }
        try:
            return codec.encode(self.weights, meta, self.flat)
        except TypeError as err:
            raise CodecError(f"contribution of {self.client_id}: metrics not JSON: {err}") from err

    @classmethod
    def decode(cls, payload: codec.Payload, sender: str) -> Contribution:
        """Decode a payload from ``sender``; any malformed field is a :class:`CodecError`.

        The weights are views into ``payload`` when it is writable: the reply becomes the
        contribution, with no second copy of the model."""
        weights, meta, flat = codec.decode_flat(
            payload, what=f"contribution from {sender}", copy=False
        )
        if meta.get("kind") != "contribution":
            raise CodecError(f"contribution from {sender}: payload is not a contribution")
        fields = {
            "client_id": str,
            "round": int,
            "num_samples": int,
            "local_iterations": int,
            "metrics": dict,
        }
        for name, kind in fields.items():
            value = meta.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise CodecError(
                    f"contribution from {sender}: field {name!r} must be {kind.__name__}, "
                    f"got {value!r}"
                )
        return cls(
            client_id=meta["client_id"],
            round=meta["round"],
            weights=weights,
            num_samples=meta["num_samples"],
            local_iterations=meta["local_iterations"],
            metrics=meta["metrics"],
            flat=flat,
        )


def all_finite(tensor: torch.Tensor, block: int = 1 << 20) -> bool:
    """No NaN or infinity in ``tensor``.

    A NaN or an infinity anywhere makes the sum NaN or infinite, so a finite sum proves
    every element finite in one fast reduction; ``isfinite`` costs 15 times as much and
    makes temporaries several times the tensor's size. Only a sum that overflows (or an
    actual NaN) is checked element by element, a block at a time.
    """
    dtype = tensor.dtype
    if dtype in (torch.float32, torch.float64):  # the common case, in the fewest calls
        total = tensor.sum().item()
    elif not (dtype.is_floating_point or dtype.is_complex):
        return True
    else:  # half precision sums in float32: a float16 sum of a few thousand weights overflows
        total = tensor.sum(dtype=torch.float32 if dtype.itemsize == 2 else None).item()
    if cmath.isfinite(total):  # an empty sum is 0
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(block))


def validate(
    contribution: Contribution,
    *,
    reference: Mapping[str, torch.Tensor],
    round: int,
    clients: set[str] | frozenset[str],
    received: set[str],
    sent: codec.Layout | None = None,
    max_samples: int = MAX_SAMPLES,
) -> None:
    """Raise :class:`ContributionRefused` with the reason when ``contribution`` may not count.

    ``reference`` is the global model the round started from; ``received`` the clients
    whose reply this round already counted (accepted or refused). ``sent`` is the layout
    ``reference`` was sent in (:func:`flcore.codec.layout_of`): a contribution decoded in
    that layout has its names, shapes and dtypes, which then need no check one by one.
    FedAvg weighs a contribution by its ``num_samples``, so the count must be an int in
    [1, ``max_samples``] (the job's ``max_samples_per_client``) and ``local_iterations`` one
    in [0, :data:`MAX_LOCAL_ITERATIONS`]; the metrics must pass :func:`metrics_problem`.
    """
    who = contribution.client_id
    if who not in clients:
        raise ContributionRefused(f"unknown client {who!r}")
    if contribution.round != round:
        late = "late" if contribution.round < round else "from the future"
        raise ContributionRefused(
            f"{who}: wrong round {contribution.round} ({late}; the current round is {round})"
        )
    if who in received:
        raise ContributionRefused(f"{who}: duplicate reply for round {round}")
    problem = _count_problem(contribution, max_samples) or metrics_problem(contribution.metrics)
    if problem:
        raise ContributionRefused(f"{who}: {problem}")
    flat = contribution.flat  # a decoded payload's data, a dtype at a time
    finite_runs = (
        flat is not None
        and flat.covers(contribution.weights)
        and all(all_finite(run) for run in flat.runs)
    )
    if finite_runs and flat is not None and flat.layout is sent:
        return  # the layout sent: names, shapes and dtypes are the reference's
    if contribution.weights.keys() != reference.keys():
        missing = sorted(set(reference) - set(contribution.weights))
        if missing:
            raise ContributionRefused(f"{who}: missing tensors {missing[:5]}")
        extra = sorted(set(contribution.weights) - set(reference))
        raise ContributionRefused(f"{who}: unexpected tensors {extra[:5]}")
    for name, expected in reference.items():
        got = contribution.weights[name]
        if got.shape != expected.shape:
            raise ContributionRefused(
                f"{who}: tensor {name!r} has shape {tuple(got.shape)}, "
                f"expected {tuple(expected.shape)}"
            )
        if got.dtype != expected.dtype:
            raise ContributionRefused(
                f"{who}: tensor {name!r} has dtype {got.dtype}, expected {expected.dtype}"
            )
    if finite_runs:
        return
    for name in reference:
        if not all_finite(contribution.weights[name]):
            raise ContributionRefused(f"{who}: tensor {name!r} has NaN or infinite values")


def _count_problem(contribution: Contribution, max_samples: int) -> str | None:
    """Why the reported counts may not weigh in the aggregate, or ``None``. ``type(...) is
    int``: neither a bool nor a float (1e12) is a count."""
    samples, iterations = contribution.num_samples, contribution.local_iterations
    if type(samples) is not int:
        return f"sample count {brief(samples)} is not an integer"
    if samples <= 0:
        return f"non-positive sample count {samples}"
    if samples > max_samples:
        return (
            f"sample count {brief(samples)} is above {max_samples} ([job] max_samples_per_client)"
        )
    if type(iterations) is not int:
        return f"local iteration count {brief(iterations)} is not an integer"
    if iterations < 0:
        return f"negative local iteration count {brief(iterations)}"
    if iterations > MAX_LOCAL_ITERATIONS:
        return f"local iteration count {brief(iterations)} is above {MAX_LOCAL_ITERATIONS}"
    return None


def brief(value: Any) -> str:
    """``repr(value)`` cut to 40 characters: a forged value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def metric_problem(value: Any) -> str | None:
    """Why ``value`` is no metric value, or ``None``: a metric is a finite number (not a bool)
    of at most :data:`MAX_METRIC` in absolute value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"is a {type(value).__name__}, not a number"
    if abs(value) <= MAX_METRIC:  # a huge int is compared, never made a float
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"is not finite ({value!r})"
    return f"is {brief(value)}, beyond ±{MAX_METRIC:.0e}"


def metrics_problem(metrics: Any, depth: int = codec.MAX_DEPTH) -> str | None:
    """Why reported ``metrics`` may not be kept, or ``None``: objects with string keys and
    lists, at most ``depth`` deep, whose every number passes :func:`metric_problem`.

    Other values pass: ``None`` (no value, such as ``initial_validation_metric`` without
    validation data), strings and booleans are reports that no mean or selection counts
    (model_selection skips them by type), so they can neither overflow nor steer a round.
    Every client's every round passes here: the path to a value is spelt out only for the
    value that fails."""
    problem = _metrics_problem(metrics, depth, depth)
    return None if problem is None else f"metrics{problem}"


def _metrics_problem(value: Any, depth: int, limit: int) -> str | None:
    if type(value) is float:  # the common case first: no isinstance chain
        return None if -MAX_METRIC <= value <= MAX_METRIC else f" {metric_problem(value)}"
    kind = type(value)
    if kind is dict or kind is list or isinstance(value, Mapping):
        if depth <= 0:
            return f" is nested deeper than {limit} levels"
        mapping = kind is not list
        for key, item in value.items() if mapping else enumerate(value):
            if mapping and type(key) is not str:
                return f" has a key that is a {type(key).__name__}, not a str"
            if type(item) is float and -MAX_METRIC <= item <= MAX_METRIC:
                continue
            problem = _metrics_problem(item, depth - 1, limit)
            if problem is not None:
                return (f".{key:.40}" if mapping else f"[{key}]") + problem
        return None
    if value is None or isinstance(value, str | bool):
        return None
    problem = metric_problem(value)
    return None if problem is None else f" {problem}"
