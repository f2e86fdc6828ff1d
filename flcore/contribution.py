"""What a client sends back after a round, and the checks it passes before aggregation."""

from __future__ import annotations

import cmath
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from flcore import codec
from flcore.errors import CodecError, ContributionRefused


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
) -> None:
    """Raise :class:`ContributionRefused` with the reason when ``contribution`` may not count.

    ``reference`` is the global model the round started from; ``received`` the clients
    whose reply this round already counted (accepted or refused). ``sent`` is the layout
    ``reference`` was sent in (:func:`flcore.codec.layout_of`): a contribution decoded in
    that layout has its names, shapes and dtypes, which then need no check one by one.
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
    if contribution.num_samples <= 0:
        raise ContributionRefused(f"{who}: non-positive sample count {contribution.num_samples}")
    if contribution.local_iterations < 0:
        raise ContributionRefused(
            f"{who}: negative local iteration count {contribution.local_iterations}"
        )
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
