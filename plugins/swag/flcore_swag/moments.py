"""Gaussians over a model's parameters, by name: what a client collects and sends.

A :class:`Gaussian` is SWAG's description of a cloud of weight snapshots: the mean, the
diagonal (population) variance and up to K deviation columns, all float64 and keyed by
parameter name, never by position. :class:`SnapshotMoments` builds one from snapshots with
Welford's update (no ``E[x^2] - E[x]^2`` cancellation); it is centralised SWAG.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from flcore import CodecError, ContributionRefused, decode_tensors, encode_tensors

if TYPE_CHECKING:
    from flcore import Payload

MEAN, VAR, DEV = "mean/", "var/", "dev/"


@attrs.frozen
class Gaussian:
    """``N(mean, diag(var) + D D^T / (K - 1))`` with ``D``'s K columns kept by name as
    ``dev[name]`` of shape ``(K, *shape)``; ``K = 0`` means diagonal only."""

    names: tuple[str, ...]
    mean: Mapping[str, torch.Tensor] = attrs.field(repr=False)
    var: Mapping[str, torch.Tensor] = attrs.field(repr=False)
    dev: Mapping[str, torch.Tensor] = attrs.field(repr=False)

    @property
    def rank(self) -> int:
        """K, the number of deviation columns."""
        return int(self.dev[self.names[0]].shape[0]) if self.dev else 0

    @property
    def numel(self) -> int:
        return sum(self.mean[n].numel() for n in self.names)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name in self.names:
            tensors[MEAN + name] = self.mean[name]
            tensors[VAR + name] = self.var[name]
            if self.dev:
                tensors[DEV + name] = self.dev[name]
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], names: Any, what: str) -> Gaussian:
        """Read and check ``mean/``, ``var/`` and ``dev/`` tensors for ``names``; anything
        missing, extra, misshapen, not floating, not finite or negative is a CodecError."""
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)
        ):
            raise CodecError(f"{what}: 'names' must be a non-empty list of distinct names")
        ours = {k for k in tensors if k.startswith((MEAN, VAR, DEV))}
        has_dev = any(k.startswith(DEV) for k in ours)
        expected = {p + n for n in names for p in ((MEAN, VAR, DEV) if has_dev else (MEAN, VAR))}
        if ours != expected:
            missing = sorted(expected - ours)
            extra = sorted(ours - expected)
            detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise CodecError(f"{what}: tensors do not match the parameter names: {detail}")
        mean, var, dev = {}, {}, {}
        rank = None
        for name in names:
            m = _float64(tensors[MEAN + name], f"{what}: {MEAN}{name}")
            v = _float64(tensors[VAR + name], f"{what}: {VAR}{name}")
            if v.shape != m.shape:
                raise CodecError(
                    f"{what}: {VAR}{name} has shape {tuple(v.shape)}, its mean {tuple(m.shape)}"
                )
            if bool((v < 0).any()):
                raise CodecError(f"{what}: {VAR}{name} has negative variances")
            mean[name], var[name] = m, v
            if has_dev:
                d = _float64(tensors[DEV + name], f"{what}: {DEV}{name}")
                if d.dim() != m.dim() + 1 or d.shape[1:] != m.shape:
                    raise CodecError(
                        f"{what}: {DEV}{name} has shape {tuple(d.shape)}, expected "
                        f"(K, {', '.join(map(str, m.shape))})"
                    )
                rank = d.shape[0] if rank is None else rank
                if d.shape[0] != rank:
                    raise CodecError(f"{what}: {DEV}{name} has {d.shape[0]} columns, others {rank}")
                dev[name] = d
        if rank is not None and rank < 2:
            raise CodecError(f"{what}: {rank} deviation column(s); SWAG needs 0 or at least 2")
        return cls(tuple(names), mean, var, dev)


def _float64(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise CodecError(f"{what}: dtype {tensor.dtype} is not floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise CodecError(f"{what}: NaN or infinite values")
    return tensor.to(torch.float64)


class SnapshotMoments:
    """Centralised SWAG's statistics of a stream of snapshots: Welford's running mean and
    centred sum of squares in float64, and the last ``rank`` snapshots."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.count = 0
        self.names: tuple[str, ...] = ()
        self._mean: dict[str, torch.Tensor] = {}
        self._m2: dict[str, torch.Tensor] = {}
        self._recent: deque[dict[str, torch.Tensor]] = deque(maxlen=max(rank, 1))

    def add(self, params: Mapping[str, torch.Tensor]) -> None:
        """Take one snapshot (copied; the caller may go on training in place)."""
        if not self.count:
            self.names = tuple(params)
        elif tuple(params) != self.names:
            raise ValueError("every snapshot must have the same parameter names")
        self.count += 1
        snapshot = {}
        for name, value in params.items():
            x = value.detach().to(torch.float64, copy=True)
            if self.count == 1:
                self._mean[name] = x.clone()
                self._m2[name] = torch.zeros_like(x)
            else:
                mean = self._mean[name]
                delta = x - mean
                mean += delta / self.count
                self._m2[name] += delta * (x - mean)
            snapshot[name] = value.detach().clone()
        if self.rank:
            self._recent.append(snapshot)

    def result(self) -> Gaussian:
        """The snapshots' mean, population variance and deviation columns ``theta_i - mean``
        of the last ``min(rank, count)`` snapshots (none when fewer than two)."""
        if not self.count:
            raise ValueError("no snapshot was taken")
        var = {n: self._m2[n] / self.count for n in self.names}
        dev: dict[str, torch.Tensor] = {}
        if self.rank and len(self._recent) >= 2:
            for name in self.names:
                mean = self._mean[name]
                dev[name] = torch.stack([s[name].to(torch.float64) - mean for s in self._recent])
        return Gaussian(self.names, dict(self._mean), var, dev)


@attrs.frozen
class ClientMoments:
    """One client's answer to a SWAG round: its Gaussian and what it says about it."""

    client_id: str
    round: int
    num_samples: int
    num_snapshots: int
    gaussian: Gaussian
    metrics: Mapping[str, Any] = attrs.field(factory=dict)

    def weight(self, weight_by: str) -> float:
        return float(self.num_samples if weight_by == "samples" else self.num_snapshots)

    def encode(self) -> Payload:
        meta = {
            "kind": "swag_moments",
            "client_id": self.client_id,
            "round": self.round,
            "num_samples": self.num_samples,
            "num_snapshots": self.num_snapshots,
            "names": list(self.gaussian.names),
            "metrics": dict(self.metrics),
        }
        return encode_tensors(self.gaussian.to_tensors(), meta)

    @classmethod
    def decode(cls, payload: Payload, sender: str) -> ClientMoments:
        what = f"SWAG moments from {sender}"
        tensors, meta = decode_tensors(payload, what=what)
        if meta.get("kind") != "swag_moments":
            raise CodecError(f"{what}: payload is not SWAG moments (kind {meta.get('kind')!r})")
        for field, kind in (
            ("client_id", str),
            ("round", int),
            ("num_samples", int),
            ("num_snapshots", int),
            ("metrics", dict),
        ):
            value = meta.get(field)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise CodecError(f"{what}: field {field!r} must be {kind.__name__}, got {value!r}")
        extra = sorted(k for k in tensors if not k.startswith((MEAN, VAR, DEV)))
        if extra:
            raise CodecError(f"{what}: unexpected tensors {extra[:3]}")
        gaussian = Gaussian.from_tensors(tensors, meta.get("names"), what)
        return cls(
            client_id=meta["client_id"],
            round=meta["round"],
            num_samples=meta["num_samples"],
            num_snapshots=meta["num_snapshots"],
            gaussian=gaussian,
            metrics=meta["metrics"],
        )


def check_moments(
    moments: ClientMoments,
    *,
    sender: str,
    shapes: Mapping[str, Sequence[int]],
    round: int,
    clients: frozenset[str],
    received: set[str],
    max_rank: int,
) -> None:
    """Raise :class:`ContributionRefused` when ``moments`` may not enter the posterior.

    ``shapes`` are the model's parameter shapes by name; ``received`` the clients whose
    moments this round were already accepted.
    """
    who = moments.client_id
    if who != sender:
        raise ContributionRefused(f"{sender}: claims to be {who!r}")
    if who not in clients:
        raise ContributionRefused(f"unknown client {who!r}")
    if moments.round != round:
        raise ContributionRefused(
            f"{who}: SWAG moments of round {moments.round}; the current round is {round}"
        )
    if who in received:
        raise ContributionRefused(f"{who}: duplicate SWAG moments for round {round}")
    if moments.num_samples <= 0:
        raise ContributionRefused(f"{who}: non-positive sample count {moments.num_samples}")
    if moments.num_snapshots <= 0:
        raise ContributionRefused(f"{who}: non-positive snapshot count {moments.num_snapshots}")
    gaussian = moments.gaussian
    if gaussian.rank > min(max_rank, moments.num_snapshots):
        raise ContributionRefused(
            f"{who}: {gaussian.rank} deviation columns, at most "
            f"{min(max_rank, moments.num_snapshots)} allowed (rank {max_rank}, "
            f"{moments.num_snapshots} snapshots)"
        )
    missing = sorted(set(shapes) - set(gaussian.names))
    if missing:
        raise ContributionRefused(f"{who}: no moments for parameters {missing[:5]}")
    extra = sorted(set(gaussian.names) - set(shapes))
    if extra:
        raise ContributionRefused(f"{who}: moments for unknown parameters {extra[:5]}")
    for name, shape in shapes.items():
        got = tuple(gaussian.mean[name].shape)
        if got != tuple(shape):
            raise ContributionRefused(
                f"{who}: parameter {name!r} has shape {got}, expected {tuple(shape)}"
            )
