"""Centralised SWAG's statistics of real snapshots, their wire format, and the refusal of
malformed client moments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from flcore_swag.moments import ClientMoments, Gaussian, SnapshotMoments, check_moments
from swag_helpers import digits_shards, flat, flat_columns, snapshots

from flcore import CodecError, ContributionRefused, decode_tensors, encode_tensors


def _moments(shots: list[dict[str, torch.Tensor]], rank: int) -> Gaussian:
    acc = SnapshotMoments(rank)
    for shot in shots:
        acc.add(shot)
    return acc.result()


def test_welford_moments_equal_numpy_on_real_snapshots() -> None:
    shots = snapshots(digits_shards(1)[0], steps=40, every=2)
    gaussian = _moments(shots, rank=5)
    names = gaussian.names
    matrix = np.stack([flat(s, names) for s in shots])  # T x d, float64
    mean = flat(dict(gaussian.mean), names)
    var = flat(dict(gaussian.var), names)
    np.testing.assert_allclose(mean, matrix.mean(axis=0), rtol=0, atol=1e-14)
    np.testing.assert_allclose(var, matrix.var(axis=0), rtol=1e-10, atol=1e-18)
    # the deviation columns are the last K snapshots about the final mean
    np.testing.assert_allclose(
        flat_columns(dict(gaussian.dev), names),
        (matrix[-5:] - matrix.mean(axis=0)).T,
        rtol=0,
        atol=1e-14,
    )
    assert gaussian.rank == 5 and all(gaussian.mean[n].dtype == torch.float64 for n in names)


def test_few_snapshots_or_rank_zero_give_no_columns() -> None:
    shots = snapshots(digits_shards(1)[0], steps=4, every=2)
    assert _moments(shots, rank=0).rank == 0  # SWAG-Diag
    assert _moments(shots[:1], rank=20).rank == 0  # one snapshot: no deviation
    assert _moments(shots, rank=20).rank == 2  # min(K, snapshots)


def test_snapshots_are_copied() -> None:
    model = torch.nn.Linear(2, 1)
    acc = SnapshotMoments(2)
    acc.add(dict(model.named_parameters()))
    with torch.no_grad():
        model.weight.add_(1.0)
    acc.add(dict(model.named_parameters()))
    assert acc.result().var["weight"].min() > 0.2  # both states were kept, not one twice


def _client(shots: list[dict[str, torch.Tensor]], **fields: Any) -> ClientMoments:
    values: dict[str, Any] = {
        "client_id": "client-0",
        "round": 3,
        "num_samples": 100,
        "num_snapshots": len(shots),
        "gaussian": _moments(shots, rank=4),
    }
    values.update(fields)
    return ClientMoments(**values)


@pytest.fixture(scope="module")
def shots() -> list[dict[str, torch.Tensor]]:
    return snapshots(digits_shards(1)[0], steps=12, every=2)


def test_client_moments_survive_the_codec_bit_for_bit(shots: Any) -> None:
    sent = _client(shots)
    got = ClientMoments.decode(sent.encode(), sender="client-0")
    assert got.gaussian.names == sent.gaussian.names
    for name in sent.gaussian.names:
        assert torch.equal(got.gaussian.mean[name], sent.gaussian.mean[name])
        assert torch.equal(got.gaussian.var[name], sent.gaussian.var[name])
        assert torch.equal(got.gaussian.dev[name], sent.gaussian.dev[name])
    assert (got.num_samples, got.num_snapshots, got.round) == (100, 6, 3)


def _check(moments: ClientMoments, shapes: dict[str, tuple[int, ...]], **kw: Any) -> None:
    args: dict[str, Any] = {
        "sender": "client-0",
        "shapes": shapes,
        "round": 3,
        "clients": frozenset({"client-0", "client-1"}),
        "received": set(),
        "max_rank": 4,
    }
    args.update(kw)
    check_moments(moments, **args)


def _tamper(
    payload: bytes | bytearray, change: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]
) -> bytes | bytearray:
    tensors, meta = decode_tensors(payload)
    change(tensors, meta)
    return encode_tensors(tensors, meta)


def _set(key: str, value: Any) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], None]:
    def change(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        meta[key] = value

    return change


def _poison(prefix: str, how: str) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], None]:
    def change(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        key = prefix + meta["names"][0]
        if how == "nan":
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = float("nan")
        elif how == "negative":
            tensors[key] = -tensors[key] - 1e-3
        elif how == "drop":
            del tensors[key]
        elif how == "int":
            tensors[key] = tensors[key].to(torch.int64)
        elif how == "shape":
            tensors[key] = tensors[key][..., :1].contiguous()
        elif how == "one_column":
            tensors[key] = tensors[key][:1].contiguous()

    return change


def _extra(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tensors["optimizer/state"] = torch.zeros(3)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_set("kind", "contribution"), "not SWAG moments"),
        (_set("num_samples", "100"), "'num_samples' must be int"),
        (_set("round", True), "'round' must be int"),
        (_set("names", "0.weight"), "'names' must be a non-empty list"),
        (_set("names", ["0.weight", "0.weight"]), "'names' must be a non-empty list"),
        (_poison("mean/", "nan"), "NaN or infinite"),
        (_poison("var/", "nan"), "NaN or infinite"),
        (_poison("dev/", "nan"), "NaN or infinite"),
        (_poison("var/", "negative"), "negative variances"),
        (_poison("var/", "drop"), "missing"),
        (_poison("mean/", "int"), "not floating point"),
        (_poison("var/", "shape"), "has shape"),
        (_poison("dev/", "shape"), "expected \\(K,"),
        (_poison("dev/", "one_column"), "columns, others"),
        (_extra, "unexpected tensors"),
    ],
)
def test_malformed_moments_are_refused_with_the_reason(
    shots: Any, change: Callable[[dict[str, torch.Tensor], dict[str, Any]], None], reason: str
) -> None:
    payload = _tamper(_client(shots).encode(), change)
    with pytest.raises(CodecError, match=reason) as err:
        ClientMoments.decode(payload, sender="client-0")
    assert "SWAG moments from client-0" in str(err.value)


def test_truncated_moments_are_refused(shots: Any) -> None:
    payload = _client(shots).encode()
    for cut in (0, 7, 100, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError, match=r"truncated|malformed"):
            ClientMoments.decode(payload[:cut], sender="client-0")


def test_a_single_deviation_column_everywhere_is_refused(shots: Any) -> None:
    def one(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for key in [k for k in tensors if k.startswith("dev/")]:
            tensors[key] = tensors[key][:1].contiguous()

    with pytest.raises(CodecError, match="1 deviation column"):
        ClientMoments.decode(_tamper(_client(shots).encode(), one), sender="client-0")


@pytest.mark.parametrize(
    ("fields", "kw", "reason"),
    [
        ({"client_id": "client-1"}, {}, "claims to be 'client-1'"),
        ({"client_id": "mallory"}, {"sender": "mallory"}, "unknown client 'mallory'"),
        ({"round": 2}, {}, "moments of round 2; the current round is 3"),
        ({}, {"received": {"client-0"}}, "duplicate"),
        ({"num_samples": 0}, {}, "non-positive sample count"),
        ({"num_snapshots": 0}, {}, "non-positive snapshot count"),
        ({}, {"max_rank": 2}, "4 deviation columns, at most 2"),
        ({"num_snapshots": 3}, {}, "at most 3 allowed"),
    ],
)
def test_moments_that_may_not_count_are_refused(
    shots: Any, fields: dict[str, Any], kw: dict[str, Any], reason: str
) -> None:
    moments = _client(shots, **fields)
    shapes = {n: tuple(moments.gaussian.mean[n].shape) for n in moments.gaussian.names}
    with pytest.raises(ContributionRefused, match=reason):
        _check(moments, shapes, **kw)


def test_moments_for_another_model_are_refused(shots: Any) -> None:
    moments = _client(shots)
    shapes = {n: tuple(moments.gaussian.mean[n].shape) for n in moments.gaussian.names}
    _check(moments, shapes)  # the real model's shapes pass
    with pytest.raises(ContributionRefused, match="no moments for parameters \\['extra'\\]"):
        _check(moments, {**shapes, "extra": (3,)})
    fewer = dict(list(shapes.items())[1:])
    with pytest.raises(ContributionRefused, match="moments for unknown parameters"):
        _check(moments, fewer)
    first = next(iter(shapes))
    with pytest.raises(ContributionRefused, match=f"parameter '{first}' has shape"):
        _check(moments, {**shapes, first: (1, 2, 3)})
